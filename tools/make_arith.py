#!/usr/bin/env python3
r"""Write arithmetic word problems of 1-4 steps as a seeded train/test split (astro_jax.datasets.arith).

  python tools/make_arith.py --out DIR [--train 2000] [--test 200] [--levels 1,2,3,4] [--seed 0]

Writes DIR/train.jsonl and DIR/test.jsonl (each written atomically): --train and --test problems PER LEVEL, rows
{id: arith/L<k>/<split>/<index>, problem, answer, level, expression}, levels in order. No problem text is in both
files (nor the worked example of the search prompt). Same arguments, same files; a level's problems depend only
on (seed, level), and the test problems not on --train. Prints the counts per level.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from astro_jax.data import write_jsonl_atomic  # noqa: E402
from astro_jax.datasets import arith  # noqa: E402


def levels_arg(text: str) -> list[int]:
  try:
    levels = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"bad levels {text!r}: expected e.g. 1,2,3,4") from None
  if not levels or any(k not in arith.LEVELS for k in levels) or len(set(levels)) != len(levels):
    raise argparse.ArgumentTypeError(f"bad levels {text!r}: distinct values among {list(arith.LEVELS)}")
  return levels


def count_arg(text: str) -> int:
  n = int(text)
  if n < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
  return n


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
  parser.add_argument("--train", type=count_arg, default=2000, help="train problems per level")
  parser.add_argument("--test", type=count_arg, default=200, help="test problems per level")
  parser.add_argument("--levels", type=levels_arg, default=list(arith.LEVELS), help="e.g. 1,2 (steps per problem)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  from astro_jax.search.policy import EXAMPLE_PROBLEM
  try:
    split = arith.make_split(args.train, args.test, args.levels, args.seed, exclude=[EXAMPLE_PROBLEM])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  args.out.mkdir(parents=True, exist_ok=True)
  for name, rows in split.items():
    write_jsonl_atomic(args.out / f"{name}.jsonl", rows)
  for name, rows in split.items():
    counts = Counter(row["level"] for row in rows)
    print(f"{args.out / (name + '.jsonl')}: {len(rows)} problems; "
          + ", ".join(f"level {k}: {counts[k]}" for k in args.levels))
  return 0


if __name__ == "__main__":
  sys.exit(main())
