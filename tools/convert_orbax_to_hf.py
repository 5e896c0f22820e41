"""Convert an Orbax checkpoint (written by convert_hf_to_orbax.py) or a training run's step (RUN/checkpoints/<step>,
written by sft or rl) into a Hugging Face checkpoint.

  python tools/convert_orbax_to_hf.py --ckpt CKPT --out HF [--tokenizer_dir T] [--max_shard_size 5GB] [--overwrite]

Writes sharded safetensors (+ model.safetensors.index.json when there is more than one file), config.json,
generation_config.json and the tokenizer files (from --tokenizer_dir, else the checkpoint's own tokenizer/; a
run's step: the run's tokenizer, else its start checkpoint's), loadable by
`transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer`. Tensors keep the checkpoint's dtype, bit
for bit. A checkpoint converted from HF, or a run's step whose run started from a HF checkpoint, gets back that
source's config.json (updated by the model's fields) and generation_config.json; of a step only the params are
read, never the optimizer state. Written atomically: on any error nothing appears at --out; an existing --out is
refused unless --overwrite. A bad input prints one `error: ...` line and exits with status 2.
"""
from __future__ import annotations

import argparse
import re
import sys

from astro_jax.errors import EXIT_USER_ERROR, UserError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
  """"5GB" -> 5 * 10**9, "500MiB" -> 500 * 2**20, "1024" -> 1024 (units as in transformers' max_shard_size)."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
  if not match or match.group(2).upper() not in _UNITS:
    raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a byte count")
  size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
  if size <= 0:
    raise argparse.ArgumentTypeError(f"bad size {text!r}: must be positive")
  return size


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ckpt", required=True,
                      help="Orbax checkpoint directory (params/ + model_config.json), or a training run's step "
                           "RUN/checkpoints/<step>")
  parser.add_argument("--out", required=True, help="HF checkpoint directory to write")
  parser.add_argument("--tokenizer_dir", default=None,
                      help="copy tokenizer files from here (default: the checkpoint's tokenizer/, if any)")
  parser.add_argument("--max_shard_size", type=parse_size, default=parse_size("5GB"),
                      help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)

  from astro_jax import checkpoint
  try:
    out = checkpoint.convert_orbax_to_hf(args.ckpt, args.out, tokenizer_dir=args.tokenizer_dir,
                                         max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  print(f"wrote HF checkpoint to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
