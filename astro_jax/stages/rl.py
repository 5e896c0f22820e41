r"""`rl` stage: RL with verifiable rewards (the GRPO family) on one mesh and one set of weights.

  python -m astro_jax.main --config=configs/rl_8b.py [--config.checkpoint=SFT_CKPT --config.prompts=P.jsonl \
      --config.output_dir=RUN --config.steps=N --config.resume=true ...]

One step (ASTRO §3.2: reward +1 / -1 for a right / wrong final answer, G = 4 responses per prompt):
  1. the sampler takes the trainer's current params (`Sampler.update_weights`: cast to `sampler.dtype`, resharded
     with the sample rules, on device; the same program every step);
  2. `batch_prompts` prompts from the seeded stream, `group_size` responses each (one request per prompt: the G
     rows share its prefill), `sampler.max_batch` rows a program; each chunk's responses are verified in a
     thread on the long-lived VerifierPool while the next chunk decodes;
  3. rewards (`reward.*`: DAPO's overlong penalty, or truncated responses masked out of the loss), group-relative
     advantages (`loss.scale_std`); with `dynamic_sampling` groups whose responses are all right or all wrong
     (no signal, whatever their overlong penalties: `has_signal`) are dropped and another round of
     `batch_prompts` prompts is sampled, up to `max_sampling_rounds`: the batch always has batch_prompts x
     group_size rows (fixed shapes; rows a short step could not fill weigh 0);
  4. `minibatches` optimizer updates on disjoint parts of the batch (each `grad_accum` micro-batches), the clipped
     ratio against the sampler's own log-probs (`loss.*`); with `loss.beta` > 0 a frozen reference (the start
     checkpoint) adds a k3 KL term (beta = 0: no reference is held); `loss.tis_cap` > 0: token-level truncated
     importance sampling against the sampler/trainer mismatch. Rows: one response a row (padded), or with
     `train_tokens` > 0 the responses packed into `packed_rows` rows of train_tokens a micro-batch (more rows
     spill into another micro-batch; `share_prompts`: a group's prompt once, its responses after it); either way
     the head runs only at response positions.
This module checks the config and wires the parts (`run`: config -> objects -> loop -> outputs); the step itself is
`astro_jax.rl.learner.RLLearner` (`collect`, `update`, `evaluate`), responses are sampled and verified by
`astro_jax.generation.generate_and_verify`.

Stops (one line naming the step and the last good checkpoint; no checkpoint or HF export after them): a loss,
gradient norm, updated weights or sampled log-probs that are not finite (NonFiniteLoss); and, with
dynamic_sampling, `max_empty_steps` steps in a row that keep no group (every group all right or all wrong: a broken
model trains on nothing), after the last of those steps' metrics rows.

Randomness: a prompt's G samples are seeded by (sampling.seed, its epoch, its id); the prompt order by (seed,
epoch); minibatch assignment and the shuffled-reward control by (seed, step). Nothing depends on the batch a prompt
landed in, the mesh, or where a run resumed.

Run directory (`output_dir`):
  run_config.json      the settings that shape the run, inputs as path + content fingerprint (a resumed run must
                       have the same, but for the learning rate and schedule: such changes are listed in `changes`)
  metrics.jsonl        one row per step: step, reward_mean, accuracy (over every response sampled in the step, all
                       rounds), zero_signal_fraction (of the sampled groups), truncation_rate, response_length_mean,
                       response_length_max (tokens), backtracks_per_response, reflections_per_response, entropy,
                       kl, clip_fraction, logprob_gap (mean |sampler - trainer| log-prob per token, first update),
                       mismatch_logprob_mean (= logprob_gap), mismatch_logprob_max, mismatch_kl_k3,
                       mismatch_ratio_out_fraction (tokens whose ratio leaves [1/2, 2]; all of the first update),
                       tis_weight_mean, tis_capped_fraction (with loss.tis_cap), spilled_micro_batches,
                       packed_fill (real tokens / token slots of the update rows),
                       loss, grad_norm (means over the updates), lr, groups, sampling_rounds,
                       finished_row_fraction (of the decoded row-steps, those of rows that had already finished:
                       a batch decodes until its longest row stops), tokens_per_s (sampled tokens per second of
                       the step, eval excluded), time_sampling, time_scoring (the verifier's busy time, mostly
                       overlapped with sampling), time_training, time_weight_sync, time_s, compiles (XLA programs
                       compiled during the step: 0 after the first steps); + eval_* every eval.every steps
  eval/step_N_<benchmark>.json   the eval summary at step N (pass@1, maj@k, mean backtracks, ...; the eval stage's)
  tensorboard/, rl.png the same as TensorBoard events; the curves, at the end
  checkpoints/<step>/  Orbax: params, optimizer state, step + the prompt stream's position
  hf/                  the final weights as a HF checkpoint

Resume (`resume=true`): from the newest checkpoint that restores; metrics rows after it are redone, and the run
continues exactly as the uninterrupted one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import ml_collections

from astro_jax import config_keys
from astro_jax.config_keys import Key, Keys, above, at_least, changed, finite, given, one_of, satisfies, within
from astro_jax.errors import UserError
from astro_jax.stages import common
from astro_jax.train import config as train_config
from astro_jax.train import policy_loss, rollouts

# What shapes the run's numbers: a resumed run must have the same.
_RUN_KEYS = ("checkpoint", "tokenizer", "prompts", "seed", "steps", "batch_prompts", "group_size", "minibatches",
             "grad_accum", "max_prompt_tokens", "train_tokens", "share_prompts", "packed_rows", "loss_chunk",
             "dynamic_sampling", "max_sampling_rounds", "model", "optimizer", "sampling", "loss", "reward", "prompt",
             "eval")
_INPUT_KEYS = ("checkpoint", "tokenizer", "prompts", "eval.benchmarks")  # recorded as paths + content fingerprints

_GROUP = "advantages are relative to the group"
KEYS: Keys = {
    **common.base_keys("rl"),
    "seed": Key(0, "prompt order, minibatch assignment and the shuffled-reward control (samples: sampling.seed)"),
    "checkpoint": Key("", "the start model (the SFT checkpoint): Orbax or HF directory, a training run's step "
                      "(RUN/checkpoints/N), or an asset (asset:smollm2); required",
                      given("a start checkpoint is required")),
    "tokenizer": common.TOKENIZER,
    "prompts": Key("", "JSONL of problems (id, problem, answer), e.g. the difficulty stage's prompts.jsonl; required",
                   given("a JSONL of problems (id, problem, answer) is required")),
    "steps": Key(100, "RL steps (each: sample, score, update)", at_least(1)),
    "batch_prompts": Key(32, "prompt groups per step (all processes together)", at_least(1)),
    "group_size": Key(4, "G: responses per prompt", at_least(2, _GROUP)),
    "minibatches": Key(1, "optimizer updates per step, each on batch_prompts x group_size / minibatches rows"),
    **changed(train_config.LOOP_KEYS, defaults={"save_every": 10}),
    "max_prompt_tokens": Key(512, "longest prompt (tokens); rows are max_prompt_tokens + sampling.max_new_tokens long",
                             at_least(1)),
    "train_tokens": Key(0, "pack the update's (prompt + response) sequences into rows of N tokens (0: one response a "
                        "row of max_prompt_tokens + sampling.max_new_tokens, padded); >= that sum"),
    "share_prompts": Key(True, "with train_tokens: a group's prompt packed once, its responses after it (each sees "
                         "the prompt, not its siblings): the same loss, G - 1 fewer prompt copies through the model"),
    "packed_rows": Key(0, "with train_tokens: packed rows per micro-batch (0: room for its responses at half the "
                       "budget); a step that needs more spills into another micro-batch (metric spilled_micro_batches)",
                       at_least(0, "0: sized from the budget")),
    "loss_chunk": Key(512, "positions whose logits are computed at once in the loss", at_least(1)),
    "dynamic_sampling": Key(True, "drop groups whose responses are all right or all wrong and sample more prompts to "
                            "refill the batch"),
    "max_sampling_rounds": Key(3, "most sampling rounds per step with dynamic_sampling (rows left unfilled weigh 0)",
                               at_least(1)),
    "max_empty_steps": Key(3, "stop after this many steps in a row that keep no group (dynamic_sampling: all right "
                           "or all wrong; the model may be broken)", at_least(1)),
    **changed(train_config.MODEL_KEYS,
              helps={"model.dtype": "the trainer's compute dtype (matmuls and activations): float32 or bfloat16"}),
    "sampler.dtype": Key("float32", "the sampler's weights and compute: float32 or bfloat16 (cast from the trained "
                         "params)", one_of(common.DTYPES)),
    "sampler.cache_dtype": Key("", "KV cache dtype (\"\": sampler.dtype)", one_of(common.DTYPES, blank_ok=True)),
    "sampler.max_batch": Key(64, "rows (prompts x G) per sampler program; does not change results"),
    **common.ENGINE_KEYS,
    **changed(common.RL_SAMPLING_KEYS, checks={"sampling.temperature": above(
        0, "RL samples; greedy responses have no log-probs to train on")}),
    "loss.aggregation": Key("token-mean", "token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum-norm "
                            "(Dr. GRPO)", one_of(policy_loss.AGGREGATIONS)),
    "loss.eps_low": Key(0.2, "clip the ratio below at 1 - eps_low", within(0, 1, upper_open=True)),
    "loss.eps_high": Key(0.28, "clip the ratio above at 1 + eps_high (DAPO's clip-higher: 0.28)", at_least(0)),
    "loss.scale_std": Key(True, "divide advantages by the group's std (GRPO; Dr. GRPO: false)"),
    "loss.beta": Key(0.0, "k3 KL coefficient to the frozen start model (0: no reference model is held)",
                     finite(at_least(0, "0: no KL term"))),
    "loss.tis_cap": Key(0.0, "token-level truncated importance sampling: weight each token by min(p_trainer / "
                        "p_sampler, cap) (0: off; else >= 1)",
                        satisfies(lambda v: v == 0 or (v >= 1 and math.isfinite(v)),
                                  "must be 0 (off) or a finite number >= 1")),
    "reward.correct": Key(1.0, "reward of a correct final answer", finite()),
    "reward.wrong": Key(-1.0, "reward of a wrong or missing one", finite()),
    "reward.overlong": Key("none", "truncated responses: none, mask (out of the loss), penalty (DAPO's soft overlong "
                           "penalty)", one_of(rollouts.OVERLONG)),
    "reward.overlong_buffer": Key(0, "penalty: the last N tokens of the budget, over which the penalty ramps up"),
    "reward.overlong_penalty": Key(1.0, "penalty: its size at the budget", finite()),
    "reward.shuffle": Key(False, "control experiment: permute the rewards across each round's responses (learning "
                          "is noise)"),
    **common.prompt_keys(),
    "eval.every": Key(0, "evaluate every N steps and at the end (0: never)", at_least(0, "0: never")),
    "eval.benchmarks": Key("", "comma-separated: math500, amc23, aime24, gsm8k, or JSONL paths"),
    "eval.limit": Key(-1, "the first N problems of each benchmark (-1: all)",
                      satisfies(lambda v: v >= -1, "must be >= 0, or -1 for all problems")),
    "eval.samples": Key(4, "k responses per problem (pass@1 averaged over k, maj@k)", at_least(1)),
    "eval.temperature": Key(0.6, "eval sampling temperature", at_least(0)),
    "eval.top_p": Key(0.95, "eval nucleus mass", satisfies(lambda v: 0 < v <= 1, "must be in (0, 1]")),
    "eval.max_new_tokens": Key(0, "eval response budget (0: sampling.max_new_tokens)",
                               at_least(0, "0: sampling.max_new_tokens")),
    **common.VERIFIER_KEYS,
    **changed(train_config.OPTIMIZER_KEYS, defaults={"optimizer.lr": 1e-6, "optimizer.schedule": "constant",
                                                     "optimizer.warmup_fraction": 0.0}),
}


def defaults() -> ml_collections.ConfigDict:
  return config_keys.defaults(KEYS)


def rows_per_update(config: ml_collections.ConfigDict) -> int:
  return config.batch_prompts * config.group_size // config.minibatches


def update_rows_from(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(config keys, their values) that make `rows_per_update`, for messages."""
  values = f"{config.batch_prompts} x {config.group_size} / {config.minibatches}"
  return "batch_prompts x group_size / minibatches", values


