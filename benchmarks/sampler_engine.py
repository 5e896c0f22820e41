"""The static sampler against the continuous engine, side by side in one run, on search and RL workloads.

  python benchmarks/sampler_engine.py [--problems 8 64] [--workloads mcts rl] [--random-weights --hf-dir DIR]

Workloads (the real SmolLM2-135M-Instruct by default; each timed after an untimed warm-up of the same shape, so
compilation is excluded; the same seeds for both engines):
  mcts  the search of benchmarks/mcts.py (k = 2 children, M = 2 rollouts, 2 iterations, 48-token steps, 128-token
        rollouts, 64 rows a program) over 8 and 64 one/two-step word problems; the engine keeps finished rows as
        prefixes (children and rollouts continue their parent's keys/values).
  rl    configs/rl_smollm2.py's rollouts: 4 prompts x G = 4 responses a step (16 rows a program), T = 0.7, 128 new
        tokens, the few-shot search prompt, 3 steps of different prompts.

Per row: tokens sampled, wall seconds, tokens/s, live_row_fraction (decoded row-steps that produced a token; the
engine counts every slot of every step), prefill tokens requested and computed (reuse = 1 - computed/requested),
peak KV cache bytes (the engine: slots + prefix pool), and for mcts whether both engines built the same trees.
Targets (issue 21): live rows >= 90% and >= 2x static tokens/s on mcts at 64 problems.
Results: printed, and merged into benchmarks/results/sampler_engine.json (this device's rows of the workloads
and sizes run replaced, every other row kept).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from astro_jax import verifier
from astro_jax.checkpoint import load_hf_model
from astro_jax.engine import Engine
from astro_jax.prompts import PromptConfig
from astro_jax.sampler import Request, Sampler, SamplingParams
from astro_jax.search import mcts
from astro_jax.search.policy import LMPolicy
from astro_jax.tokenizer import Tokenizer
from mcts import make_problems  # benchmarks/mcts.py
from sampler import benchmark_checkpoint, code_version, device_name, write_rows  # benchmarks/sampler.py

RESULTS = Path(__file__).parent / "results" / "sampler_engine.json"


def make(engine: str, model, tokenizer, max_batch: int, dtype: str, keep: bool):
  if engine == "static":
    return Sampler(model, tokenizer, max_batch=max_batch, dtype=dtype)
  return Engine(model, tokenizer, max_batch=max_batch, dtype=dtype, keep_completions=keep)


def measure(sampler, run) -> dict:
  """Run `run()` and the sampler's counts over it."""
  before = dict(vars(sampler.stats))
  began = time.perf_counter()
  extra = run()
  wall = time.perf_counter() - began
  d = {k: v - before[k] for k, v in vars(sampler.stats).items()}
  return {"tokens": d["tokens"], "rows": d["rows"], "wall_s": wall, "tokens_per_s": d["tokens"] / wall,
          "live_row_fraction": d["tokens"] / d["row_steps"] if d["row_steps"] else 1.0,
          "prefill_tokens": d["prefill_tokens"], "prefill_computed": d["prefill_computed"],
          "prefill_reuse": 1 - d["prefill_computed"] / max(1, d["prefill_tokens"]),
          "peak_cache_bytes": getattr(sampler, "peak_cache_bytes", 0), **extra}


def mcts_workload(sampler, problems: list[dict], pool) -> dict:
  policy = LMPolicy(sampler)
  cfg = mcts.SearchConfig(k=2, rollouts=2, iterations=2, max_depth=8, temperature=0.7, step_max_tokens=48,
                          rollout_max_tokens=128)
  out = {}

  def run():
    results, _ = mcts.search(problems, policy, mcts.MemoJudge(mcts.pool_judge(pool)), cfg)
    out["trees"] = results
    return {"solved": sum(any(t.tree.correct[i] for i in range(len(t.tree))) for t in results) / len(results)}
  run()  # warm-up: this shape's programs compile
  sampler.forget_prefixes()  # no reuse of the warm-up's prefixes
  row = measure(sampler, run)
  row["signature"] = json.dumps([[(n["parent"], n["text"]) for n in t.tree.to_record(0, "", "")["nodes"]]
                                 for t in out["trees"]])
  return row


