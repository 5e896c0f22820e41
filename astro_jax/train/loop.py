"""The training loop around the jitted step: state on the mesh, batches in, checkpoints, metrics one step late.

`Trainer` holds what a training stage needs between steps: the model config and execution settings, the
optimizer, the sharded state, the jitted step and its checkpoint manager. Metrics of step s are read after step
s + 1 is dispatched, so the host never waits for the device except where it must: before a checkpoint (a
NaN-poisoned state is never saved) and at the end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from astro_jax.errors import UserError
from astro_jax.model.config import Execution, ModelConfig
from astro_jax.model.llama import weight_specs
from astro_jax.sharding import Sharder
from astro_jax.train import checkpoints as checkpoints_lib
from astro_jax.train import losses, metrics, optim
from astro_jax.train import step as step_lib


class NonFiniteLoss(UserError):
  """The loss became NaN or infinite; the run stopped (its last good checkpoint is kept)."""


def stop_if_not_finite(step: int, loss: float, grad_norm: float, ckpts: checkpoints_lib.Checkpoints,
                       last_good: int | None) -> None:
  """NonFiniteLoss naming the step and the last good checkpoint (after pending saves finish), unless both are
  finite."""
  if math.isfinite(loss) and math.isfinite(grad_norm):
    return
  ckpts.wait()
  good = (f"the last good checkpoint is step {last_good} in {ckpts.directory}" if last_good is not None
          else "no checkpoint was written")
  raise NonFiniteLoss(f"step {step}: loss is {loss} (grad norm {grad_norm}); training stopped, {good}")


def local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
  """The rows of a [B, ...] global array that this process's devices hold (one contiguous block)."""
  spans = sorted({(i[0].start or 0, shape[0] if i[0].stop is None else i[0].stop)
                  for i in sharding.addressable_devices_indices_map(shape).values()})
  lo, hi = spans[0][0], max(stop for _, stop in spans)
  covered = lo
  for start, stop in spans:
    if start > covered:
      raise ValueError(f"this process's rows of {shape} are not contiguous: {spans}")
    covered = max(covered, stop)
  return slice(lo, hi)


def to_global(sharding: NamedSharding, local: np.ndarray, global_rows: int) -> jax.Array:
  """This process's rows -> the global array (every process gives its own rows)."""
  shape = (global_rows, *local.shape[1:])
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, shape)


def host_params(params: dict, keep: bool = True) -> dict[str, np.ndarray]:
  """Params as NumPy on this host, all-gathered weight by weight when they span processes (every process must
  call this; a process with keep=False drops each weight at once, so it never holds the whole model)."""
  if all(a.is_fully_addressable for a in params.values()):
    return {k: np.asarray(jax.device_get(v)) for k, v in params.items()}
  from jax.experimental import multihost_utils
  out = {}
  for k, v in params.items():
    whole = np.asarray(multihost_utils.process_allgather(v, tiled=True))
    if keep:
      out[k] = whole
  return out


