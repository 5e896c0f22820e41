r"""`difficulty` stage: estimate each problem's pass rate under the start model and keep the moderately hard ones.

  python -m astro_jax.main --config=configs/difficulty_smollm2.py [--config.checkpoint=SFT_CKPT \
      --config.input=P.jsonl --config.output_dir=OUT --config.samples=16 ...]

ASTRO §3.2 runs RL on "moderately difficult" problems: a problem the start model always solves (or never solves)
gives every response of a GRPO group the same reward, hence no signal. Each problem gets `samples` responses from
the start model, rendered and sampled as the `rl` stage renders and samples them (the same `prompt.*` keys and
defaults, the same `sampling.*` defaults: T = 1, no top-p / top-k), verified like rl's rewards; its pass rate is
n_correct / samples. A problem is KEPT when keep_above < pass rate < keep_below (both bounds exclusive; the
defaults 0 and 1 keep exactly the problems solved by some but not all samples; keep_above < 0 also keeps the
never-solved, keep_below > 1 the always-solved).

Outputs in `output_dir`:
  pass_rates.jsonl  one row per problem, appended and fsynced as soon as it is verified: id, problem, answer,
                    pass_rate, n_correct, n_samples, mean_response_tokens, truncation_rate (responses cut by
                    sampling.max_new_tokens), samples (each {text, answer, correct, timed_out, n_tokens,
                    finish_reason, reflections, backtracks}, as the eval stage records them);
  prompts.jsonl     the kept problems (their input fields + pass_rate), in input order: the rl stage's `prompts`;
  summary.json      counts per band (too_hard: pass rate <= keep_above, kept, too_easy: >= keep_below), the
                    histogram of n_correct (0..samples), the mean pass rate, the eval summary of all samples
                    (pass@1, pass@k, maj@k, no-answer rate, ... with 95% CIs), truncation rate, verifier timeouts;
  run_config.json   the settings that shape the pass rates (checkpoint, tokenizer, input, samples, model, sampling,
                    prompt); output of other settings is refused unless `overwrite`.

Resume: a problem's samples are seeded by (sampling.seed, its id, sample index), so they do not depend on
batch_size, limit or where a run resumed; a killed run skips the problems already in pass_rates.jsonl. The band
(keep_above, keep_below) only shapes prompts.jsonl and summary.json, which are rebuilt on every run: rerunning with
another band re-derives them without sampling (the model is not loaded when nothing is left to sample).
Multi-host: every process samples every problem, process 0 verifies and writes; output_dir must be visible to all.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import ml_collections
from tqdm import tqdm

from astro_jax.errors import UserError
from astro_jax import config_keys
from astro_jax.config_keys import Key, Keys, all_of, at_least, changed, given, satisfies
from astro_jax.stages import common

# What shapes the pass rates: a resumed run must use the same. The band only shapes the derived outputs.
_RUN_KEYS = ("checkpoint", "tokenizer", "input", "samples", "model", "sampling", "prompt")
RESULT_FILES = ("pass_rates.jsonl", "prompts.jsonl", "summary.json")
RENAMED = {"sampling.n": "samples"}
KEYS: Keys = {
    **common.base_keys("difficulty"),
    "seed": Key(0, "not used by this stage (samples: sampling.seed)"),
    "checkpoint": Key("", "the start model of RL (the SFT checkpoint): Orbax or HF directory, or an asset "
                      "(asset:smollm2)", given("the start model (an SFT checkpoint) is required")),
    "tokenizer": common.TOKENIZER,
    "input": Key("", "JSONL with id, problem, answer per row, or a bundled benchmark (math500, amc23, aime24, gsm8k)",
                 given("name a JSONL with id, problem, answer per row, or a bundled benchmark (math500, amc23, "
                       "aime24, gsm8k)")),
    "limit": Key(-1, "the first N problems (-1: all)",
                 satisfies(lambda v: v >= -1 and v != 0, "must be >= 1, or -1 for all problems")),
    "output_dir": Key("outputs/difficulty", "pass_rates.jsonl, prompts.jsonl (rl's prompts), summary.json, "
                      "run_config.json", all_of(given("an output directory is required"), common.not_a_file)),
    "overwrite": Key(False, "replace results made with other settings"),
    "samples": Key(8, "n: responses per problem; its pass rate is n_correct / n", at_least(1)),
    # kept: keep_above < pass rate < keep_below
    "keep_above": Key(0.0, "keep problems with pass rate > this (exclusive; 0: drop the never-solved; < 0: keep "
                      "them)", satisfies(lambda v: math.isfinite(v) and v < 1,
                                     "must be a number < 1 (pass rates are in [0, 1])")),
    "keep_below": Key(1.0, "keep problems with pass rate < this (exclusive; 1: drop the always-solved; > 1: keep "
                      "them)", satisfies(lambda v: math.isfinite(v) and v > 0,
                                     "must be a number > 0 (pass rates are in [0, 1])")),
    "batch_size": Key(64, "rows (problems x samples) per sampler call; does not change results", at_least(1)),
    **common.MODEL_KEYS,
    **common.ENGINE_KEYS,
    # Rendered and sampled as rl does: its prompt.* and sampling.* defaults.
    **changed(common.RL_SAMPLING_KEYS, helps={
        "sampling.temperature": "0 = greedy; the default is rl's (the estimate is of RL's sampling)",
        "sampling.max_new_tokens": "response budget (tokens; rl's sampling.max_new_tokens); a response that reaches "
                                   "it is truncated",
        "sampling.seed": "with (problem id, sample index), all the sampling randomness",
        "sampling.top_p": "nucleus mass in (0, 1] (1 = off)", "sampling.top_k": "0 = off",
        "sampling.stop": "strings that end a completion (cut before them)"}),
    **common.prompt_keys(),
    **common.VERIFIER_KEYS,
}


def defaults() -> ml_collections.ConfigDict:
  return config_keys.defaults(KEYS)


def check(config: ml_collections.ConfigDict) -> None:
  """Config values, before anything is read or written."""
  r = common.require
  common.check_base(config, KEYS)
  lo, hi = config.keep_above, config.keep_below
  r(lo < hi, "keep_below", hi, f"must be > keep_above ({lo})")
  r(any(in_band(k / config.samples, lo, hi) for k in range(config.samples + 1)), "keep_below", hi,
    f"no pass rate k/{config.samples} lies strictly between keep_above = {lo} and keep_below = {hi}: nothing "
    f"could be kept")
  p = config.prompt
  r(not (p.example_problem and not p.example_solution.strip()), "prompt.example_solution", p.example_solution,
    "an example problem needs its solution")
  common.check_sampling(config.sampling, n=config.samples)


def in_band(pass_rate: float, keep_above: float, keep_below: float) -> bool:
  return keep_above < pass_rate < keep_below


def band(pass_rate: float, config: ml_collections.ConfigDict) -> str:
  """too_hard (<= keep_above), kept, or too_easy (>= keep_below)."""
  if pass_rate <= config.keep_above:
    return "too_hard"
  return "kept" if pass_rate < config.keep_below else "too_easy"


load_problems = common.load_input_problems  # input + limit, every problem with an answer


def problem_row(problem, samples: list[dict]) -> dict:
  """The pass_rates.jsonl row of a problem's verified samples (`generation.Verified.records`)."""
  n_correct = sum(bool(s["correct"]) for s in samples)
  return {"id": problem.id, "problem": problem.problem, "answer": problem.answer,
          "pass_rate": n_correct / len(samples), "n_correct": n_correct, "n_samples": len(samples),
          "mean_response_tokens": sum(s["n_tokens"] for s in samples) / len(samples),
          "truncation_rate": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
          "samples": samples}