def seq_len(config: ml_collections.ConfigDict) -> int:
  """Tokens per training row: the longest prompt plus the response budget."""
  return config.max_prompt_tokens + config.sampling.max_new_tokens


def check(config: ml_collections.ConfigDict) -> None:
  """Each key's own check (KEYS), then what relates several keys."""
  common.check_base(config, KEYS)
  r = common.require
  r((config.batch_prompts * config.group_size) % config.minibatches == 0 and config.minibatches >= 1,
    "minibatches", config.minibatches,
    f"must be >= 1 and divide batch_prompts x group_size = {config.batch_prompts * config.group_size}")
  train_config.check_train(config, rows_per_update(config), update_rows_from(config))
  r(config.sampler.max_batch >= config.group_size, "sampler.max_batch", config.sampler.max_batch,
    f"must hold one prompt's group (>= group_size = {config.group_size})")
  common.check_sampling(config.sampling, n=config.group_size)
  r(config.train_tokens == 0 or config.train_tokens >= seq_len(config), "train_tokens", config.train_tokens,
    f"must be 0 (padded rows) or >= max_prompt_tokens + sampling.max_new_tokens = {seq_len(config)} (a whole "
    f"response fits a row)")
  R = config.reward
  r(R.correct > R.wrong, "reward.correct", R.correct, f"must be > reward.wrong ({R.wrong})")
  r(0 <= R.overlong_buffer <= config.sampling.max_new_tokens, "reward.overlong_buffer", R.overlong_buffer,
    f"must be in [0, sampling.max_new_tokens = {config.sampling.max_new_tokens}]")
  r(not (R.overlong == "penalty" and R.overlong_buffer == 0), "reward.overlong_buffer", R.overlong_buffer,
    "must be > 0 with reward.overlong = penalty")
  E = config.eval
  r(not (E.every and not E.benchmarks.strip()), "eval.benchmarks", E.benchmarks, "name a benchmark for eval.every")


