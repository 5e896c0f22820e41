"""Convert a Hugging Face Llama checkpoint (safetensors) into an Orbax checkpoint that restores onto any mesh.

  python tools/convert_hf_to_orbax.py --hf_dir HF --out CKPT [--dtype bfloat16] [--mesh fsdp=8 ...] [--overwrite]

Tensors are streamed from the memory-mapped safetensors files (peak host memory about one tensor); with
--mesh, each device reads only its own shard. The checkpoint is validated first and written atomically:
on any error nothing appears at --out. An existing --out is refused unless --overwrite. The source's
config.json and generation_config.json are kept, so converting back restores every field.
A bad input prints one `error: ...` line and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from astro_jax.errors import EXIT_USER_ERROR, UserError


def parse_mesh(items: list[str]) -> dict[str, int]:
  """["fsdp=4", "tensor=2"] or ["fsdp=4,tensor=2"] -> {"fsdp": 4, "tensor": 2}."""
  from astro_jax.sharding import MESH_AXES
  shape: dict[str, int] = {}
  for item in ",".join(items).split(","):
    if not item:
      continue
    name, sep, size = item.partition("=")
    if not sep or name not in MESH_AXES or not size.lstrip("-").isdigit():
      raise UserError(f"bad --mesh entry {item!r}: expected AXIS=SIZE with AXIS in {MESH_AXES}")
    shape[name] = int(size)
  return shape


def _sharder(items: list[str]):
  from astro_jax.sharding import Sharder, make_mesh
  if not items:
    return None
  shape = {"data": 1, "fsdp": 1, "tensor": 1, **parse_mesh(items)}
  try:
    mesh = make_mesh(**shape)
  except ValueError as e:  # sizes that do not fit the devices
    raise UserError(f"--mesh {' '.join(items)}: {e}") from None
  return Sharder.create(mesh, "train")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf_dir", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
  parser.add_argument("--out", required=True, help="Orbax checkpoint directory to write")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="parameter dtype of the checkpoint (default: the dtype config.json declares)")
  parser.add_argument("--mesh", nargs="*", default=[], metavar="AXIS=SIZE",
                      help="load sharded over a (data, fsdp, tensor) mesh, e.g. --mesh fsdp=4 tensor=2; "
                           "unnamed axes are 1 (default: one device)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)

  from astro_jax import checkpoint, files
  try:
    files.prepare_output(args.out, args.overwrite)
    out = checkpoint.convert_hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, sharder=_sharder(args.mesh),
                                         overwrite=args.overwrite)
  except (UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  print(f"wrote Orbax checkpoint to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