def summarize(rows: list[dict], config: ml_collections.ConfigDict) -> dict:
  """summary.json: counts per band, the n_correct histogram, the mean pass rate, the eval summary."""
  from astro_jax import eval_metrics
  counts = {"too_hard": 0, "kept": 0, "too_easy": 0}
  for row in rows:
    counts[band(row["pass_rate"], config)] += 1
  n = config.samples
  histogram = {f"{k}/{n}": sum(row["n_correct"] == k for row in rows) for k in range(n + 1)}
  samples = [s for row in rows for s in row["samples"]]
  return {"problems": len(rows), "samples_per_problem": n,
          "band": {"keep_above": config.keep_above, "keep_below": config.keep_below,
                   "rule": "kept: keep_above < pass rate < keep_below"},
          **counts, "kept_fraction": counts["kept"] / len(rows),
          "mean_pass_rate": sum(row["pass_rate"] for row in rows) / len(rows),
          "n_correct_histogram": histogram,
          "truncation_rate": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
          "eval": eval_metrics.summarize_records([row["samples"] for row in rows])}


@common.stage_run
def run(config: ml_collections.ConfigDict) -> dict | None:
  """Estimate the pass rates (resumable), then write prompts.jsonl and summary.json; returns the summary."""
  from astro_jax import data, files, verifier
  from astro_jax.generation import Item, generate_and_verify
  from astro_jax.prompts import PromptConfig, search_prompt_ids

  check(config)
  problems = load_problems(config)
  ckpt, model_cfg = common.inspect_checkpoint(config)
  tokenizer = common.load_tokenizer(config, ckpt, model_cfg)
  prompt = PromptConfig(**config.prompt.to_dict())
  prompt_ids = {p.id: search_prompt_ids(tokenizer, prompt, p.problem) for p in problems}
  common.check_prompt_lengths([len(prompt_ids[p.id]) for p in problems], config.sampling.max_new_tokens,
                              model_cfg.max_position_embeddings,
                              lambda i: f"{config.input}: problem {problems[i].id!r}")
  out_dir = Path(config.output_dir)
  paths = {name: out_dir / name for name in RESULT_FILES}
  record = common.SettingsRecord(out_dir / "run_config.json",
                                 common.to_settings(config, _RUN_KEYS, ("checkpoint", "tokenizer", "input")),
                                 config.overwrite)
  common.claim_output(config)
  record.check(list(paths.values()), "output_dir")
  stale = list(paths.values())

  sharder = common.setup_mesh(config, "sample")
  writer = common.is_writer()  # multi-host: every process samples every problem, process 0 writes
  # What earlier runs finished, read before anything is written (so every process agrees on what is left).
  done: dict[str, dict] = {}
  if record.matches():
    wanted = {p.id: p for p in problems}
    for row in data.read_jsonl_rows(paths["pass_rates.jsonl"], missing_ok=True):
      p = wanted.get(row.get("id"))
      if p is not None and (row.get("problem") != p.problem or row.get("answer") != p.answer):
        raise UserError(f"{paths['pass_rates.jsonl']}: problem {p.id!r} was sampled for another problem text or "
                        f"answer than {config.input} now has; use another output_dir or --config.overwrite")
      if p is not None:
        done[p.id] = row
  todo = [p for p in problems if p.id not in done]
  common.agree_with_process_0([p.id not in done for p in problems], "problems left")
  if writer:
    out_dir.mkdir(parents=True, exist_ok=True)

  by_id = {p.id: p for p in problems}
  if todo:
    model = common.load_model(config, ckpt, sharder)
    sampler = common.make_sampler(config, model, tokenizer, sharder=sharder, max_batch=config.batch_size,
                                   dtype=config.model.dtype)
    params = common.sampling_params(config.sampling, n=config.samples)
    per_call = max(1, config.batch_size // config.samples)
    bar = tqdm(total=len(problems), initial=len(done), desc="difficulty", unit="problem", disable=not writer)
    with verifier.VerifierPool(config.verifier.workers, config.verifier.timeout_s) as pool:
      items = [Item(p.id, prompt_ids[p.id], p.answer) for p in todo]
      for got in generate_and_verify(sampler, pool, items, params, per_call=per_call, verify=writer):
        if not writer:
          continue
        record.record(stale)  # the first result: old results of other settings go now
        pid = got.item.key
        done[pid] = problem_row(by_id[pid], got.records())
        data.append_jsonl(paths["pass_rates.jsonl"], done[pid])
        bar.update(1)
        bar.set_postfix(kept=sum(in_band(r["pass_rate"], config.keep_above, config.keep_below)
                                 for r in done.values()))
    bar.close()
  if not writer:
    return None
  record.record(stale)  # nothing was left to sample: the old rows are this run's

  rows = [done[p.id] for p in problems]
  kept = [{**by_id[r["id"]].to_dict(), "pass_rate": r["pass_rate"]} for r in rows
          if in_band(r["pass_rate"], config.keep_above, config.keep_below)]
  summary = summarize(rows, config)
  data.write_jsonl_atomic(paths["prompts.jsonl"], kept)
  files.write_text_atomic(paths["summary.json"], json.dumps(summary, indent=2) + "\n")
  logging.info("wrote %s", out_dir)
  print(f"difficulty: {len(rows)} problems x {config.samples} samples; kept {summary['kept']} "
        f"({config.keep_above} < pass rate < {config.keep_below}), {summary['too_hard']} too hard, "
        f"{summary['too_easy']} too easy; mean pass rate {summary['mean_pass_rate']:.3f}; n_correct histogram "
        f"{summary['n_correct_histogram']}; rl prompts: {paths['prompts.jsonl']}")
  return summary