def make_trainer(config: ml_collections.ConfigDict, model_cfg, sharder):
  """The trainer of this config: one optimizer update = rows_per_update rows of seq_len tokens (packed:
  packed_rows x grad_accum rows of train_tokens), the RL loss with the head at the response positions only."""
  from astro_jax.rl.learner import LearnerConfig
  from astro_jax.train import loop, rollouts
  L, lc = config.loss, LearnerConfig.from_config(config)
  temperature, max_len = config.sampling.temperature, config.sampling.max_new_tokens

  def loss_fn(cfg, run, shard, params, batch):
    return rollouts.rl_loss(cfg, run, shard, params, batch, chunk=config.loss_chunk, temperature=temperature,
                            eps_low=L.eps_low, eps_high=L.eps_high, aggregation=L.aggregation, max_len=max_len,
                            beta=L.beta, tis_cap=L.tis_cap or None, targets_per_row=lc.targets_per_row)
  batch_from = (("packed_rows x grad_accum", f"{lc.packed_rows} x {config.grad_accum}") if lc.packed
                else update_rows_from(config))
  return loop.Trainer.create(config, model_cfg, sharder, config.steps * config.minibatches, loss_fn,
                             batch_size=lc.update_rows, seq_len=lc.update_seq_len,
                             batch_axes=lc.batch_axes(reference=L.beta > 0), batch_from=batch_from)


