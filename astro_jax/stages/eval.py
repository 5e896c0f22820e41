"""`eval` stage: sample k responses per problem, verify the final answers, summarise.

Per benchmark, `<output_dir>/<name>.jsonl` gets one row per problem as soon as it is verified (append + fsync),
so a killed run continues where it stopped. `summary.json` and `summary.md` are rewritten atomically at the end:
pass@1 (mean over the k samples), pass@k, maj@k, no-answer rate, mean response length in tokens and mean
self-reflection / backtracking markers per response, each with a 95% confidence interval over problems.
`run_config.json` records the settings that shape results; a directory holding results of other settings is
refused unless `overwrite`. A problem's k samples are seeded by (sampling.seed, problem id, sample index), so they
do not depend on batch_size, limit or where a run resumed. k is `samples` (there is no sampling.n here).
The prompt is `prompt.*`, rendered as the rl and difficulty stages render theirs (`prompts.PromptConfig`:
[system], [a worked example as an earlier chat turn], the problem + instruction); the default, zero-shot with the
ASTRO instruction, is `prompts.math_messages`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import ml_collections
from tqdm import tqdm

from astro_jax import config_keys
from astro_jax.config_keys import Key, Keys, at_least, changed, given, satisfies
from astro_jax.stages import common

# Settings that change results: a resumed run must use the same ones.
_RUN_KEYS = ("checkpoint", "tokenizer", "samples", "prompt", "sampling")
_INPUT_KEYS = ("checkpoint", "tokenizer", "benchmarks")  # recorded as resolved paths + content fingerprints
RENAMED = {"sampling.n": "samples", "system_prompt": "prompt.system"}  # other spellings (of other stages, or older)
KEYS: Keys = {
    **common.base_keys("eval"),
    "checkpoint": dataclasses.replace(common.CHECKPOINT, default="asset:smollm2"),
    "tokenizer": common.TOKENIZER,
    "benchmarks": Key("math500,amc23,aime24", "comma-separated: math500, amc23, aime24, gsm8k, or JSONL paths (id, "
                      "problem, answer)", satisfies(lambda v: bool(common.benchmark_specs(v)),
                                                    "name at least one benchmark")),
    "limit": Key(-1, "the first N problems of each benchmark (-1: all)",
                 satisfies(lambda v: v >= -1, "must be >= 0, or -1 for all problems")),
    "samples": Key(1, "k responses per problem (pass@k, maj@k)", at_least(1)),
    **changed(common.prompt_keys(), helps={"prompt.system": "system message before each problem (\"\": none)"}),
    "output_dir": Key("outputs/eval", "per-benchmark rows, summary.json, summary.md, run_config.json",
                      given("an output directory is required")),
    "overwrite": Key(False, "replace results made with other settings"),
    "batch_size": Key(16, "rows (problems x samples) per sampler call; does not change results", at_least(1)),
    **common.MODEL_KEYS,
    **common.ENGINE_KEYS,
    **changed(common.SAMPLING_KEYS, drop=("sampling.n",),  # k is `samples`
              defaults={"sampling.temperature": 0.6, "sampling.top_p": 0.95, "sampling.max_new_tokens": 1024}),
    **common.VERIFIER_KEYS,
}


def defaults() -> ml_collections.ConfigDict:
  return config_keys.defaults(KEYS)


def settings(config: ml_collections.ConfigDict) -> dict:
  """What run_config.json records. The default prompt is recorded as before the prompt.* keys (`system_prompt`), so
  results written then still resume."""
  values = common.to_settings(config, _RUN_KEYS, _INPUT_KEYS)
  if values["prompt"] == {**defaults().prompt.to_dict(), "system": config.prompt.system}:
    values["system_prompt"] = values.pop("prompt")["system"]
  return values


def check(config: ml_collections.ConfigDict) -> None:
  """Config values, before anything is read or written."""
  common.check_base(config, KEYS)
  common.check_sampling(config.sampling, n=config.samples)
  p = config.prompt
  common.require(not (p.example_problem and not p.example_solution.strip()), "prompt.example_solution",
                 p.example_solution, "an example problem needs its solution")


def benchmark_specs(config: ml_collections.ConfigDict) -> list[str]:
  return common.benchmark_specs(config.benchmarks)


benchmark_name = common.benchmark_name


def load_problems(config: ml_collections.ConfigDict) -> dict:
  """{benchmark name: problems (the first `limit`)}; a missing or malformed benchmark is named."""
  return common.load_benchmarks(config.benchmarks, config.limit)


@common.stage_run
def run(config: ml_collections.ConfigDict) -> None:
  from astro_jax import data, eval_metrics, files, verifier
  from astro_jax.generation import Item, generate_and_verify
  from astro_jax.prompts import PromptConfig, search_prompt_ids

  check(config)
  problems = load_problems(config)
  ckpt, model_cfg = common.inspect_checkpoint(config)
  tokenizer = common.load_tokenizer(config, ckpt, model_cfg)
  prompt = PromptConfig(**config.prompt.to_dict())
  prompt_ids = {(name, p.id): search_prompt_ids(tokenizer, prompt, p.problem) for name, ps in problems.items()
                for p in ps}
  keys = list(prompt_ids)
  common.check_prompt_lengths([len(prompt_ids[k]) for k in keys], config.sampling.max_new_tokens,
                              model_cfg.max_position_embeddings, lambda i: f"benchmark {keys[i][0]}, problem "
                              f"{keys[i][1]!r}")
  out_dir = Path(config.output_dir)
  record = common.SettingsRecord(out_dir / "run_config.json", settings(config), config.overwrite)
  common.claim_output(config)
  results = [out_dir / f"{name}.jsonl" for name in problems] + [out_dir / "summary.json"]
  record.check(results, "output_dir")
  stale = results + [out_dir / "summary.md"]

  sharder = common.setup_mesh(config, "sample")
  writer = common.is_writer()  # multi-host: every process samples every row, process 0 writes
  # What earlier runs finished, read before anything is written (so every process agrees on what is left).
  done = {name: {row["id"] for row in data.read_jsonl_rows(out_dir / f"{name}.jsonl", missing_ok=True)}
          if record.matches() else set() for name in problems}
  model = common.load_model(config, ckpt, sharder)
  sampler = common.make_sampler(config, model, tokenizer, sharder=sharder, max_batch=config.batch_size,
                                dtype=config.model.dtype)
  params = common.sampling_params(config.sampling, n=config.samples)
  per_call = max(1, config.batch_size // config.samples)
  if writer:
    out_dir.mkdir(parents=True, exist_ok=True)

  summaries = {}
  with verifier.VerifierPool(config.verifier.workers, config.verifier.timeout_s) as pool:
    for name, todo_all in problems.items():
      rows_path = out_dir / f"{name}.jsonl"
      todo = [p for p in todo_all if p.id not in done[name]]
      bar = tqdm(total=len(todo_all), initial=len(todo_all) - len(todo), desc=f"eval {name}", unit="problem",
                 disable=not writer)
      items = [Item(p.id, prompt_ids[name, p.id], p.answer) for p in todo]
      for got in generate_and_verify(sampler, pool, items, params, per_call=per_call, verify=writer):
        if writer:
          record.record(stale)  # the first result: old results of other settings go now
          data.append_jsonl(rows_path, {"id": got.item.key, "benchmark": name, "gold": got.item.gold,
                                        "samples": got.records()})
          bar.update(1)
      bar.close()
      if not writer:
        continue
      record.record(stale)  # nothing was left to sample: the old rows are this run's
      wanted = {p.id for p in todo_all}
      rows = [r for r in data.read_jsonl_rows(rows_path, missing_ok=True) if r["id"] in wanted]
      summaries[name] = eval_metrics.summarize_records([r["samples"] for r in rows])

  if not writer:
    return
  files.write_text_atomic(out_dir / "summary.json", json.dumps(summaries, indent=2) + "\n")
  markdown = "\n".join(eval_metrics.summary_markdown(s, title=name) for name, s in summaries.items())
  files.write_text_atomic(out_dir / "summary.md", markdown)
  print(markdown)
  logging.info("wrote %s", out_dir)

