"""Batched MCTS throughput on the real SmolLM2-135M-Instruct: 1, 8 and 64 problems searched at once.

  python benchmarks/mcts.py [--problems 1 8 64] [--k 2] [--rollouts 2] [--iterations 2] [--max-batch 64]
                            [--engine continuous|static]

Per problem count, one search over that many one- and two-step arithmetic word problems (generated from fixed
templates, the level SmolLM2 solves with the few-shot search prompt), after an untimed warm-up search of the same
shape (compilation). Reported, per row:

  calls_per_round    sampler calls per round (one for the expansions of all trees, one for all rollouts):
                     must not grow with the number of problems
  expansions_per_s   expanded leaves per second of wall time
  rollouts_per_s     rollout continuations per second
  tokens_per_s       tokens sampled per second (proposals and rollouts)
  sampler_fraction   fraction of the wall time spent inside `Sampler.sample` (target >= 0.9: the host, i.e. tree
                     bookkeeping, verification and tokenization, is never the bottleneck)
  live_row_fraction  fraction of decoded row-steps that belonged to rows still running: rows that finish early
                     (a short step, an early EOS) idle until the longest row of their batch stops

Results: printed, and merged into benchmarks/results/mcts.json (rows of this device replaced, others kept).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from astro_jax import verifier
from astro_jax.checkpoint import load_hf_model
from astro_jax.engine import ENGINES, make_sampler
from astro_jax.search import mcts
from astro_jax.search.policy import LMPolicy
from astro_jax.tokenizer import Tokenizer
from sampler import benchmark_checkpoint, code_version, device_name, write_rows  # benchmarks/sampler.py (this script's directory)

RESULTS = Path(__file__).parent / "results" / "mcts.json"
NAMES = ("Sam", "Mia", "Ali", "Zoe", "Ben", "Ivy", "Tom", "Ana")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards")


def make_problems(n: int) -> list[dict]:
  """n distinct one- or two-step word problems with their answers (deterministic)."""
  out = []
  for i in range(n):
    name, item = NAMES[i % len(NAMES)], ITEMS[(i // len(NAMES)) % len(ITEMS)]
    a, b, c = 3 + i % 7, 2 + (i * 3) % 5, 2 + i % 3
    kind = i % 3
    if kind == 0:
      text, answer = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?", a + b
    elif kind == 1:
      text, answer = f"There are {c} bags with {a} {item} in each bag. How many {item} are there in total?", a * c
    else:
      text = (f"{name} has {a + b + c} {item}, gives {b} to a friend and then {c} to a sister. "
              f"How many {item} are left?")
      answer = a
    out.append({"id": f"bench/{i}", "problem": text, "answer": str(answer)})
  return out


def run_search(policy: LMPolicy, judge, problems: list[dict], cfg: mcts.SearchConfig) -> dict:
  sampler = policy.sampler
  before = dict(vars(sampler.stats))
  began = time.perf_counter()
  results, rounds = mcts.search(problems, policy, judge, cfg)
  wall = time.perf_counter() - began
  delta = {k: v - before[k] for k, v in vars(sampler.stats).items()}
  return {
      "problems": len(problems),
      "rounds": len(rounds),
      "calls_per_round": max(r.policy_calls for r in rounds),
      "expansions": sum(r.expansions for r in rounds),
      "rollouts": sum(r.rollout_rows for r in rounds),
      "tokens": delta["tokens"],
      "wall_s": wall,
      "sampler_s": delta["seconds"],
      "expansions_per_s": sum(r.expansions for r in rounds) / wall,
      "rollouts_per_s": sum(r.rollout_rows for r in rounds) / wall,
      "tokens_per_s": delta["tokens"] / wall,
      "sampler_fraction": delta["seconds"] / wall,
      "live_row_fraction": delta["tokens"] / delta["row_steps"] if delta["row_steps"] else 1.0,
      "solved": sum(any(t.tree.correct[i] for i in range(len(t.tree))) for t in results) / len(results),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--problems", type=int, nargs="+", default=[1, 8, 64])
  parser.add_argument("--k", type=int, default=2)
  parser.add_argument("--rollouts", type=int, default=2)
  parser.add_argument("--iterations", type=int, default=2)
  parser.add_argument("--max-batch", type=int, default=64)
  parser.add_argument("--step-tokens", type=int, default=48)
  parser.add_argument("--rollout-tokens", type=int, default=128)
  parser.add_argument("--hf-dir", default=None, help="HF checkpoint (default: the cached SmolLM2-135M-Instruct)")
  parser.add_argument("--random-weights", action="store_true",
                      help="--hf-dir's config and tokenizer with random weights (e.g. on a remote GPU; nothing is "
                      "solved and every step runs to --step-tokens, so this times the search's machinery only)")
  parser.add_argument("--dtype", default="", help="sampler dtype (default: float32 on a CPU, bfloat16 on a GPU)")
  parser.add_argument("--engine", default="continuous", choices=ENGINES, help="the sampler (static: batches to "
                      "their longest row; continuous: slots refilled, parents' prefixes kept)")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()

  hf_dir, model_name = benchmark_checkpoint(args.hf_dir, args.random_weights)
  dtype = args.dtype or ("bfloat16" if jax.devices()[0].platform == "gpu" else "float32")
  model = load_hf_model(hf_dir, param_dtype=dtype)
  sampler = make_sampler(args.engine, model, Tokenizer.load(hf_dir, extra_eos_ids=model.cfg.eos_token_ids),
                         max_batch=args.max_batch, dtype=dtype, keep_completions=True)
  policy = LMPolicy(sampler)
  cfg = mcts.SearchConfig(k=args.k, rollouts=args.rollouts, iterations=args.iterations, max_depth=8,
                          temperature=0.7, step_max_tokens=args.step_tokens, rollout_max_tokens=args.rollout_tokens)
  device, commit = device_name(), code_version()
  rows = []
  with verifier.VerifierPool(2) as pool:
    judge = mcts.MemoJudge(mcts.pool_judge(pool))
    for n in args.problems:
      problems = make_problems(n)
      run_search(policy, judge, problems, cfg)  # warm-up: compiles this shape's programs
      sampler.forget_prefixes()  # the timed search reuses none of the warm-up's
      row = {"device": device, "commit": commit, "model": model_name, "dtype": dtype, "engine": args.engine,
             "k": cfg.k, "M": cfg.rollouts,
             "iterations": cfg.iterations, "max_batch": args.max_batch,
             **run_search(policy, mcts.MemoJudge(mcts.pool_judge(pool)), problems, cfg)}
      rows.append(row)
      print(json.dumps(row), flush=True)

  columns = ("problems", "calls_per_round", "expansions_per_s", "rollouts_per_s", "tokens_per_s",
             "sampler_fraction", "live_row_fraction", "wall_s")
  print(f"\n{device} ({commit}); k={cfg.k}, M={cfg.rollouts}, {cfg.iterations} iterations, {dtype} {model_name}")
  print("| " + " | ".join(columns) + " |\n|" + "---:|" * len(columns))
  for row in rows:
    print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
  write_rows(Path(args.out), rows, device)


if __name__ == "__main__":
  main()