RL_CURVES = (("reward_mean", "reward"), ("accuracy", "accuracy", "eval_pass@1"),
             ("response_length_mean", "response tokens", "eval_mean_response_tokens"),
             ("backtracks_per_response", "backtracks / response", "eval_mean_backtracks"),
             ("entropy", "entropy (nats / token)"), ("clip_fraction", "clipped tokens"))


@common.stage_run
def run(config: ml_collections.ConfigDict, *, make_sampler: Callable | None = None) -> None:
  """Wiring: config -> checked inputs -> trainer, sampler, learner -> the loop -> outputs. `make_sampler(cfg,
  tokenizer, **settings)` builds the sampler (default `Sampler`; benchmarks/rl_step.py passes a timed one)."""
  from tqdm import tqdm

  from astro_jax import checkpoint, verifier
  from astro_jax.generation import Item
  from astro_jax.prompts import PromptConfig, search_prompt_ids
  from astro_jax.rl.learner import LearnerConfig, Proximal, Reference, RLLearner
  from astro_jax.sampler import SamplingParams
  from astro_jax.sharding import Sharder
  from astro_jax.train import loop, rollouts
  from astro_jax.train import metrics as metrics_lib

  # Inputs, checked before any work: prompts, eval benchmarks, checkpoint, prompt lengths, the run directory.
  check(config)
  problems = common.load_problems(config.prompts, "prompts")
  by_id = {p.id: p for p in problems}
  common.require(len(by_id) == len(problems), "prompts", config.prompts, "problem ids must be unique")
  eval_problems = common.load_benchmarks(config.eval.benchmarks, config.eval.limit) if config.eval.every else {}
  ckpt, model_cfg = common.inspect_checkpoint(config)
  tokenizer = common.load_tokenizer(config, ckpt, model_cfg)
  prompt = PromptConfig(**config.prompt.to_dict())
  prompt_ids = {p.id: search_prompt_ids(tokenizer, prompt, p.problem) for p in problems}
  for p in problems:
    if len(prompt_ids[p.id]) > config.max_prompt_tokens:
      raise UserError(f"{config.prompts}: problem {p.id!r}: its prompt is {len(prompt_ids[p.id])} tokens > "
                      f"max_prompt_tokens {config.max_prompt_tokens}")
  common.require(seq_len(config) <= model_cfg.max_position_embeddings, "max_prompt_tokens", config.max_prompt_tokens,
                 f"+ sampling.max_new_tokens = {seq_len(config)} > the model's context of "
                 f"{model_cfg.max_position_embeddings} positions")
  eval_budget = config.eval.max_new_tokens or config.sampling.max_new_tokens
  evals = {name: [Item(p.id, search_prompt_ids(tokenizer, prompt, p.problem), p.answer) for p in ps]
           for name, ps in eval_problems.items()}
  where = [(name, it.key) for name, items in evals.items() for it in items]
  common.check_prompt_lengths([len(it.prompt_ids) for items in evals.values() for it in items], eval_budget,
                              model_cfg.max_position_embeddings,
                              lambda i: f"eval benchmark {where[i][0]}, problem {where[i][1]!r}")
  out, record, replaced = common.prepare_run_dir(config, common.to_settings(config, _RUN_KEYS, _INPUT_KEYS))

  # Objects: trainer (+ resume), reference, sampler.
  sharder = common.setup_mesh(config, "train")
  writer = common.is_writer()
  trainer = make_trainer(config, model_cfg, sharder)
  stream = rollouts.PromptStream([p.id for p in problems], config.seed)
  ckpts, start = trainer.start_or_resume(config, out, record, stream, on_first_save=replaced)
  reference = None
  if start == 0 or config.loss.beta:
    start_weights = checkpoint.load_model(ckpt, sharder=sharder).weights()
    if start == 0:
      trainer.load_params(start_weights)
    if config.loss.beta:
      reference = Reference(trainer, start_weights, chunk=config.loss_chunk, temperature=config.sampling.temperature)
    del start_weights
  lc = LearnerConfig.from_config(config, tokenizer.pad_id)
  proximal = (Proximal(trainer, chunk=config.loss_chunk, temperature=config.sampling.temperature)
              if lc.tis and lc.minibatches > 1 else None)
  settings = dict(sharder=Sharder.create(sharder.mesh, "sample"), max_batch=config.sampler.max_batch,
                  dtype=config.sampler.dtype, cache_dtype=config.sampler.cache_dtype or None)
  sampler = (make_sampler(trainer.cfg, tokenizer, **settings) if make_sampler else
             common.make_sampler(config, trainer.cfg, tokenizer, **settings))
  S = config.sampling
  params = SamplingParams(temperature=S.temperature, top_p=S.top_p, top_k=S.top_k, max_new_tokens=S.max_new_tokens,
                          n=config.group_size, stop=tuple(s for s in S.stop if s), seed=S.seed)
  eval_params = SamplingParams(temperature=config.eval.temperature, top_p=config.eval.top_p,
                               max_new_tokens=eval_budget, n=config.eval.samples, seed=S.seed)

  # The loop: a step, its checkpoint, its metrics row.
  log = metrics_lib.MetricsLog(out, start) if writer else None
  bar = tqdm(total=config.steps, initial=start, desc="rl", unit="step", disable=not writer, dynamic_ncols=True)
  try:
    with verifier.VerifierPool(config.verifier.workers, config.verifier.timeout_s) as pool:
      learner = RLLearner(lc, sampler, trainer, pool, stream, by_id, prompt_ids, params, ckpts, reference=reference,
                          proximal=proximal, evals=evals, eval_params=eval_params, eval_dir=out / "eval",
                          writer=writer)
      for step in range(start + 1, config.steps + 1):
        row = learner.step(step)
        give_up = learner.empty_steps >= config.max_empty_steps
        if not give_up and (step % config.save_every == 0 or step == config.steps):
          learner.save(step)
        if log is not None:
          log.write(row)
        if give_up:  # after the row: metrics.jsonl shows why (groups 0, zero_signal_fraction 1)
          loop.stop_training(step, f"no group with a reward signal for {learner.empty_steps} steps in a row (all "
                             f"right or all wrong); the model may be broken", ckpts, UserError)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}")
    ckpts.wait()
  finally:
    bar.close()
    ckpts.close()
    if log is not None:
      log.close()

  # Outputs: the curves, the final weights as HF, a summary line.
  rows_out = metrics_lib.read_rows(out / "metrics.jsonl")
  if writer:
    metrics_lib.plot_panels(rows_out, RL_CURVES, out / "rl.png", title=f"rl: {Path(config.prompts).name}")
  if config.export_hf:
    trainer.export_hf(ckpt, out / "hf", tokenizer_dir=config.tokenizer or None)
  if writer and rows_out:
    first, last = rows_out[0], rows_out[-1]
    print(f"rl: {config.steps} steps; accuracy {first['accuracy']:.3f} (step {first['step']}) -> "
          f"{last['accuracy']:.3f} (step {last['step']}); run directory {out}")
