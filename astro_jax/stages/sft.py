r"""`sft` stage: fine-tune on chat examples (the `mcts` stage's sft.jsonl), packed rows, on the mesh.

  python -m astro_jax.main --config=configs/sft_8b.py --config.checkpoint=CKPT --config.data=sft.jsonl \
      --config.output_dir=RUN [--config.steps=N --config.resume=true ...]

The paper's recipe (§3.1): full fine-tune, 1 epoch (`steps=0`), AdamW, cosine schedule, examples up to 8192 tokens,
loss on all tokens (`loss_on`). Examples are packed into rows of `seq_len` tokens (attention never crosses two of
them, positions restart for each); `batch_size` rows a step, split into `grad_accum` micro-batches (the loss is a
token mean over the whole batch, exactly); the vocabulary is projected `loss_chunk` positions at a time.

Run directory (`output_dir`):
  run_config.json      the settings that shape the run, inputs as path + content fingerprint (a resumed run must
                       have the same, but for the learning rate and schedule: such changes are listed in `changes`)
  data_counts.json     what reading the data did (rows, kept, truncated, dropped, skipped, duplicates, tokens)
  metrics.jsonl        one row per step: step, loss, grad_norm, lr, tokens_per_s, mfu, tokens, time_s
                       (+ eval_loss every `eval_every` steps)
  tensorboard/         the same as TensorBoard events
  checkpoints/<step>/  Orbax: train state (params, optimizer state, step) + data iterator state
  loss.png             the learning curve, at the end
  hf/                  the final weights as a HF checkpoint (config.json, safetensors, tokenizer)

Resume (`resume=true`) continues from the newest checkpoint that restores (a corrupted one is skipped with a
warning): params, optimizer, data iterator and step; metrics rows after it are redone. The losses equal those of an
uninterrupted run. A NaN/inf loss stops the run naming the step; the last good checkpoint is kept (the one whose
weights gave the NaN is deleted), and `resume=true` may then continue with a lower learning rate.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import ml_collections

from astro_jax.errors import UserError
from astro_jax.stages import common

# What shapes the run's numbers: a resumed run must have the same.
_RUN_KEYS = ("checkpoint", "tokenizer", "data", "eval_data", "eval_fraction", "seed", "steps", "batch_size",
             "grad_accum", "seq_len", "max_length", "loss_on", "overlong", "on_error", "loss_chunk", "model",
             "optimizer")
_INPUT_KEYS = ("checkpoint", "tokenizer", "data", "eval_data")  # recorded as resolved paths + content fingerprints
# What a training run writes in its directory (what an overwriting run replaces; nothing else there is touched).
RUN_ENTRIES = ("run_config.json", "data_counts.json", "metrics.jsonl", "tensorboard", "checkpoints", "loss.png",
               "rl.png", "eval", "hf")
# What a resumed run may change (continuing after a NaN stop with a lower learning rate); kept in run_config.json.
RESUME_CHANGEABLE = ("optimizer.lr", "optimizer.schedule", "optimizer.warmup_fraction", "optimizer.final_lr_fraction")

HELP = {
    "seed": "data order (shuffle before packing and each epoch)",
    "checkpoint": "the start model: Orbax or HF checkpoint directory, a training run's step (RUN/checkpoints/N), or "
                  "an asset (asset:smollm2); required",
    "data": "JSONL of chat examples: messages (the mcts stage's sft.jsonl), or prompt + response; required",
    "eval_data": "held-out JSONL for the eval loss (\"\": take eval_fraction of data)",
    "eval_fraction": "fraction of data held out for the eval loss, chosen by each example's id",
    "eval_every": "held-out loss every N steps (0: never)",
    "output_dir": "the run directory; required",
    "overwrite": "replace a run already in output_dir",
    "resume": "continue the run in output_dir from its newest checkpoint",
    "steps": "optimizer steps (0: one epoch of packed rows)",
    "batch_size": "packed rows per step (all processes together)",
    "grad_accum": "micro-batches per step (batch_size / grad_accum rows each)",
    "seq_len": "tokens per packed row",
    "max_length": "longest example (0: seq_len); longer ones per `overlong`",
    "loss_on": "all (every token, the paper's choice) or assistant (assistant turns only)",
    "overlong": "truncate or drop examples longer than max_length (counted either way)",
    "on_error": "raise on a bad row, or skip it (counted)",
    "loss_chunk": "positions whose logits are computed at once in the loss",
    "save_every": "checkpoint every N steps (and at the end)",
    "keep": "checkpoints kept (the newest)",
    "async_checkpoint": "write checkpoints in the background",
    "export_hf": "write the final weights to output_dir/hf as a HF checkpoint",
    "peak_flops": "peak FLOP/s of one device for MFU (0: from the device kind)",
    "accelerator": "the memory plan's device (tools/plan_memory.py): tpu_v5p, tpu_v5e, tpu_v4, h100, h200, a100",
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


def defaults() -> ml_collections.ConfigDict:
  c = common.base_config("sft")
  c.checkpoint = ""
  c.tokenizer = ""
  c.data = ""
  c.eval_data = ""
  c.eval_fraction = 0.0
  c.eval_every = 0
  c.output_dir = ""
  c.overwrite = False
  c.resume = False
  c.steps = 0
  c.batch_size = 8
  c.grad_accum = 1
  c.seq_len = 2048
  c.max_length = 0
  c.loss_on = "all"
  c.overlong = "truncate"
  c.on_error = "raise"
  c.loss_chunk = 512
  c.save_every = 100
  c.keep = 3
  c.async_checkpoint = True
  c.export_hf = True
  c.peak_flops = 0.0
  c.accelerator = ""
  c.model = train_model_config()
  c.optimizer = optimizer_config()
  return c


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
  from astro_jax.train.optim import SCHEDULES
  m, o, r = config.model, config.optimizer, common.require
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
  from astro_jax.train.metrics import ACCELERATOR_MEMORY_GIB
  r(config.accelerator in ("",) + tuple(ACCELERATOR_MEMORY_GIB), "accelerator", config.accelerator,
    f"must be \"\" or one of {tuple(ACCELERATOR_MEMORY_GIB)}")
  r(not (config.resume and config.overwrite), "resume", config.resume, "resume and overwrite exclude each other")


def check(config: ml_collections.ConfigDict) -> None:
  from astro_jax.train import data as train_data
  common.check_base(config)
  check_train(config)
  r = common.require
  r(bool(config.checkpoint), "checkpoint", config.checkpoint, "a start checkpoint is required")
  r(bool(config.data), "data", config.data, "a JSONL of examples is required")
  r(config.seq_len >= 2, "seq_len", config.seq_len, "must be >= 2")
  r(0 <= config.max_length <= config.seq_len, "max_length", config.max_length,
    f"must be in [0, seq_len = {config.seq_len}] (0: seq_len)")
  r(config.loss_on in train_data.LOSS_ON, "loss_on", config.loss_on, f"must be one of {train_data.LOSS_ON}")
  r(config.overlong in train_data.OVERLONG, "overlong", config.overlong, f"must be one of {train_data.OVERLONG}")
  r(config.on_error in train_data.ON_ERROR, "on_error", config.on_error, f"must be one of {train_data.ON_ERROR}")
  r(config.loss_chunk >= 1, "loss_chunk", config.loss_chunk, "must be >= 1")
  r(0 <= config.eval_fraction < 1, "eval_fraction", config.eval_fraction, "must be in [0, 1)")
  r(config.eval_every >= 0, "eval_every", config.eval_every, "must be >= 0 (0: never)")
  r(not (config.eval_every and not config.eval_data and not config.eval_fraction), "eval_every", config.eval_every,
    "needs held-out examples: set eval_data or eval_fraction")


def held_out(example_id: str, fraction: float) -> bool:
  """Whether an example is in the held-out split: a hash of its id (not its position), so splits are stable."""
  h = int.from_bytes(hashlib.blake2b(example_id.encode(), digest_size=8).digest(), "big")
  return h / 2.0**64 < fraction


def read_data(config: ml_collections.ConfigDict, tokenizer, max_positions: int):
  """(train examples, held-out examples, counts) with every row checked before any model work."""
  from astro_jax.train import data as train_data
  max_length = config.max_length or config.seq_len
  common.require(max_length <= max_positions, "max_length" if config.max_length else "seq_len", max_length,
                 f"longer than the model's context of {max_positions} positions")
  read = lambda key: train_data.read_examples(common.input_file(config[key], key), tokenizer, max_length=max_length,
                                              loss_on=config.loss_on, overlong=config.overlong,
                                              on_error=config.on_error)
  examples, counts = read("data")
  if config.eval_data:
    held, _ = read("eval_data")
  else:
    held = [e for e in examples if held_out(e.id, config.eval_fraction)]
    examples = [e for e in examples if not held_out(e.id, config.eval_fraction)]
  if not examples:
    raise UserError(f"{config.data}: no training examples left after holding out eval_fraction "
                    f"{config.eval_fraction}")
  return examples, held, counts


def prepare_run_dir(config: ml_collections.ConfigDict, settings: dict) -> tuple[Path, "common.SettingsRecord",
                                                                              Callable[[], None] | None]:
  """Claim the run directory (lock) and refuse one that holds another run unless resuming it (same settings, or a
  changed learning rate / schedule) or overwriting. Returns (directory, settings record, `done`): when overwriting,
  the old run is set aside until `done()` (the new run's first checkpoint) and put back if the run ends before."""
  out = common.claim_output(config)
  record = common.SettingsRecord(out / "run_config.json", settings)
  held = [p for p in (out / "run_config.json", out / "metrics.jsonl", out / "checkpoints") if p.exists()]
  if held and not config.overwrite:
    if not config.resume:
      raise UserError(f"output_dir {out} holds a run; pass --config.resume=true to continue it or "
                      f"--config.overwrite=true to replace it")
    record.check(held, "output_dir", changeable=RESUME_CHANGEABLE)
  done = None
  if config.overwrite and out.is_dir() and common.is_writer_of(config):
    done = common.replace_at_first_result(out, RUN_ENTRIES)
  return out, record, done


@common.stage_run
def run(config: ml_collections.ConfigDict) -> None:
  from tqdm import tqdm

  from astro_jax import checkpoint
  from astro_jax.train import data as train_data
  from astro_jax.train import loop
  from astro_jax.train import metrics as metrics_lib

  check(config)
  ckpt, model_cfg = common.inspect_checkpoint(config)
  tokenizer = common.load_tokenizer(config, ckpt, model_cfg)
  examples, held, counts = read_data(config, tokenizer, model_cfg.max_position_embeddings)
  out, record, replaced = prepare_run_dir(config, common.to_settings(config, _RUN_KEYS, _INPUT_KEYS))

  sharder = common.setup_mesh(config, "train")
  rows = train_data.pack(examples, config.seq_len, config.seed)
  total = config.steps or max(1, len(rows) // config.batch_size)
  trainer = loop.Trainer.create(config, model_cfg, sharder, total)
  loader = train_data.make_loader(rows, global_batch=config.batch_size, seed=config.seed,
                                  local_rows=trainer.local_rows)
  checkpoints, start = trainer.start_or_resume(config, out, record, loader, on_first_save=replaced)
  if start == 0:
    trainer.load_params(checkpoint.load_model(ckpt, sharder=sharder).weights())
  if common.is_writer():
    from astro_jax.files import write_text_atomic
    write_text_atomic(out / "data_counts.json", json.dumps({
        **vars(counts), "train_examples": len(examples), "held_out_examples": len(held), "packed_rows": len(rows),
        "steps": total, "steps_per_epoch": loader.steps_per_epoch}, indent=2) + "\n")
  eval_batches = (trainer.eval_batches(train_data.pack(held, config.seq_len, config.seed))
                  if held and config.eval_every else [])

  log = metrics_lib.MetricsLog(out, start) if common.is_writer() else None
  bar = tqdm(total=total, initial=start, desc="sft", unit="step", disable=not common.is_writer(), dynamic_ncols=True)
  try:
    for row in trainer.train(loader, start, checkpoints, eval_batches, config.eval_every):
      if log is not None:
        log.write(row)
      bar.update(1)
      bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
  finally:
    bar.close()
    checkpoints.close()
    if log is not None:
      log.close()
  rows_out = metrics_lib.read_rows(out / "metrics.jsonl")
  if common.is_writer():
    metrics_lib.plot_curves(rows_out, out / "loss.png", title=f"sft: {Path(config.data).name}")
  if config.export_hf:
    trainer.export_hf(ckpt, out / "hf", tokenizer_dir=config.tokenizer or None)
  last = rows_out[-1] if rows_out else {}
  if common.is_writer():
    print(f"sft: {total} steps; final loss {last.get('loss', float('nan')):.4f}; run directory {out}")