def rl_workload(sampler, problems: list[dict], steps: int = 3) -> dict:
  from astro_jax.prompts import search_prompt_ids
  prompt = PromptConfig()
  ids = [search_prompt_ids(sampler.tokenizer, prompt, p["problem"]) for p in problems]
  params = SamplingParams(temperature=0.7, max_new_tokens=128, n=4, seed=0)
  got = []

  def run():
    got.clear()
    for s in range(steps):
      batch = range(4 * s, 4 * s + 4)
      got.append([[c.token_ids for c in o] for o in sampler.sample([Request(ids[i], params, key=[s, i]) for i in batch])])
    return {}
  run()
  sampler.forget_prefixes()
  row = measure(sampler, run)
  row["signature"] = json.dumps(got)
  return row


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--problems", type=int, nargs="+", default=[8, 64])
  ap.add_argument("--workloads", nargs="+", default=["mcts", "rl"], choices=["mcts", "rl"])
  ap.add_argument("--engines", nargs="+", default=["static", "continuous"])
  ap.add_argument("--hf-dir", default=None, help="HF checkpoint (default: the cached SmolLM2-135M-Instruct)")
  ap.add_argument("--random-weights", action="store_true", help="--hf-dir's config and tokenizer, random weights")
  ap.add_argument("--dtype", default="", help="sampler dtype (default: float32 on a CPU, bfloat16 on a GPU)")
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  hf_dir, model_name = benchmark_checkpoint(args.hf_dir, args.random_weights)
  dtype = args.dtype or ("bfloat16" if jax.devices()[0].platform == "gpu" else "float32")
  model = load_hf_model(hf_dir, param_dtype=dtype)
  tokenizer = Tokenizer.load(hf_dir, extra_eos_ids=model.cfg.eos_token_ids)
  device, commit = device_name(), code_version()
  rows = []
  with verifier.VerifierPool(2) as pool:
    for workload in args.workloads:
      for n in (args.problems if workload == "mcts" else [12]):
        problems = make_problems(n)
        signatures = {}
        for engine in args.engines:
          max_batch = 64 if workload == "mcts" else 16
          sampler = make(engine, model, tokenizer, max_batch, dtype, keep=workload == "mcts")
          row = (mcts_workload(sampler, problems, pool) if workload == "mcts" else rl_workload(sampler, problems))
          signatures[engine] = row.pop("signature")
          row = {"device": device, "commit": commit, "model": model_name, "dtype": dtype, "workload": workload,
                 "problems": n, "engine": engine, "max_batch": max_batch, **row}
          rows.append(row)
          print(json.dumps(row), flush=True)
          del sampler
        if len(signatures) == 2:
          same = len(set(signatures.values())) == 1
          for row in rows[-2:]:
            row["same_results"] = same
  base = {(r["workload"], r["problems"]): r for r in rows if r["engine"] == "static"}
  for r in rows:
    b = base.get((r["workload"], r["problems"]))
    r["speedup"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None

  columns = ("workload", "problems", "engine", "tokens", "wall_s", "tokens_per_s", "speedup", "live_row_fraction",
             "prefill_tokens", "prefill_computed", "peak_cache_bytes", "same_results")
  print(f"\n{device} ({commit}); {dtype} {model_name}")
  print("| " + " | ".join(columns) + " |\n|" + "---:|" * len(columns))
  for row in rows:
    print("| " + " | ".join(f"{row.get(c):.3g}" if isinstance(row.get(c), float) else str(row.get(c))
                            for c in columns) + " |")
  write_rows(Path(args.out), rows, device, same=("workload", "problems"))


if __name__ == "__main__":
  main()
