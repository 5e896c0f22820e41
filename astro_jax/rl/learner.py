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
- `update(batch) -> sums`: `minibatches` optimizer steps (`Trainer.put_rows`, `Trainer.step_on`) on disjoint parts
  of the responses assigned by (seed, step), as padded rows or packed into rows of `train_tokens` (with
  `shared_prompts` each group's prompt once; a step that needs more rows spills into another micro-batch); with a `Reference` its log-probs are computed on device for the
  KL term, with TIS and several minibatches a `Proximal` takes the step-start log-probs before the first update.
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
TIS_SUMS = ("tis_weight", "tis_capped")  # summed over the updates (0 without TIS)
FIRST_SUMS_OF = ("logprob_gap", "tokens", "mismatch_abs", "mismatch_max", "mismatch_k3", "mismatch_out")
FIRST_SUMS = tuple(f"{k}_first" for k in FIRST_SUMS_OF)  # the first update's: its weights sampled the batch
LAYOUT_SUMS = ("spilled_micro_batches", "packed_fill")


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
  grad_accum: int = 1           # micro-batches per update
  train_tokens: int = 0         # packed rows of this many tokens (0: one response a row of seq_len, padded)
  shared_prompts: bool = False  # packed with a group's prompt once (rollouts.shared_prompt_rows)
  packed_rows: int = 0          # packed rows per micro-batch (with train_tokens)
  targets_per_row: int = 0      # response tokens a row at most: the head runs only there (0: at every position)
  tis: bool = False             # the loss weights tokens by truncated importance sampling (loss.tis_cap > 0)
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
    R, max_new = config.reward, config.sampling.max_new_tokens
    seq_len = config.max_prompt_tokens + max_new
    rows_per_micro = config.batch_prompts * config.group_size // config.minibatches // config.grad_accum
    shared = bool(config.train_tokens and config.share_prompts)
    return cls(batch_prompts=config.batch_prompts, group_size=config.group_size, seq_len=seq_len,
               steps=config.steps, seed=config.seed, minibatches=config.minibatches,
               dynamic_sampling=config.dynamic_sampling, max_sampling_rounds=config.max_sampling_rounds,
               prompts_per_call=max(1, config.sampler.max_batch // config.group_size), grad_accum=config.grad_accum,
               train_tokens=config.train_tokens, shared_prompts=shared,
               packed_rows=rollouts.packed_rows(config.packed_rows, rows_per_micro, config.max_prompt_tokens, max_new,
                                                config.train_tokens, config.group_size if shared else 0)
               if config.train_tokens else 0,
               targets_per_row=rollouts.targets_per_row(max_new, seq_len, config.train_tokens,
                                                        config.group_size if shared else 0),
               tis=config.loss.tis_cap > 0,
               scale_std=config.loss.scale_std, correct_reward=R.correct, wrong_reward=R.wrong, overlong=R.overlong,
               overlong_buffer=R.overlong_buffer, overlong_penalty=R.overlong_penalty, shuffle_rewards=R.shuffle,
               eval_every=config.eval.every, pad_id=pad_id)

  @property
  def rows(self) -> int:
    """Responses (padded training rows) per step: batch_prompts x group_size."""
    return self.batch_prompts * self.group_size

  @property
  def packed(self) -> bool:
    return self.train_tokens > 0

  @property
  def update_rows(self) -> int:
    """Training rows of one optimizer update (packed: unless it spills)."""
    return self.packed_rows * self.grad_accum if self.packed else self.rows // self.minibatches

  @property
  def update_seq_len(self) -> int:
    return self.train_tokens if self.packed else self.seq_len

  def batch_axes(self, reference: bool = False) -> dict[str, tuple[str, ...]]:
    """The logical axes of the update's inputs: packed or padded rows, the reference's log-probs (KL term), the
    step-start log-probs of TIS when later minibatches need them."""
    return rollouts.rl_batch_axes(packed=self.packed, shared=self.shared_prompts, ref=reference,
                                  prox=self.tis and self.minibatches > 1)


@dataclasses.dataclass
class Group:
  """One prompt's G responses and their scores."""
  problem: Any
  epoch: int
  completions: list
  correct: np.ndarray   # [G] bool (the verifier's verdicts)
  rewards: np.ndarray   # [G] float (shaped; shuffled in the control)


@dataclasses.dataclass
class Responses:
  """A step's responses, one entry per padded training row (rows past the kept groups: empty, out of the loss)."""
  prompts: list[Sequence[int]]
  tokens: list[Sequence[int]]
  logprobs: list[Sequence[float]]
  advantages: np.ndarray  # [N] float32
  in_loss: np.ndarray     # [N] bool: False for filler rows and, under reward.overlong = mask, truncated responses

  def take(self, part: Sequence[int]) -> tuple[list, list, list, np.ndarray, np.ndarray]:
    return ([self.prompts[i] for i in part], [self.tokens[i] for i in part], [self.logprobs[i] for i in part],
            self.advantages[part], self.in_loss[part])


@dataclasses.dataclass
class Batch:
  """What `collect` gathered for one step."""
  step: int
  kept: list[Group]                    # the groups trained on (<= batch_prompts)
  sampled: list[Group]                 # every group sampled in the step, all rounds (the metrics')
  rounds: int
  rows: dict[str, np.ndarray] | None   # the padded training rows (batch_rows); None when no group was kept
  times: dict[str, float]              # time_sampling, time_scoring
  responses: Responses | None = None   # the same responses as lists (what packed updates pack)


def has_signal(group: Group, shuffled: bool = False) -> bool:
  """Whether a group teaches anything (dynamic sampling keeps it; zero_signal_fraction counts the others): some of
  its responses right and some wrong. Decided on the verdicts, not on the shaped rewards: with reward.overlong =
  penalty four wrong answers of different lengths get different rewards, and std scaling would turn that length gap
  into full-size advantages (+-0.87 for two short, two long). In the shuffled-reward control (`shuffled`) the
  rewards no longer belong to the responses, so there signal is on the permuted rewards (any two differ): the
  control keeps training, on noise, which is its point."""
  return rollouts.has_signal(group.rewards if shuffled else group.correct)


def responses_of(groups: list[Group], prompt_ids: Mapping[str, Sequence[int]], n_rows: int, *,
                 scale_std: bool = True, mask_truncated: bool = False, pad_id: int = 0) -> Responses:
  """The step's responses with their group-relative advantages, `n_rows` entries (the filler past the groups, a
  batch dynamic sampling could not fill, is out of the loss); truncated responses out of the loss when
  `mask_truncated`."""
  out = Responses([], [], [], np.zeros(n_rows, np.float32), np.zeros(n_rows, bool))
  for g in groups:
    adv_G = np.asarray(policy_loss.group_advantages(np.asarray(g.rewards)[None], scale_std))[0]
    for c, a in zip(g.completions, adv_G):
      i = len(out.tokens)
      if i == n_rows:
        raise ValueError(f"more responses than {n_rows} rows")
      out.prompts.append(prompt_ids[g.problem.id])
      out.tokens.append(c.token_ids)
      out.logprobs.append(c.logprobs)
      out.advantages[i] = a
      out.in_loss[i] = not (mask_truncated and c.finish_reason == "length")
  pad = n_rows - len(out.tokens)
  out.prompts += [[pad_id]] * pad
  out.tokens += [[]] * pad
  out.logprobs += [[]] * pad
  return out


def batch_rows(groups: list[Group], prompt_ids: Mapping[str, Sequence[int]], n_rows: int, seq_len: int, *,
               scale_std: bool = True, mask_truncated: bool = False, pad_id: int = 0) -> dict[str, np.ndarray]:
  """The step's padded training rows (`responses_of`, one a row of seq_len): responses out of the loss weigh 0."""
  r = responses_of(groups, prompt_ids, n_rows, scale_std=scale_std, mask_truncated=mask_truncated, pad_id=pad_id)
  rows = rollouts.response_rows(r.prompts, r.tokens, r.logprobs, r.advantages, seq_len=seq_len)
  rows["weights"][~r.in_loss] = 0.0
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


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
  """The rollout/trainer mismatch of a step, per response token of its first update (whose weights sampled the
  batch: the gap is the sampler's numerics, not training): logprob_gap = mismatch_logprob_mean, mean |log p_sampler
  - log p_trainer|; mismatch_logprob_max; mismatch_kl_k3, the k3 estimate of KL(sampler || trainer);
  mismatch_ratio_out_fraction, tokens whose ratio p_trainer / p_sampler leaves [1/2, 2]."""
  n = max(sums["tokens_first"], 1.0)
  mean = sums["logprob_gap_first"] / n
  return {"logprob_gap": mean, "mismatch_logprob_mean": sums["mismatch_abs_first"] / n,
          "mismatch_logprob_max": sums["mismatch_max_first"], "mismatch_kl_k3": sums["mismatch_k3_first"] / n,
          "mismatch_ratio_out_fraction": sums["mismatch_out_first"] / n}


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
  """The frozen start model of the KL term: its log-probs of a placed batch, as batch["ref_logprobs"] (a
  `Trainer.train_on` `prepare`), in the trainer's compute dtype and param sharding."""
  key = "ref_logprobs"

  def __init__(self, trainer: loop.Trainer, weights: dict | None, *, chunk: int, temperature: float):
    self.trainer = trainer
    self.params = None if weights is None else trainer.placed(weights, trainer.run.jnp_dtype)
    cfg, run, sharder = trainer.cfg, trainer.run, trainer.sharder
    self._logprobs = jax.jit(lambda p, b: losses.sequence_logprobs(cfg, run, sharder, p, b, chunk=chunk,
                                                                   temperature=temperature)[0])

  def __call__(self, batch: dict) -> dict:
    batch[self.key] = self._logprobs(self.trainer.params if self.params is None else self.params, batch)
    return batch


class Proximal(Reference):
  """TIS's proximal policy: the trainer's log-probs at its weights when called (`update` calls it on every
  minibatch before the first optimizer update: the weights that sampled the batch), as batch["prox_logprobs"]."""
  key = "prox_logprobs"

  def __init__(self, trainer: loop.Trainer, *, chunk: int, temperature: float):
    super().__init__(trainer, None, chunk=chunk, temperature=temperature)


class RLLearner:
  """One RL step from injected parts (see the module docstring). `problems`/`prompt_ids`: by problem id, the ids the
  stream yields; `params`: the RL sampling (n = group_size); `evals`: {benchmark: items} scored by `evaluate` with
  `eval_params`, their summaries written to `eval_dir` (writer only); `ckpts`: where `save` writes and what the
  stop messages name."""

  def __init__(self, config: LearnerConfig, sampler: SamplerLike, trainer: loop.Trainer, pool,
               stream: rollouts.PromptStream, problems: Mapping[str, Any], prompt_ids: Mapping[str, Sequence[int]],
               params: SamplingParams, ckpts: checkpoints_lib.Checkpoints, *, reference: Reference | None = None,
               proximal: Proximal | None = None, evals: Mapping[str, Sequence[Item]] | None = None, eval_params: SamplingParams | None = None,
               eval_dir: Path | None = None, writer: bool | None = None):
    if params.n != config.group_size:
      raise ValueError(f"sampling params give {params.n} samples a prompt, group_size is {config.group_size}")
    self.config, self.sampler, self.trainer, self.pool, self.stream = config, sampler, trainer, pool, stream
    self.problems, self.prompt_ids, self.params, self.ckpts = problems, prompt_ids, params, ckpts
    self.reference, self.proximal = reference, proximal
    self.evals, self.eval_params, self.eval_dir = dict(evals or {}), eval_params, eval_dir
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
    if not kept:
      return Batch(step, kept, sampled, round_ + 1, None, times)
    r = responses_of(kept, self.prompt_ids, c.rows, scale_std=c.scale_std, mask_truncated=c.overlong == "mask",
                     pad_id=c.pad_id)
    rows = rollouts.response_rows(r.prompts, r.tokens, r.logprobs, r.advantages, seq_len=c.seq_len)
    rows["weights"][~r.in_loss] = 0.0
    return Batch(step, kept, sampled, round_ + 1, rows, times, r)

  def update(self, batch: Batch) -> dict[str, float]:
    """`minibatches` optimizer updates on disjoint parts of the batch's responses (padded rows, or packed into rows
    of train_tokens); the sums of their metrics (UPDATE_SUMS; the first update's, whose weights sampled the batch:
    logprob_gap, the rollout/trainer mismatch sums and tokens as *_first; TIS's weight sums; spilled micro-batches
    and packed fill)."""
    if batch.rows is None:  # no group had signal in any round: no update (Adam would still move the weights)
      return dict.fromkeys(UPDATE_SUMS + TIS_SUMS + FIRST_SUMS + LAYOUT_SUMS, 0.0)
    c = self.config
    per = c.rows // c.minibatches
    order = np.random.default_rng([c.seed, batch.step, 1]).permutation(c.rows)
    sums = dict.fromkeys(UPDATE_SUMS + TIS_SUMS + LAYOUT_SUMS, 0.0)
    placed = []  # every minibatch on the mesh first: TIS's step-start log-probs need the weights before update 1
    for m in range(c.minibatches):
      rows, info = self.training_rows(batch, order[m * per:(m + 1) * per])
      sums["spilled_micro_batches"] += info["spilled"]
      sums["packed_fill"] += info["fill"] / c.minibatches
      placed.append(self.reference(self.trainer.put_rows(rows)) if self.reference else self.trainer.put_rows(rows))
    if self.proximal is not None:
      placed = [self.proximal(b) for b in placed]
    for m, b in enumerate(placed):
      got = self.trainer.step_on(b)
      loop.stop_if_not_finite(batch.step, got["loss"], got["grad_norm"], self.ckpts, got["params_finite"] > 0,
                              weights_of=batch.step - 1 if m == 0 else batch.step)  # step's own are never saved
      if got.get("targets_dropped", 0.0):
        raise RuntimeError(f"step {batch.step}: {got['targets_dropped']:.0f} response tokens fell outside the "
                           f"head's {c.targets_per_row} positions a row")
      if m == 0:
        sums |= {f"{k}_first": got[k] for k in FIRST_SUMS_OF}
      for k in UPDATE_SUMS + TIS_SUMS:
        sums[k] += got.get(k, 0.0)
    return sums

  def training_rows(self, batch: Batch, part: Sequence[int]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The rows of one update on the responses `part` (indices into the batch's rows): the padded rows, or the
    responses packed (`rollouts.packed_response_rows`, or `shared_prompt_rows` with a group's prompt once: a step
    whose tokens need more rows than packed_rows x grad_accum spills into more micro-batches); (rows, {spilled,
    fill})."""
    c = self.config
    if not c.packed:
      rows = {k: v[part] for k, v in batch.rows.items()}
      return rows, {"spilled": 0, "fill": float(rows["segment_ids"].astype(bool).mean())}
    prompts_, tokens, logprobs, advantages, in_loss = batch.responses.take(part)
    pack = rollouts.shared_prompt_rows if c.shared_prompts else rollouts.packed_response_rows
    rows, info = pack(prompts_, tokens, logprobs, advantages, train_tokens=c.train_tokens, rows_per_micro=c.packed_rows,
                      micro_batches=c.grad_accum, in_loss=in_loss, targets_per_row=c.targets_per_row or None)
    return rows, info

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
           "lr": float(self.trainer.schedule(step * c.minibatches - 1)), "tokens_trained": int(sums["tokens"]),
           **mismatch_metrics(sums), "spilled_micro_batches": int(sums["spilled_micro_batches"]),
           "packed_fill": sums["packed_fill"]}
    if c.tis:
      row |= {"tis_weight_mean": sums["tis_weight"] / max(sums["tokens"], 1.0),
              "tis_capped_fraction": sums["tis_capped"] / max(sums["tokens"], 1.0)}
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
