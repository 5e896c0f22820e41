"""`convert` stage: HF safetensors <-> Orbax checkpoint (the same code as tools/convert_*.py)."""
from __future__ import annotations

import logging

import ml_collections

from astro_jax.stages import common


def defaults() -> ml_collections.ConfigDict:
  c = common.base_config("convert")
  c.direction = "hf_to_orbax"  # or "orbax_to_hf"
  c.input = ""                 # HF dir (hf_to_orbax) or Orbax checkpoint dir (orbax_to_hf); asset:smollm2 works
  c.output = ""
  c.dtype = ""                 # hf_to_orbax: store params as this dtype (e.g. bfloat16); "" keeps the source's
  c.tokenizer = ""             # orbax_to_hf: tokenizer dir to ship (default: the one inside the checkpoint)
  c.max_shard_gb = 5.0
  return c


def run(config: ml_collections.ConfigDict) -> None:
  from astro_jax import checkpoint
  if not config.output:
    raise ValueError("convert: --config.output is required")
  src = common.resolve_path(config.input)
  if config.direction == "hf_to_orbax":
    sharder = common.setup_mesh(config, "train")
    out = checkpoint.convert_hf_to_orbax(src, config.output, dtype=config.dtype or None, sharder=sharder)
  elif config.direction == "orbax_to_hf":
    tok = common.resolve_path(config.tokenizer) if config.tokenizer else None
    out = checkpoint.convert_orbax_to_hf(src, config.output, tokenizer_dir=tok,
                                         max_shard_bytes=int(config.max_shard_gb * 2**30))
  else:
    raise ValueError(f"convert: direction={config.direction!r}; expected 'hf_to_orbax' or 'orbax_to_hf'")
  logging.info("wrote %s", out)
  print(out)
