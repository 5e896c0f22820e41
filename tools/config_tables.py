"""Print (or write into README.md) the table of every stage's config keys, generated from the stages' defaults.

  python tools/config_tables.py            # print the tables
  python tools/config_tables.py --write    # replace the README section between the config-tables markers
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from astro_jax import stages

BEGIN, END = "<!-- config-tables:begin -->", "<!-- config-tables:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--write", action="store_true", help=f"update {README.name} in place")
  args = parser.parse_args()
  tables = stages.config_tables_markdown().strip()
  if not args.write:
    print(tables)
    return 0
  text = README.read_text()
  if BEGIN not in text or END not in text:
    print(f"error: {README} has no {BEGIN} ... {END} section", file=sys.stderr)
    return 2
  head, rest = text.split(BEGIN, 1)
  README.write_text(f"{head}{BEGIN}\n{tables}\n{END}{rest.split(END, 1)[1]}")
  print(f"updated {README}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
