"""The training settings sft and rl share: how the trainer runs the model, the optimizer, the loop's cadence.

Each is a table of keys (`astro_jax.config_keys`): a stage merges them into its own (`model.*`, `optimizer.*`, the
loop keys), adapting defaults where its recipe differs; `check_train` adds what relates several of them.
"""
from __future__ import annotations

import math

import ml_collections

from astro_jax.config_keys import Key, Keys, above, at_least, given, group, one_of, satisfies, within
from astro_jax.errors import require
from astro_jax.model.config import DTYPES, REMAT_POLICIES
from astro_jax.train.metrics import ACCELERATOR_MEMORY_GIB
from astro_jax.train.optim import SCHEDULES

# What a resumed run may change (continuing after a NaN stop with a lower learning rate); kept in run_config.json.
RESUME_CHANGEABLE = ("optimizer.lr", "optimizer.schedule", "optimizer.warmup_fraction", "optimizer.final_lr_fraction")

COMPUTE_DTYPES = ("float32", "bfloat16")

# How a training stage runs the model (the architecture comes from the checkpoint).
MODEL_KEYS: Keys = group("model", {
    "dtype": Key("float32", "compute dtype of matmuls and activations: float32 or bfloat16", one_of(COMPUTE_DTYPES)),
    "param_dtype": Key("float32", "dtype of the trained (master) weights and optimizer moments", one_of(DTYPES)),
    "remat": Key("none", "rematerialisation per layer: none, full, save_dots, save_layer_inputs",
                 one_of(REMAT_POLICIES)),
    "scan_layers": Key(True, "lax.scan over the layers (one compiled layer) vs unrolled"),
    "attention_block": Key(0, "queries attended to in blocks of N, one block's scores at a time (0: all at once)",
                           at_least(0, "0: off")),
})

OPTIMIZER_KEYS: Keys = group("optimizer", {
    "lr": Key(1e-5, "peak learning rate", satisfies(lambda v: v > 0 and math.isfinite(v), "must be a positive number")),
    "schedule": Key("cosine", "decay after warmup: cosine, linear or constant", one_of(SCHEDULES)),
    "warmup_fraction": Key(0.03, "warmup steps as a fraction of steps", within(0, 1)),
    "final_lr_fraction": Key(0.1, "learning rate at the last step, as a fraction of lr", within(0, 1)),
    "weight_decay": Key(0.0, "AdamW decoupled weight decay", at_least(0)),
    "decay_norms": Key(False, "apply weight decay to norm weights"),
    "decay_embeddings": Key(False, "apply weight decay to the embedding (and untied head)"),
    "b1": Key(0.9, "Adam beta1", within(0, 1, upper_open=True)),
    "b2": Key(0.95, "Adam beta2", within(0, 1, upper_open=True)),
    "eps": Key(1e-8, "Adam epsilon", above(0)),
    "clip_norm": Key(1.0, "global gradient norm clip (0: off)", at_least(0, "0: off")),
    "mu_dtype": Key("", "dtype of Adam's first moment (\"\": the params' dtype)", one_of(DTYPES, blank_ok=True)),
})

# The loop's own keys: where it writes, how often it saves, what it measures against.
LOOP_KEYS: Keys = {
    "output_dir": Key("", "the run directory; required", given("a run directory is required")),
    "overwrite": Key(False, "replace a run already in output_dir"),
    "resume": Key(False, "continue the run in output_dir from its newest checkpoint"),
    "grad_accum": Key(1, "micro-batches per optimizer update"),
    "save_every": Key(100, "checkpoint every N steps (and at the end)", at_least(1)),
    "keep": Key(3, "checkpoints kept (the newest)", at_least(1)),
    "async_checkpoint": Key(True, "write checkpoints in the background"),
    "export_hf": Key(True, "write the final weights to output_dir/hf as a HF checkpoint"),
    "peak_flops": Key(0.0, "peak FLOP/s of one device (0: from the device kind)",
                      at_least(0, "0: from the device kind")),
    "accelerator": Key("", "the memory plan's device (tools/plan_memory.py): "
                       + ", ".join(ACCELERATOR_MEMORY_GIB), one_of(ACCELERATOR_MEMORY_GIB, blank_ok=True)),
}


def check_train(config: ml_collections.ConfigDict, rows: int, rows_from: tuple[str, str]) -> None:
  """What relates the training keys (after each key's own check): grad_accum divides the rows of one optimizer
  update, `rows`, which come from rows_from = (the config keys, their values), e.g. ("batch_prompts x group_size",
  "4 x 2"); resume and overwrite exclude each other."""
  keys, values = rows_from
  require(config.grad_accum >= 1 and rows % config.grad_accum == 0, "grad_accum", config.grad_accum,
          f"must be >= 1 and divide {keys} ({values + ' = ' if values else ''}{rows})")
  require(not (config.resume and config.overwrite), "resume", config.resume, "resume and overwrite exclude each other")
