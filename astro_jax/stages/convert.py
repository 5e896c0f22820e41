"""`convert` stage: HF safetensors <-> Orbax checkpoint (the same code as tools/convert_*.py).

Checks, in order and before any work: config values, the output (an existing one is refused unless `overwrite`),
then the input checkpoint (its kind must match `direction`; headers/metadata and shapes, without reading weights).
"""
from __future__ import annotations

import logging

import ml_collections

from astro_jax.errors import UserError
from astro_jax.stages import common

DIRECTIONS = {"hf_to_orbax": "hf", "orbax_to_hf": "orbax"}  # direction -> kind of input checkpoint
_KIND_NAMES = {"hf": "a HF", "orbax": "an Orbax"}
PARAM_DTYPES = ("", "float32", "bfloat16", "float16")

HELP = {
    "direction": "hf_to_orbax or orbax_to_hf",
    "input": "HF dir (hf_to_orbax), or Orbax checkpoint dir or a training run's RUN/checkpoints/<step> (orbax_to_hf); "
             "asset:smollm2 works",
    "output": "checkpoint directory to write (atomically)",
    "overwrite": "replace an existing output (else it is refused before any work)",
    "dtype": "hf_to_orbax: store params as this dtype (\"\": the source's)",
    "tokenizer": "orbax_to_hf: tokenizer dir to ship (\"\": the one inside the checkpoint)",
    "max_shard_gb": "orbax_to_hf: largest safetensors file, in GiB",
}


def defaults() -> ml_collections.ConfigDict:
  c = common.base_config("convert")
  c.direction = "hf_to_orbax"
  c.input = ""
  c.output = ""
  c.overwrite = False
  c.dtype = ""
  c.tokenizer = ""
  c.max_shard_gb = 5.0
  return c


def check(config: ml_collections.ConfigDict) -> None:
  """Config values and a free output, before anything is read or written."""
  from astro_jax import files
  common.check_base(config)
  common.require(config.direction in DIRECTIONS, "direction", config.direction, f"must be one of {tuple(DIRECTIONS)}")
  common.require(bool(config.input), "input", config.input, "a checkpoint directory (or asset:smollm2) is required")
  common.require(bool(config.output), "output", config.output, "an output directory is required")
  common.require(config.dtype in PARAM_DTYPES, "dtype", config.dtype, f"must be one of {PARAM_DTYPES}")
  common.require(config.max_shard_gb > 0, "max_shard_gb", config.max_shard_gb, "must be > 0")
  files.prepare_output(config.output, config.overwrite, hint="--config.overwrite=True")


@common.stage_run
def run(config: ml_collections.ConfigDict) -> None:
  from astro_jax import checkpoint
  check(config)
  common.claim_output(config, "output")
  src = common.resolve_path(config.input, "input")
  kind = checkpoint.checkpoint_kind(src)
  kind = "orbax" if kind == "train" else kind  # a training run's step (RUN/checkpoints/<step>) converts as Orbax
  if kind != DIRECTIONS[config.direction]:
    other = next(d for d, k in DIRECTIONS.items() if k == kind)
    raise UserError(f"config key 'input' = {config.input!r} is {_KIND_NAMES[kind]} checkpoint; direction "
                    f"{config.direction!r} needs {_KIND_NAMES[DIRECTIONS[config.direction]]} one "
                    f"(use direction={other!r})")
  checkpoint.inspect_checkpoint(src)
  if config.direction == "hf_to_orbax":
    sharder = common.setup_mesh(config, "train")
    out = checkpoint.convert_hf_to_orbax(src, config.output, dtype=config.dtype or None, sharder=sharder,
                                         overwrite=config.overwrite)
  else:
    tok = common.resolve_path(config.tokenizer, "tokenizer") if config.tokenizer else None
    out = checkpoint.convert_orbax_to_hf(src, config.output, tokenizer_dir=tok,
                                         max_shard_bytes=int(config.max_shard_gb * 2**30), overwrite=config.overwrite)
  logging.info("wrote %s", out)
  print(out)
