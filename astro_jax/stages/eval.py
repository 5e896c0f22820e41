"""`eval` stage: sample k responses per problem, verify the final answers, summarise.

Per benchmark, `<output_dir>/<name>.jsonl` gets one row per problem as soon as it is verified (append + fsync),
so a killed run continues where it stopped. `summary.json` and `summary.md` are rewritten atomically at the end:
pass@1 (mean over the k samples), pass@k, maj@k, no-answer rate, mean response length in tokens and mean
self-reflection / backtracking markers per response, each with a 95% confidence interval over problems.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import ml_collections
from tqdm import tqdm

from astro_jax.stages import common, generate

# Settings that change results: a resumed run must use the same ones.
_RUN_KEYS = ("checkpoint", "samples", "system_prompt", "sampling")


def defaults() -> ml_collections.ConfigDict:
  c = common.base_config("eval")
  c.checkpoint = "asset:smollm2"
  c.tokenizer = ""
  c.benchmarks = "math500,amc23,aime24"  # bundled names (math500, amc23, aime24, gsm8k) or JSONL paths
  c.limit = -1                           # the first N problems of each benchmark (-1: all)
  c.samples = 1                          # k responses per problem
  c.system_prompt = ""
  c.output_dir = "outputs/eval"
  c.batch_size = 16                      # rows per sampler call (problems x k)
  c.model = common.model_config()
  c.sampling = generate.sampling_config()
  c.sampling.temperature = 0.6
  c.sampling.top_p = 0.95
  c.sampling.max_new_tokens = 1024
  c.verifier = ml_collections.ConfigDict({"workers": 2, "timeout_s": 5.0})
  return c


def benchmark_name(spec: str) -> str:
  return Path(spec).stem if spec.endswith(".jsonl") else spec


def run(config: ml_collections.ConfigDict) -> None:
  from astro_jax import data, eval_metrics, prompts, verifier
  from astro_jax.sampler import Sampler

  out_dir = Path(config.output_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  common.guard_settings(out_dir / "run_config.json", {
      k: (config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict) else config[k]) for k in _RUN_KEYS})
  specs = [s.strip() for s in config.benchmarks.split(",") if s.strip()]
  problems = {benchmark_name(s): data.load_benchmark(s) for s in specs}  # fail on bad data before loading a model
  if config.limit >= 0:
    problems = {name: ps[:config.limit] for name, ps in problems.items()}

  sharder = common.setup_mesh(config, "sample")
  model, tokenizer = common.load_model_and_tokenizer(config, sharder)
  sampler = Sampler(model, tokenizer, sharder=sharder, max_batch=config.batch_size)
  params = dataclasses.replace(generate.sampling_params(config.sampling), n=config.samples)
  per_call = max(1, config.batch_size // config.samples)
  system = config.system_prompt or None

  summaries = {}
  with verifier.VerifierPool(config.verifier.workers, config.verifier.timeout_s) as pool:
    for name, todo_all in problems.items():
      rows_path = out_dir / f"{name}.jsonl"
      done = {row["id"] for row in data.read_jsonl_rows(rows_path, missing_ok=True)}
      todo = [p for p in todo_all if p.id not in done]
      bar = tqdm(total=len(todo_all), initial=len(todo_all) - len(todo), desc=f"eval {name}", unit="problem")
      for start in range(0, len(todo), per_call):
        chunk = todo[start:start + per_call]
        prompt_ids = [tokenizer.encode_prompt(tokenizer.chat(prompts.math_messages(p.problem, system)))
                      for p in chunk]
        results = sampler.generate(prompt_ids, params)
        texts = [c.text for completions in results for c in completions]
        golds = [p.answer for p, completions in zip(chunk, results) for _ in completions]
        verdicts = iter(pool.verify(texts, golds))
        for p, completions in zip(chunk, results):
          samples = []
          for c in completions:
            v = next(verdicts)
            samples.append({"text": c.text, "answer": v.answer, "correct": v.correct, "timed_out": v.timed_out,
                            "n_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                            "reflections": prompts.count_reflections(c.text),
                            "backtracks": prompts.count_backtracks(c.text)})
          data.append_jsonl(rows_path, {"id": p.id, "benchmark": name, "gold": p.answer, "samples": samples})
          bar.update(1)
      bar.close()
      wanted = {p.id for p in todo_all}
      rows = [r for r in data.read_jsonl_rows(rows_path) if r["id"] in wanted]
      per_problem = [[eval_metrics.Sample(s["correct"], s["answer"], s["n_tokens"], s["reflections"])
                      for s in r["samples"]] for r in rows]
      summaries[name] = eval_metrics.summarize(per_problem)
      summaries[name]["verifier_timeouts"] = sum(s["timed_out"] for r in rows for s in r["samples"])

  data.write_text_atomic(out_dir / "summary.json", json.dumps(summaries, indent=2) + "\n")
  markdown = "\n".join(eval_metrics.summary_markdown(s, title=name) for name, s in summaries.items())
  data.write_text_atomic(out_dir / "summary.md", markdown)
  print(markdown)
  logging.info("wrote %s", out_dir)
