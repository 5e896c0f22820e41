"""Config pieces and set-up shared by all stages: mesh, multi-host start, model + tokenizer loading."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_collections

from astro_jax import sharding

ASSET_PREFIX = "asset:"


def base_config(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.distributed = ml_collections.ConfigDict(
      {"enabled": False, "coordinator_address": "", "num_processes": -1, "process_id": -1})
  return c


def model_config() -> ml_collections.ConfigDict:
  """How to load and run the model (architecture comes from the checkpoint)."""
  return ml_collections.ConfigDict({"dtype": "float32", "scan_layers": True, "remat": False})


def setup_mesh(config: ml_collections.ConfigDict, rules: str = "train") -> sharding.Sharder:
  d = config.distributed
  sharding.maybe_initialize_distributed(d.enabled, d.coordinator_address or None, d.num_processes,
                                        d.process_id)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  logging.info("mesh %s", dict(mesh.shape))
  return sharding.Sharder.create(mesh, rules)


def resolve_path(path: str) -> Path:
  """A local path, or `asset:smollm2` (the real SmolLM2-135M-Instruct) / `asset:llama3_tokenizer`."""
  from astro_jax import assets
  if path.startswith(ASSET_PREFIX):
    name = path[len(ASSET_PREFIX):]
    table = {"smollm2": assets.smollm2_hf_dir, "llama3_tokenizer": assets.llama3_tokenizer_dir}
    if name not in table:
      raise ValueError(f"unknown asset {path!r}; known: {', '.join(ASSET_PREFIX + k for k in table)}")
    return Path(table[name]())
  if not path:
    raise ValueError("a checkpoint/tokenizer path is required (or an asset such as 'asset:smollm2')")
  return Path(path)


def load_model_and_tokenizer(config: ml_collections.ConfigDict, sharder: sharding.Sharder | None):
  """The model (Orbax or HF checkpoint) on the mesh, and its tokenizer (`config.tokenizer` or the checkpoint's)."""
  from astro_jax import checkpoint
  from astro_jax.tokenizer import Tokenizer
  ckpt = resolve_path(config.checkpoint)
  m = config.model
  model = checkpoint.load_model(ckpt, sharder=sharder, dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat)
  tok_dir = resolve_path(config.tokenizer) if config.tokenizer else checkpoint.tokenizer_dir_of(ckpt)
  if tok_dir is None:
    raise FileNotFoundError(f"checkpoint {ckpt} has no tokenizer files; pass --config.tokenizer=DIR")
  return model, Tokenizer.load(tok_dir, extra_eos_ids=model.cfg.eos_token_ids)


def guard_settings(path: Path, settings: dict) -> None:
  """Resumable outputs: record the settings that shape results on first use; later runs must match them."""
  settings = json.loads(json.dumps(settings))
  if path.exists():
    previous = json.loads(path.read_text())
    if previous != settings:
      raise ValueError(f"{path.parent} holds results of other settings ({path}: {previous}, now: {settings}); "
                       f"use another output location or delete the old results")
  else:
    from astro_jax import data
    data.write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
