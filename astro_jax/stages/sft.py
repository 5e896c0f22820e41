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
from pathlib import Path

import ml_collections

from astro_jax.errors import UserError
from astro_jax import config_keys
from astro_jax.config_keys import Key, Keys, at_least, changed, given, one_of, within
from astro_jax.stages import common
from astro_jax.train import config as train_config
from astro_jax.train import data as train_data

# What shapes the run's numbers: a resumed run must have the same.
_RUN_KEYS = ("checkpoint", "tokenizer", "data", "eval_data", "eval_fraction", "seed", "steps", "batch_size",
             "grad_accum", "seq_len", "max_length", "loss_on", "overlong", "on_error", "loss_chunk", "model",
             "optimizer")
_INPUT_KEYS = ("checkpoint", "tokenizer", "data", "eval_data")  # recorded as resolved paths + content fingerprints
KEYS: Keys = {
    **common.base_keys("sft"),
    "seed": Key(0, "data order (shuffle before packing and each epoch)"),
    "checkpoint": Key("", "the start model: Orbax or HF checkpoint directory, a training run's step "
                      "(RUN/checkpoints/N), or an asset (asset:smollm2); required",
                      given("a start checkpoint is required")),
    "tokenizer": common.TOKENIZER,
    "data": Key("", "JSONL of chat examples: messages (the mcts stage's sft.jsonl), or prompt + response; required",
                given("a JSONL of examples is required")),
    "eval_data": Key("", "held-out JSONL for the eval loss (\"\": take eval_fraction of data)"),
    "eval_fraction": Key(0.0, "fraction of data held out for the eval loss, chosen by each example's id",
                         within(0, 1, upper_open=True)),
    "eval_every": Key(0, "held-out loss every N steps (0: never)", at_least(0, "0: never")),
    "steps": Key(0, "optimizer steps (0: one epoch of packed rows)", at_least(0, "0: one epoch")),
    "batch_size": Key(8, "packed rows per step (all processes together)", at_least(1)),
    **changed(train_config.LOOP_KEYS,
              helps={"grad_accum": "micro-batches per step (batch_size / grad_accum rows each)",
                     "peak_flops": "peak FLOP/s of one device for MFU (0: from the device kind)"}),
    "seq_len": Key(2048, "tokens per packed row", at_least(2)),
    "max_length": Key(0, "longest example (0: seq_len); longer ones per `overlong`"),
    "loss_on": Key("all", "all (every token, the paper's choice) or assistant (assistant turns only)",
                   one_of(train_data.LOSS_ON)),
    "overlong": Key("truncate", "truncate or drop examples longer than max_length (counted either way)",
                    one_of(train_data.OVERLONG)),
    "on_error": Key("raise", "raise on a bad row, or skip it (counted)", one_of(train_data.ON_ERROR)),
    "loss_chunk": Key(512, "positions whose logits are computed at once in the loss", at_least(1)),
    **train_config.MODEL_KEYS,
    **train_config.OPTIMIZER_KEYS,
}


def defaults() -> ml_collections.ConfigDict:
  return config_keys.defaults(KEYS)


def check(config: ml_collections.ConfigDict) -> None:
  """Each key's own check (KEYS), then what relates several keys."""
  common.check_base(config, KEYS)
  train_config.check_train(config, config.batch_size, ("batch_size", ""))
  r = common.require
  r(0 <= config.max_length <= config.seq_len, "max_length", config.max_length,
    f"must be in [0, seq_len = {config.seq_len}] (0: seq_len)")
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
  out, record, replaced = common.prepare_run_dir(config, common.to_settings(config, _RUN_KEYS, _INPUT_KEYS))

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
