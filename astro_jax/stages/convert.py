"""`convert` stage: HF safetensors <-> Orbax checkpoint (the same code as tools/convert_*.py).

Checks, in order and before any work: config values, the output (an existing one is refused unless `overwrite`),
then the input checkpoint (its kind must match `direction`; headers/metadata and shapes, without reading weights).
"""
from __future__ import annotations

import logging

import ml_collections

from astro_jax import config_keys
from astro_jax.config_keys import Key, Keys, above, given, one_of
from astro_jax.errors import UserError
from astro_jax.stages import common

DIRECTIONS = {"hf_to_orbax": "hf", "orbax_to_hf": "orbax"}  # direction -> kind of input checkpoint
_KIND_NAMES = {"hf": "a HF", "orbax": "an Orbax"}
PARAM_DTYPES = ("", "float32", "bfloat16", "float16")

KEYS: Keys = {
    **common.base_keys("convert"),
    "direction": Key("hf_to_orbax", "hf_to_orbax or orbax_to_hf", one_of(DIRECTIONS)),
    "input": Key("", "HF dir (hf_to_orbax), or Orbax checkpoint dir or a training run's RUN/checkpoints/<step> "
                 "(orbax_to_hf); asset:smollm2 works", given("a checkpoint directory (or asset:smollm2) is required")),
    "output": Key("", "checkpoint directory to write (atomically)", given("an output directory is required")),
    "overwrite": Key(False, "replace an existing output (else it is refused before any work)"),
    "dtype": Key("", "hf_to_orbax: store params as this dtype (\"\": the source's)", one_of(PARAM_DTYPES)),
    "tokenizer": Key("", "orbax_to_hf: tokenizer dir to ship (\"\": the one inside the checkpoint)"),
    "max_shard_gb": Key(5.0, "orbax_to_hf: largest safetensors file, in GiB", above(0)),
}


def defaults() -> ml_collections.ConfigDict:
  return config_keys.defaults(KEYS)


def check(config: ml_collections.ConfigDict) -> None:
  """Config values and a free output, before anything is read or written."""
  from astro_jax import files
  common.check_base(config, KEYS)
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
