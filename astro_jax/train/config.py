"""The training settings sft and rl share: how the trainer runs the model, the optimizer, and their checks.

A stage's config holds these as its `model.*` and `optimizer.*` groups (the architecture comes from the checkpoint);
`check_train` validates them with the batch keys every training stage has (grad_accum, save_every, keep, ...).
"""
from __future__ import annotations

import math

import ml_collections

from astro_jax.errors import require

# What a resumed run may change (continuing after a NaN stop with a lower learning rate); kept in run_config.json.
RESUME_CHANGEABLE = ("optimizer.lr", "optimizer.schedule", "optimizer.warmup_fraction", "optimizer.final_lr_fraction")

HELP = {
    "model.dtype": "compute dtype of matmuls and activations: float32 or bfloat16",
    "model.param_dtype": "dtype of the trained (master) weights and optimizer moments",
    "model.remat": "rematerialisation per layer: none, full, save_dots, save_layer_inputs",
    "model.scan_layers": "lax.scan over the layers (one compiled layer) vs unrolled",
    "model.attention_block": "queries attended to in blocks of N, one block's scores at a time (0: all at once)",
    "optimizer.lr": "peak learning rate",
    "optimizer.schedule": "decay after warmup: cosine, linear or constant",
    "optimizer.warmup_fraction": "warmup steps as a fraction of steps",
    "optimizer.final_lr_fraction": "learning rate at the last step, as a fraction of lr",
    "optimizer.weight_decay": "AdamW decoupled weight decay",
    "optimizer.decay_norms": "apply weight decay to norm weights",
    "optimizer.decay_embeddings": "apply weight decay to the embedding (and untied head)",
    "optimizer.b1": "Adam beta1",
    "optimizer.b2": "Adam beta2",
    "optimizer.eps": "Adam epsilon",
    "optimizer.clip_norm": "global gradient norm clip (0: off)",
    "optimizer.mu_dtype": "dtype of Adam's first moment (\"\": the params' dtype)",
}


def train_model_config() -> ml_collections.ConfigDict:
  """How a training stage runs the model (the architecture comes from the checkpoint)."""
  return ml_collections.ConfigDict({"dtype": "float32", "param_dtype": "float32", "remat": "none",
                                    "scan_layers": True, "attention_block": 0})


def optimizer_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "lr": 1e-5, "schedule": "cosine", "warmup_fraction": 0.03, "final_lr_fraction": 0.1, "weight_decay": 0.0,
      "decay_norms": False, "decay_embeddings": False, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0,
      "mu_dtype": ""})


def check_train(config: ml_collections.ConfigDict, rows: int | None = None,
                rows_from: tuple[str, str] | None = None) -> None:
  """The model/optimizer/batch keys a training stage shares (sft, rl). rows: the rows of one optimizer update, which
  grad_accum must divide, and rows_from: the config keys and values they come from, e.g. ("batch_prompts x
  group_size", "4 x 2") (default: config.batch_size)."""
  from astro_jax.model.config import DTYPES, REMAT_POLICIES
  from astro_jax.train.metrics import ACCELERATOR_MEMORY_GIB
  from astro_jax.train.optim import SCHEDULES
  m, o, r = config.model, config.optimizer, require
  r(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"must be one of {DTYPES}")
  r(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"must be one of {REMAT_POLICIES}")
  r(m.attention_block >= 0, "model.attention_block", m.attention_block, "must be >= 0 (0: off)")
  r(o.lr > 0 and math.isfinite(o.lr), "optimizer.lr", o.lr, "must be a positive number")
  r(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"must be one of {SCHEDULES}")
  for key in ("warmup_fraction", "final_lr_fraction"):
    r(0 <= o[key] <= 1, f"optimizer.{key}", o[key], "must be in [0, 1]")
  r(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
  r(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1/b2", (o.b1, o.b2), "must be in [0, 1)")
  r(o.eps > 0, "optimizer.eps", o.eps, "must be > 0")
  r(o.clip_norm >= 0, "optimizer.clip_norm", o.clip_norm, "must be >= 0 (0: off)")
  r(o.mu_dtype in ("",) + DTYPES, "optimizer.mu_dtype", o.mu_dtype, f"must be \"\" or one of {DTYPES}")
  r(config.steps >= 0, "steps", config.steps, "must be >= 0 (0: one epoch)")
  if rows is None:
    rows = config.batch_size
    r(rows >= 1, "batch_size", rows, "must be >= 1")
  keys, values = rows_from or ("batch_size", "")
  r(config.grad_accum >= 1 and rows % config.grad_accum == 0, "grad_accum", config.grad_accum,
    f"must be >= 1 and divide {keys} ({values + ' = ' if values else ''}{rows})")
  r(config.save_every >= 1, "save_every", config.save_every, "must be >= 1")
  r(config.keep >= 1, "keep", config.keep, "must be >= 1")
  r(config.peak_flops >= 0, "peak_flops", config.peak_flops, "must be >= 0 (0: from the device kind)")
  r(bool(config.output_dir), "output_dir", config.output_dir, "a run directory is required")
  r(config.accelerator in ("",) + tuple(ACCELERATOR_MEMORY_GIB), "accelerator", config.accelerator,
    f"must be \"\" or one of {tuple(ACCELERATOR_MEMORY_GIB)}")
  r(not (config.resume and config.overwrite), "resume", config.resume, "resume and overwrite exclude each other")
