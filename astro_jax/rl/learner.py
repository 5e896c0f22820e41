"""`RLLearner`: one RL step on one mesh and one set of weights, from injected parts.

  learner = RLLearner(LearnerConfig(...), sampler, trainer, pool, stream, problems, prompt_ids, params, ckpts)
  row = learner.step(step)   # = sync weights, collect(step), update(batch), [evaluate(step)], the metrics row

Why a package of its own (`astro_jax/rl/`, not `train/`): the learner ties together the sampler, the verifier and
the trainer; `train/` holds what sft and rl share (data, losses, the step, `Trainer`) and knows neither sampling nor
verification. The parts are injected, so each can be replaced: a scripted sampler and a fake verifier test dynamic
sampling, minibatching and resume on a tiny real `Trainer` without a stage run (tests/test_rl_learner.py), and a
timed sampler lets benchmarks/rl_step.py split the sampling time without patching anything.

- `collect(step) -> Batch`: rounds of `batch_prompts` prompts from the stream, G responses each
  (`generation.generate_and_verify`: one request per prompt, each chunk verified while the next decodes), rewards
  (`rollouts.rewards`; the shuffled-reward control permutes them per round), dynamic sampling (groups without a
  signal are dropped and more prompts sampled, up to `max_sampling_rounds`), then the training rows with their
  group-relative advantages (`batch_rows`: always batch_prompts x G rows, the unfilled ones weigh 0).
- `update(batch) -> sums`: `minibatches` optimizer steps through `Trainer.train_on`, on disjoint parts of the rows
  assigned by (seed, step); with a `Reference` its log-probs are computed on device for the KL term.
- `evaluate(step)`: the held-out benchmarks scored with the sampler's weights (eval's summary per benchmark).
- `step(step) -> row`: the metrics row of stages/rl.py's docstring.

Failures stop the run with one line naming the step and the last good checkpoint (`loop.stop_training`): sampled
log-probs that are not finite (the weights of the last update give non-finite logits), a loss, gradient or updated
weights that are not finite.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import jax
import ml_collections
import numpy as np

from astro_jax import eval_metrics, prompts
from astro_jax.generation import Item, generate_and_verify
from astro_jax.sampler import SamplingParams
from astro_jax.train import checkpoints as checkpoints_lib
from astro_jax.train import loop, losses, policy_loss, rollouts

UPDATE_SUMS = ("loss", "grad_norm", "tokens", "clipped", "entropy", "kl")  # summed over a step's updates


class SamplerLike(Protocol):
  """What the learner uses of a `Sampler` (a scripted one in tests)."""
  params: Any
  stats: Any  # .tokens, .row_steps: running totals

  def update_weights(self, weights: Any) -> None: ...
  def sample(self, requests: Sequence[Any]) -> list[list[Any]]: ...


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """The settings one RL step follows (the rl stage's keys, `from_config`)."""
  batch_prompts: int
  group_size: int
  seq_len: int                  # tokens per training row: the longest prompt + the response budget
  steps: int = 1                # the run's last step (always evaluated when eval_every > 0)
  seed: int = 0                 # prompt order, minibatch assignment and the shuffled-reward control
  minibatches: int = 1
  dynamic_sampling: bool = True
  max_sampling_rounds: int = 3
  prompts_per_call: int = 16    # prompts (G rows each) per sampler call
  scale_std: bool = True
  correct_reward: float = 1.0
  wrong_reward: float = -1.0
  overlong: str = "none"        # none, mask, penalty (rollouts.OVERLONG)
  overlong_buffer: int = 0
  overlong_penalty: float = 1.0
  shuffle_rewards: bool = False
  eval_every: int = 0
  pad_id: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, pad_id: int = 0) -> "LearnerConfig":
    R = config.reward
    return cls(batch_prompts=config.batch_prompts, group_size=config.group_size,
               seq_len=config.max_prompt_tokens + config.sampling.max_new_tokens, steps=config.steps,
               seed=config.seed, minibatches=config.minibatches, dynamic_sampling=config.dynamic_sampling,
               max_sampling_rounds=config.max_sampling_rounds,
               prompts_per_call=max(1, config.sampler.max_batch // config.group_size),
               scale_std=config.loss.scale_std, correct_reward=R.correct, wrong_reward=R.wrong, overlong=R.overlong,
               overlong_buffer=R.overlong_buffer, overlong_penalty=R.overlong_penalty, shuffle_rewards=R.shuffle,
               eval_every=config.eval.every, pad_id=pad_id)

  @property
  def rows(self) -> int:
    """Training rows per step: batch_prompts x group_size."""
    return self.batch_prompts * self.group_size


@dataclasses.dataclass
class Group:
  """One prompt's G responses and their scores."""
  problem: Any
  epoch: int
  completions: list
  correct: np.ndarray   # [G] bool (the verifier's verdicts)
  rewards: np.ndarray   # [G] float (shaped; shuffled in the control)


@dataclasses.dataclass
class Batch:
  """What `collect` gathered for one step."""
  step: int
  kept: list[Group]                    # the groups trained on (<= batch_prompts)
  sampled: list[Group]                 # every group sampled in the step, all rounds (the metrics')
  rounds: int
  rows: dict[str, np.ndarray] | None   # the training rows (batch_rows); None when no group was kept
  times: dict[str, float]              # time_sampling, time_scoring


def has_signal(group: Group, shuffled: bool = False) -> bool:
  """Whether a group teaches anything (dynamic sampling keeps it; zero_signal_fraction counts the others): some of
  its responses right and some wrong. Decided on the verdicts, not on the shaped rewards: with reward.overlong =
  penalty four wrong answers of different lengths get different rewards, and std scaling would turn that length gap
  into full-size advantages (+-0.87 for two short, two long). In the shuffled-reward control (`shuffled`) the
  rewards no longer belong to the responses, so there signal is on the permuted rewards (any two differ): the
  control keeps training, on noise, which is its point."""
  return rollouts.has_signal(group.rewards if shuffled else group.correct)


def batch_rows(groups: list[Group], prompt_ids: Mapping[str, Sequence[int]], n_rows: int, seq_len: int, *,
               scale_std: bool = True, mask_truncated: bool = False, pad_id: int = 0) -> dict[str, np.ndarray]:
  """The step's training rows: each group's responses with their group-relative advantages; truncated responses
  out of the loss when `mask_truncated`; rows past the groups (a batch dynamic sampling could not fill) weigh 0."""
  prompts_, responses, lps, advs, truncated = [], [], [], [], []
  for g in groups:
    adv_G = np.asarray(policy_loss.group_advantages(np.asarray(g.rewards)[None], scale_std))[0]
    for c, a in zip(g.completions, adv_G):
      prompts_.append(prompt_ids[g.problem.id])
      responses.append(c.token_ids)
      lps.append(c.logprobs)
      advs.append(float(a))
      truncated.append(c.finish_reason == "length")
  pad = n_rows - len(responses)
  if pad < 0:
    raise ValueError(f"{len(responses)} responses for {n_rows} rows")
  rows = rollouts.response_rows(prompts_ + [[pad_id]] * pad, responses + [[]] * pad, lps + [[]] * pad,
                                advs + [0.0] * pad, seq_len=seq_len)
  if mask_truncated:
    rows["weights"][np.asarray(truncated + [False] * pad)] = 0.0
  return rows


def sample_metrics(groups: list[Group], writer: bool, shuffled: bool = False) -> dict:
  """What the sampled responses of a step say (every group of every round; `shuffled`: the shuffled-reward
  control, see `has_signal`)."""
  completions = [c for g in groups for c in g.completions]
  lengths = np.asarray([len(c.token_ids) for c in completions])
  texts = [c.text for c in completions] if writer else []
  return {"reward_mean": float(np.mean(np.concatenate([g.rewards for g in groups]))),
          "accuracy": float(np.mean(np.concatenate([g.correct for g in groups]))),
          "zero_signal_fraction": float(np.mean([not has_signal(g, shuffled) for g in groups])),
          "truncation_rate": float(np.mean([c.finish_reason == "length" for c in completions])),
          "response_length_mean": float(lengths.mean()), "response_length_max": int(lengths.max()),
          "backtracks_per_response": float(np.mean([prompts.count_backtracks(t) for t in texts])) if texts else 0.0,
          "reflections_per_response": float(np.mean([prompts.count_reflections(t) for t in texts])) if texts else 0.0}


class CompileCounter:
  """XLA programs compiled since the last `take()` (JAX's monitoring events; one listener per process)."""
  _instance: "CompileCounter | None" = None

  def __new__(cls):
    if cls._instance is None:
      cls._instance = super().__new__(cls)
      cls._instance.n = 0
      jax.monitoring.register_event_duration_secs_listener(cls._instance._on_event)
    return cls._instance

  def _on_event(self, event: str, duration: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      self.n += 1

  def take(self) -> int:
    n, self.n = self.n, 0
    return n


class Reference:
  """The frozen start model of the KL term: its log-probs of a batch on the mesh (`Trainer.train_on`'s `prepare`),
  in the trainer's compute dtype and param sharding."""

  def __init__(self, trainer: loop.Trainer, weights: dict, *, chunk: int, temperature: float):
    self.params = trainer.placed(weights, trainer.run.jnp_dtype)
    cfg, run, sharder = trainer.cfg, trainer.run, trainer.sharder
    self._logprobs = jax.jit(lambda p, b: losses.sequence_logprobs(cfg, run, sharder, p, b, chunk=chunk,
                                                                   temperature=temperature)[0])

  def __call__(self, batch: dict) -> dict:
    batch["ref_logprobs"] = self._logprobs(self.params, batch)
    return batch


class RLLearner:
  """One RL step from injected parts (see the module docstring). `problems`/`prompt_ids`: by problem id, the ids the
  stream yields; `params`: the RL sampling (n = group_size); `evals`: {benchmark: items} scored by `evaluate` with
  `eval_params`, their summaries written to `eval_dir` (writer only); `ckpts`: where `save` writes and what the
  stop messages name."""

  def __init__(self, config: LearnerConfig, sampler: SamplerLike, trainer: loop.Trainer, pool,
               stream: rollouts.PromptStream, problems: Mapping[str, Any], prompt_ids: Mapping[str, Sequence[int]],
               params: SamplingParams, ckpts: checkpoints_lib.Checkpoints, *, reference: Reference | None = None,
               evals: Mapping[str, Sequence[Item]] | None = None, eval_params: SamplingParams | None = None,
               eval_dir: Path | None = None, writer: bool | None = None):
    if params.n != config.group_size:
      raise ValueError(f"sampling params give {params.n} samples a prompt, group_size is {config.group_size}")
    self.config, self.sampler, self.trainer, self.pool, self.stream = config, sampler, trainer, pool, stream
    self.problems, self.prompt_ids, self.params, self.ckpts = problems, prompt_ids, params, ckpts
    self.reference, self.evals, self.eval_params, self.eval_dir = reference, dict(evals or {}), eval_params, eval_dir
    self.writer = jax.process_index() == 0 if writer is None else writer
    self.empty_steps = 0  # steps in a row that kept no group
    self.compiles = CompileCounter()
    self.compiles.take()  # programs compiled before the first step are not its own

  # -- one step's parts
  def collect(self, step: int) -> Batch:
    """Sampling rounds until batch_prompts groups with a signal (dynamic sampling) or the rounds run out; rewards,
    then the training rows."""
    c = self.config
    times = {"time_sampling": 0.0, "time_scoring": 0.0}
    kept, sampled = [], []
    for round_ in range(c.max_sampling_rounds if c.dynamic_sampling else 1):
      groups = self._sample_round(times)
      self._stop_if_broken_sampler(step, groups)
      if c.shuffle_rewards:  # the control: rewards permuted across the round's responses
        flat = np.concatenate([g.rewards for g in groups])
        flat = flat[np.random.default_rng([c.seed, step, round_]).permutation(len(flat))]
        for i, g in enumerate(groups):
          g.rewards = flat[i * c.group_size:(i + 1) * c.group_size]
      sampled += groups
      kept += [g for g in groups if has_signal(g, c.shuffle_rewards)] if c.dynamic_sampling else groups
      if len(kept) >= c.batch_prompts:
        break
    kept = kept[:c.batch_prompts]
    rows = batch_rows(kept, self.prompt_ids, c.rows, c.seq_len, scale_std=c.scale_std,
                      mask_truncated=c.overlong == "mask", pad_id=c.pad_id) if kept else None
    return Batch(step, kept, sampled, round_ + 1, rows, times)

  def update(self, batch: Batch) -> dict[str, float]:
    """`minibatches` optimizer updates on disjoint parts of the batch's rows; the sums of their metrics (UPDATE_SUMS,
    and the first update's logprob_gap and tokens as gap_first, tokens_first)."""
    if batch.rows is None:  # no group had signal in any round: no update (Adam would still move the weights)
      return dict.fromkeys(UPDATE_SUMS + ("gap_first", "tokens_first"), 0.0)
    c = self.config
    per = c.rows // c.minibatches
    order = np.random.default_rng([c.seed, batch.step, 1]).permutation(c.rows)
    sums = dict.fromkeys(UPDATE_SUMS, 0.0)
    for m in range(c.minibatches):
      part = order[m * per:(m + 1) * per]
      rows = {k: batch.rows[k][part] for k in rollouts.RL_BATCH_AXES}
      if self.reference is not None:  # a placeholder, computed on device by the reference
        rows["ref_logprobs"] = np.zeros_like(rows["old_logprobs"])
      got = self.trainer.train_on(rows, prepare=self.reference)
      loop.stop_if_not_finite(batch.step, got["loss"], got["grad_norm"], self.ckpts, got["params_finite"] > 0,
                              weights_of=batch.step - 1 if m == 0 else batch.step)  # step's own are never saved
      if m == 0:
        sums["gap_first"], sums["tokens_first"] = got["logprob_gap"], got["tokens"]
      for k in UPDATE_SUMS:
        sums[k] += got[k]
    return sums

  def evaluate(self, step: int) -> dict[str, float]:
    """Each held-out benchmark scored with the sampler's current weights: eval_<metric> (eval_<name>_<metric> with
    several benchmarks); the writer also writes eval_dir/step_<step>_<name>.json, eval's summary."""
    from astro_jax.files import write_text_atomic
    row, k = {}, self.eval_params.n if self.eval_params else 0
    for name, items in self.evals.items():
      got = list(generate_and_verify(self.sampler, self.pool, items, self.eval_params,
                                     per_call=self.config.prompts_per_call, verify=self.writer))
      if not self.writer:
        continue
      summary = eval_metrics.summarize_records([v.records() for v in got])
      if self.eval_dir is not None:
        self.eval_dir.mkdir(exist_ok=True)
        write_text_atomic(self.eval_dir / f"step_{step}_{name}.json", json.dumps(summary, indent=2) + "\n")
      prefix = "eval" if len(self.evals) == 1 else f"eval_{name}"
      for metric in ("pass@1", f"maj@{k}", "mean_backtracks", "mean_response_tokens"):
        if metric in summary["metrics"]:
          row[f"{prefix}_{metric}"] = summary["metrics"][metric]["mean"]
    return row

  def step(self, step: int) -> dict:
    """Sync the sampler's weights, collect, update, evaluate when due: the step's metrics row."""
    c = self.config
    began = time.perf_counter()
    decode_before = (self.sampler.stats.tokens, self.sampler.stats.row_steps)
    self.sync_weights()
    sync = time.perf_counter() - began
    batch = self.collect(step)
    self.empty_steps = 0 if batch.kept else self.empty_steps + 1
    decoded = (self.sampler.stats.tokens - decode_before[0], self.sampler.stats.row_steps - decode_before[1])
    t_train = time.perf_counter()
    sums = self.update(batch)
    times = {**batch.times, "time_weight_sync": sync, "time_training": time.perf_counter() - t_train}
    row = {"step": step, **sample_metrics(batch.sampled, self.writer, c.shuffle_rewards), "groups": len(batch.kept),
           "sampling_rounds": batch.rounds, "finished_row_fraction": 1.0 - decoded[0] / max(decoded[1], 1),
           "entropy": sums["entropy"] / max(sums["tokens"], 1.0), "kl": sums["kl"] / max(sums["tokens"], 1.0),
           "clip_fraction": sums["clipped"] / max(sums["tokens"], 1.0),
           "grad_norm": sums["grad_norm"] / c.minibatches, "loss": sums["loss"] / c.minibatches,
           "logprob_gap": sums["gap_first"] / max(sums["tokens_first"], 1.0),
           "lr": float(self.trainer.schedule(step * c.minibatches - 1)), "tokens_trained": int(sums["tokens"])}
    if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
      self.sampler.update_weights(self.trainer.params)
      t_eval = time.perf_counter()
      row.update(self.evaluate(step))
      times["time_eval"] = time.perf_counter() - t_eval
    times["time_s"] = time.perf_counter() - began
    sampled_tokens = sum(len(x.token_ids) for g in batch.sampled for x in g.completions)
    rl_seconds = times["time_s"] - times.get("time_eval", 0.0)
    row.update(times, tokens_per_s=sampled_tokens / max(rl_seconds, 1e-9), compiles=self.compiles.take())
    return row

  def sync_weights(self) -> None:
    """The sampler takes the trainer's current params (cast and resharded on device), waited for."""
    self.sampler.update_weights(self.trainer.params)
    jax.block_until_ready(self.sampler.params)

  def save(self, step: int) -> None:
    """A checkpoint of the trainer's state and the prompt stream's position (what `resume` restores)."""
    self.ckpts.save(step, self.trainer.state, self.stream.get_state())

  # -- helpers
  def _sample_round(self, times: dict[str, float]) -> list[Group]:
    """The next batch_prompts prompts' groups, scored. Multi-host: every process samples every row; process 0
    verifies and broadcasts the verdicts."""
    c = self.config
    taken = self.stream.take(c.batch_prompts)
    items = [Item(["rl", epoch, pid], self.prompt_ids[pid], self.problems[pid].answer) for epoch, pid in taken]
    got = list(generate_and_verify(self.sampler, self.pool, items, self.params, per_call=c.prompts_per_call,
                                   verify=self.writer, times=times))
    correct_NG = np.zeros((len(taken), c.group_size), bool)
    if self.writer:
      correct_NG[:] = np.asarray([[v.correct for v in r.verdicts] for r in got], bool).reshape(correct_NG.shape)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      correct_NG = np.asarray(multihost_utils.broadcast_one_to_all(correct_NG), bool)
    groups = []
    for (epoch, pid), r, correct_G in zip(taken, got, correct_NG):
      lengths = np.asarray([len(x.token_ids) for x in r.completions])
      groups.append(Group(self.problems[pid], epoch, r.completions, correct_G, rollouts.rewards(
          correct_G, lengths, max_new_tokens=self.params.max_new_tokens, correct_reward=c.correct_reward,
          wrong_reward=c.wrong_reward, overlong=c.overlong, buffer=c.overlong_buffer, penalty=c.overlong_penalty)))
    return groups

  def _stop_if_broken_sampler(self, step: int, groups: list[Group]) -> None:
    """NonFiniteLoss if a sampled token's log-prob is not finite: the weights the sampler took (those of the last
    update) give non-finite logits. Every process samples every row, so all of them stop here together."""
    lps = np.concatenate([np.asarray(x.logprobs, np.float64) for g in groups for x in g.completions] or [[]])
    bad = int(np.count_nonzero(~np.isfinite(lps)))
    if bad:
      loop.stop_training(step, f"the sampler's log-probs are not finite ({bad} of {lps.size} sampled tokens: the "
                         f"weights give non-finite logits)", self.ckpts, gave_it=step - 1)
