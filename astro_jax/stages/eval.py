"""`eval` stage: sample k responses per problem, verify the final answers, summarise.

Per benchmark, `<output_dir>/<name>.jsonl` gets one row per problem as soon as it is verified (append + fsync),
so a killed run continues where it stopped. `summary.json` and `summary.md` are rewritten atomically at the end:
pass@1 (mean over the k samples), pass@k, maj@k, no-answer rate, mean response length in tokens and mean
self-reflection / backtracking markers per response, each with a 95% confidence interval over problems.
`run_config.json` records the settings that shape results; a directory holding results of other settings is
refused unless `overwrite`. A problem's k samples are seeded by (sampling.seed, problem id, sample index), so they
do not depend on batch_size, limit or where a run resumed. k is `samples` (there is no sampling.n here).
The prompt is `prompt.*`, rendered as the rl and difficulty stages render theirs (`search.policy.PromptConfig`:
[system], [a worked example as an earlier chat turn], the problem + instruction); the default, zero-shot with the
ASTRO instruction, is `prompts.math_messages`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_collections
from tqdm import tqdm

from astro_jax.stages import common, generate

# Settings that change results: a resumed run must use the same ones.
_RUN_KEYS = ("checkpoint", "tokenizer", "samples", "prompt", "sampling")
_INPUT_KEYS = ("checkpoint", "tokenizer", "benchmarks")  # recorded as resolved paths + content fingerprints
RENAMED = {"sampling.n": "samples", "system_prompt": "prompt.system"}  # other spellings (of other stages, or older)
SAMPLING_HELP = {k: v for k, v in generate.SAMPLING_HELP.items() if k not in RENAMED}

HELP = {
    "benchmarks": "comma-separated: math500, amc23, aime24, gsm8k, or JSONL paths (id, problem, answer)",
    "limit": "the first N problems of each benchmark (-1: all)",
    "samples": "k responses per problem (pass@k, maj@k)",
    "prompt.instruction": "appended to every problem",
    "prompt.example_problem": "a worked example's problem as an earlier chat turn (\"\": zero-shot)",
    "prompt.example_solution": "the example's solution (steps, a boxed final answer)",
    "prompt.system": "system message before each problem (\"\": none)",
    "output_dir": "per-benchmark rows, summary.json, summary.md, run_config.json",
    "overwrite": "replace results made with other settings",
    "batch_size": "rows (problems x samples) per sampler call; does not change results",
}


def defaults() -> ml_collections.ConfigDict:
  c = common.base_config("eval")
  c.checkpoint = "asset:smollm2"
  c.tokenizer = ""
  c.benchmarks = "math500,amc23,aime24"  # bundled names (math500, amc23, aime24, gsm8k) or JSONL paths
  c.limit = -1                           # the first N problems of each benchmark (-1: all)
  c.samples = 1                          # k responses per problem
  c.prompt = prompt_config()
  c.output_dir = "outputs/eval"
  c.overwrite = False
  c.batch_size = 16                      # rows per sampler call (problems x k)
  c.model = common.model_config()
  c.sampling = generate.sampling_config()
  del c.sampling["n"]                    # k is `samples`
  c.sampling.temperature = 0.6
  c.sampling.top_p = 0.95
  c.sampling.max_new_tokens = 1024
  c.verifier = common.verifier_config()
  return c


def prompt_config() -> ml_collections.ConfigDict:
  """The prompt (as rl and difficulty render theirs, `search.policy.PromptConfig`); the default is zero-shot with the
  ASTRO instruction, exactly `prompts.math_messages`."""
  from astro_jax import prompts
  return ml_collections.ConfigDict({"instruction": prompts.ASTRO_INSTRUCTION, "example_problem": "",
                                    "example_solution": "", "system": ""})


def settings(config: ml_collections.ConfigDict) -> dict:
  """What run_config.json records. The default prompt is recorded as before the prompt.* keys (`system_prompt`), so
  results written then still resume."""
  values = common.to_settings(config, _RUN_KEYS, _INPUT_KEYS)
  if values["prompt"] == {**prompt_config().to_dict(), "system": config.prompt.system}:
    values["system_prompt"] = values.pop("prompt")["system"]
  return values


def benchmark_name(spec: str) -> str:
  return Path(spec).stem if spec.endswith(".jsonl") else spec


def check(config: ml_collections.ConfigDict) -> None:
  """Config values, before anything is read or written."""
  common.check_base(config)
  common.require(bool(benchmark_specs(config)), "benchmarks", config.benchmarks, "name at least one benchmark")
  common.require(config.limit >= -1, "limit", config.limit, "must be >= 0, or -1 for all problems")
  common.require(config.samples >= 1, "samples", config.samples, "must be >= 1")
  common.require(config.batch_size >= 1, "batch_size", config.batch_size, "must be >= 1")
  common.require(bool(config.output_dir), "output_dir", config.output_dir, "an output directory is required")
  common.check_verifier(config)
  common.check_sampling(config.sampling, n=config.samples)
  p = config.prompt
  common.require(not (p.example_problem and not p.example_solution.strip()), "prompt.example_solution",
                 p.example_solution, "an example problem needs its solution")


def benchmark_specs(config: ml_collections.ConfigDict) -> list[str]:
  return [s.strip() for s in config.benchmarks.split(",") if s.strip()]


def load_problems(config: ml_collections.ConfigDict) -> dict:
  """{benchmark name: problems (the first `limit`)}; a missing or malformed benchmark is named."""
  problems = {}
  for spec in benchmark_specs(config):
    name = benchmark_name(spec)
    common.require(name not in problems, "benchmarks", config.benchmarks, f"{name!r} appears twice")
    loaded = common.load_problems(spec, "benchmarks")
    problems[name] = loaded[:config.limit] if config.limit >= 0 else loaded
  return problems


@common.stage_run
def run(config: ml_collections.ConfigDict) -> None:
  from astro_jax import data, eval_metrics, files, verifier
  from astro_jax.sampler import Sampler
  from astro_jax.search.policy import PromptConfig, search_prompt_ids

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
  sampler = Sampler(model, tokenizer, sharder=sharder, max_batch=config.batch_size,
                    dtype=config.model.dtype)
  params = generate.sampling_params(config.sampling, n=config.samples)
  per_call = max(1, config.batch_size // config.samples)
  if writer:
    out_dir.mkdir(parents=True, exist_ok=True)

  golds = {name: {p.id: p.answer for p in ps} for name, ps in problems.items()}
  summaries = {}
  with verifier.VerifierPool(config.verifier.workers, config.verifier.timeout_s) as pool:
    for name, todo_all in problems.items():
      rows_path = out_dir / f"{name}.jsonl"
      todo = [p for p in todo_all if p.id not in done[name]]
      bar = tqdm(total=len(todo_all), initial=len(todo_all) - len(todo), desc=f"eval {name}", unit="problem",
                 disable=not writer)
      for p, samples in score(sampler, pool, [(p.id, prompt_ids[name, p.id], p.answer) for p in todo], params,
                              per_call, writer, on_first=lambda: record.record(stale)):
        data.append_jsonl(rows_path, {"id": p, "benchmark": name, "gold": golds[name][p], "samples": samples})
        bar.update(1)
      bar.close()
      if not writer:
        continue
      record.record(stale)  # nothing was left to sample: the old rows are this run's
      wanted = {p.id for p in todo_all}
      rows = [r for r in data.read_jsonl_rows(rows_path, missing_ok=True) if r["id"] in wanted]
      summaries[name] = summarize([r["samples"] for r in rows])

  if not writer:
    return
  files.write_text_atomic(out_dir / "summary.json", json.dumps(summaries, indent=2) + "\n")
  markdown = "\n".join(eval_metrics.summary_markdown(s, title=name) for name, s in summaries.items())
  files.write_text_atomic(out_dir / "summary.md", markdown)
  print(markdown)
  logging.info("wrote %s", out_dir)


def score(sampler, pool, items: list[tuple[Any, list[int], str]], params, per_call: int, writer: bool = True,
          on_first: Callable[[], None] | None = None) -> Iterator[tuple[Any, list[dict] | None]]:
  """Sample and verify: items are (key, prompt ids, gold); `per_call` items a sampler call (params.n samples
  each, seeded by the key). Yields (key, samples) per item, each sample {text, answer, correct, timed_out,
  n_tokens, finish_reason, reflections, backtracks}. Multi-host: every process samples (call on all of them);
  only the writer verifies and yields (`on_first` runs once before its first result)."""
  from astro_jax import prompts
  for start in range(0, len(items), per_call):
    chunk = items[start:start + per_call]
    results = sampler.generate([ids for _, ids, _ in chunk], params, keys=[key for key, _, _ in chunk])
    if not writer:
      continue
    if on_first is not None and start == 0:
      on_first()
    verdicts = iter(pool.verify([c.text for completions in results for c in completions],
                                [gold for (_, _, gold), completions in zip(chunk, results) for _ in completions]))
    for (key, _, _), completions in zip(chunk, results):
      samples = []
      for c in completions:
        v = next(verdicts)
        samples.append({"text": c.text, "answer": v.answer, "correct": v.correct, "timed_out": v.timed_out,
                        "n_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                        "reflections": prompts.count_reflections(c.text),
                        "backtracks": prompts.count_backtracks(c.text)})
      yield key, samples


def summarize(sample_lists: list[list[dict]]) -> dict:
  """The eval summary (eval_metrics.summarize) of each problem's samples, as `score` gives them."""
  from astro_jax import eval_metrics
  per_problem = [[eval_metrics.Sample(s["correct"], s["answer"], s["n_tokens"], s["reflections"],
                                      s.get("backtracks", 0)) for s in samples] for samples in sample_lists]
  out = eval_metrics.summarize(per_problem)
  out["verifier_timeouts"] = sum(s["timed_out"] for samples in sample_lists for s in samples)
  return out