@dataclasses.dataclass
class Trainer:
  cfg: ModelConfig
  run: Execution
  sharder: Sharder
  tx: Any
  schedule: Callable
  total_steps: int
  batch_size: int
  seq_len: int
  state_shardings: Any
  step_fn: Callable
  eval_fn: Callable
  peak_flops: float
  seed: int = 0
  save_every: int = 100
  keep: int = 3
  async_save: bool = True
  batch_axes: dict = dataclasses.field(default_factory=lambda: dict(step_lib.SFT_BATCH_AXES))
  state: Any = None

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, cfg: ModelConfig, sharder: Sharder, total_steps: int,
             loss_fn: Callable | None = None, *, batch_size: int | None = None, seq_len: int | None = None,
             batch_axes: dict[str, tuple[str, ...]] = step_lib.SFT_BATCH_AXES) -> "Trainer":
    """The optimizer, shardings and jitted step for this config (loss_fn: (cfg, run, sharder, params, batch) ->
    sums; default the token-mean next-token loss). batch_size / seq_len: the rows of one optimizer step and their
    length (default config.batch_size / config.seq_len); batch_axes: the logical axes of each batch input."""
    batch_size = batch_size or config.batch_size
    seq_len = seq_len or config.seq_len
    step_lib.check_batch(batch_size, config.grad_accum, sharder)
    m, o = config.model, config.optimizer
    cfg = cfg.replace(param_dtype=m.param_dtype)
    run = Execution(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, attention_block=m.attention_block)
    warmup = int(round(o.warmup_fraction * total_steps))
    schedule = optim.learning_rate(o.lr, total_steps, warmup, o.schedule, o.final_lr_fraction)
    abstract = abstract_params(cfg)
    tx = optim.adamw(schedule, abstract, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     clip_norm=o.clip_norm, decay_norms=o.decay_norms, decay_embeddings=o.decay_embeddings,
                     mu_dtype=o.mu_dtype or None)
    shardings = step_lib.state_shardings(tx, cfg, abstract, sharder)
    chunk = config.loss_chunk
    loss = loss_fn or (lambda c, r, s, p, b: losses.nll_loss(c, r, s, p, b, chunk=chunk))
    bound = lambda p, b: loss(cfg, run, sharder, p, b)
    step_fn = step_lib.jit_train_step(bound, tx, accum=config.grad_accum, sharder=sharder, shardings=shardings,
                                      batch_axes=batch_axes)
    batch_in = step_lib.batch_shardings(sharder, batch_axes)
    eval_fn = jax.jit(lambda p, b: step_lib.eval_step(bound, p, b), in_shardings=(shardings["params"], batch_in))
    device = jax.devices()[0]
    peak = config.peak_flops or metrics.peak_flops(device.device_kind, device.platform)
    return cls(cfg, run, sharder, tx, schedule, total_steps, batch_size, seq_len, shardings, step_fn, eval_fn, peak,
               seed=config.seed, save_every=config.save_every, keep=config.keep, async_save=config.async_checkpoint,
               batch_axes=dict(batch_axes))

  @property
  def batch_sharding(self) -> NamedSharding:
    return step_lib.batch_sharding(self.sharder)

  @property
  def local_rows(self) -> slice:
    return local_rows(self.batch_sharding, (self.batch_size, self.seq_len))

  # -- state
  def abstract_state(self) -> Any:
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": self.tx.init(p), "step": jnp.zeros((), jnp.int32)},
                            abstract_params(self.cfg))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        self.state_shardings)

  def placed(self, params: dict, dtype) -> dict:
    """The model's weights of `params`, cast to `dtype`, in the train sharding."""
    cast = jax.jit(lambda p: {k: v.astype(dtype) for k, v in p.items()},
                   out_shardings=self.state_shardings["params"])
    return cast({k: params[k] for k in weight_specs(self.cfg)})

  def load_params(self, params: dict) -> None:
    """Step 0: the start weights (cast to the master dtype, in the train sharding) and a fresh optimizer."""
    self.state = step_lib.init_state(self.placed(params, self.cfg.jnp_param_dtype), self.tx, self.state_shardings)

  def start_or_resume(self, config: ml_collections.ConfigDict, out: Path, record, loader) -> tuple[
      checkpoints_lib.Checkpoints, int]:
    """The checkpoint manager, and the step to start from: the newest good checkpoint's when resuming (the state
    and `loader` are restored), else 0 (the run directory is cleared when overwriting)."""
    from astro_jax.stages.common import is_writer
    if not config.resume and out.exists() and config.overwrite and is_writer():
      for name in ("checkpoints", "metrics.jsonl", "tensorboard", "loss.png", "rl.png", "eval", "hf",
                   "run_config.json"):
        path = out / name
        if path.is_dir():
          shutil.rmtree(path)
        elif path.exists():
          path.unlink()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("run directory ready")
    out.mkdir(parents=True, exist_ok=True)
    if is_writer():
      record.record(stale=[])
    ckpts = checkpoints_lib.Checkpoints(out / "checkpoints", keep=self.keep, async_save=self.async_save)
    restored = ckpts.restore_latest(self.abstract_state(), delete_broken=True) if config.resume else None
    if restored is None:
      if config.resume:
        print(f"resume: no checkpoint in {out / 'checkpoints'}; starting at step 0")
      return ckpts, 0
    step, self.state, data_state = restored
    loader.set_state(data_state)
    print(f"resumed from step {step} ({out / 'checkpoints'})")
    return ckpts, step

  # -- batches
  def put_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a step's batch -> the global batch on the mesh."""
    return {k: to_global(self.sharder.named(axes), local[k], self.batch_size) for k, axes in self.batch_axes.items()}

  def eval_batches(self, rows: list[dict[str, np.ndarray]]) -> list[dict[str, jax.Array]]:
    """Held-out packed rows in full batches (the last one padded with empty rows, weight 0)."""
    rows = list(rows)
    while len(rows) % self.batch_size:
      rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
    span = self.local_rows
    out = []
    for i in range(0, len(rows), self.batch_size):
      chunk = rows[i:i + self.batch_size][span]
      out.append(self.put_batch({k: np.stack([r[k] for r in chunk]) for k in step_lib.BATCH_KEYS}))
    return out

  def eval_loss(self, batches: list[dict[str, jax.Array]]) -> float:
    sums = [self.eval_fn(self.state["params"], b) for b in batches]
    loss_sum, weight_sum = (sum(float(s[i]) for s in sums) for i in (0, 1))
    return loss_sum / max(weight_sum, 1e-9)

  # -- the loop
  def train(self, loader, start: int, ckpts: checkpoints_lib.Checkpoints, eval_batches=(), eval_every: int = 0,
            ) -> Iterator[dict]:
    """Steps start+1 .. total_steps; yields each step's metrics row (one step late), saves checkpoints."""
    flops_per_token = metrics.train_flops_per_token(self.cfg, self.seq_len)
    tokens_per_step = self.batch_size * self.seq_len
    n_devices = jax.device_count()
    last_good = start if ckpts.steps() else None
    pending: tuple[int, dict, dict] | None = None
    clock = [time.perf_counter()]

    def finish(item) -> dict:
      s, device_metrics, extra = item
      m = jax.device_get(device_metrics)
      now = time.perf_counter()
      seconds, clock[0] = now - clock[0], now
      loss = float(m["loss"])
      stop_if_not_finite(s, loss, float(m["grad_norm"]), ckpts, last_good)
      tps = tokens_per_step / max(seconds, 1e-9)
      row = {"step": s, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(self.schedule(s - 1)),
             "tokens_per_s": tps, "mfu": metrics.mfu(tps, flops_per_token, n_devices, self.peak_flops),
             "tokens": int(m["weight"]), "time_s": seconds}
      return {**row, **extra}

    for s in range(start + 1, self.total_steps + 1):
      batch = self.put_batch(next(loader))
      self.state, device_metrics = self.step_fn(self.state, batch)
      if pending is not None:
        yield finish(pending)
      extra = {}
      if eval_every and s % eval_every == 0 and eval_batches:
        extra["eval_loss"] = self.eval_loss(eval_batches)
      pending = (s, device_metrics, extra)
      if s % self.save_every == 0 or s == self.total_steps:
        yield finish(pending)  # a state is saved only once its loss is known to be finite
        pending = None
        ckpts.save(s, self.state, loader.get_state())
        last_good = s
    if pending is not None:
      yield finish(pending)
    ckpts.wait()

  # -- export
  def export_hf(self, source_ckpt: Path, out_dir: Path, tokenizer_dir: str | None = None) -> Path | None:
    """The trained weights as a HF checkpoint (the start checkpoint's config.json and tokenizer carried over)."""
    from flax import nnx

    from astro_jax import checkpoint
    from astro_jax.model.llama import abstract_model
    from astro_jax.stages.common import is_writer
    params = host_params(self.state["params"], keep=is_writer())
    if not is_writer():
      return None
    graphdef, abs_state = nnx.split(abstract_model(self.cfg))
    nnx.replace_by_pure_dict(abs_state, params)
    model = nnx.merge(graphdef, abs_state)
    if checkpoint.checkpoint_kind(source_ckpt) == "orbax":
      hf_config, generation = checkpoint.hf_extras(source_ckpt)
    else:
      hf_config = json.loads((Path(source_ckpt) / "config.json").read_text())
      gen_path = Path(source_ckpt) / checkpoint.GENERATION_CONFIG_FILE
      generation = json.loads(gen_path.read_text()) if gen_path.exists() else None
    tok = tokenizer_dir or checkpoint.tokenizer_dir_of(source_ckpt)
    return checkpoint.save_hf(model, out_dir, tokenizer_dir=tok, hf_config=hf_config, generation_config=generation,
                              overwrite=True)


def abstract_params(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  return {name: jax.ShapeDtypeStruct(shape, cfg.jnp_param_dtype) for name, (shape, _) in weight_specs(cfg).items()}
