"""The training loop around the jitted step: state on the mesh, batches in, checkpoints, metrics one step late.

`Trainer` holds what a training stage needs between steps: the model config and execution settings, the
optimizer, the sharded state, the jitted step and its checkpoint manager. Metrics of step s are read after step
s + 1 is dispatched, so the host never waits for the device except where it must: before a checkpoint (a
NaN-poisoned state is never saved) and at the end.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

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
  """The loss, the weights or the log-probs became NaN or infinite; the run stopped (its last good checkpoint is
  kept)."""


def stop_training(step: int, what: str, ckpts: checkpoints_lib.Checkpoints, error: type[UserError] = NonFiniteLoss,
                  *, gave_it: int | None = None) -> NoReturn:
  """`error`, one line: the step, what went wrong and the last good checkpoint (after pending saves finish).
  `gave_it`: the step whose weights gave the non-finite value; its checkpoint, if saved, is deleted (it would only
  replay the failure), so that `resume=true` goes on from the one before."""
  ckpts.wait()
  deleted = ""
  if gave_it is not None and gave_it in ckpts.steps():
    ckpts.delete(gave_it)
    deleted = f"checkpoint {gave_it} holds the weights that gave it and was deleted; "
  steps = ckpts.steps()
  good = (f"the last good checkpoint is step {steps[-1]} in {ckpts.directory}" if steps
          else f"no checkpoint is left in {ckpts.directory}" if deleted else "no checkpoint was written")
  raise error(f"step {step}: {what}; {deleted}training stopped, {good}")


def stop_if_not_finite(step: int, loss: float, grad_norm: float, ckpts: checkpoints_lib.Checkpoints,
                       params_finite: bool = True, *, weights_of: int | None = None) -> None:
  """NonFiniteLoss naming the step and the last good checkpoint, unless the loss, the gradient norm and the
  updated weights (the step's `params_finite`) are all finite. `weights_of`: the step whose weights the loss was
  computed with (its checkpoint goes when the loss or gradient is not finite; default step - 1)."""
  if math.isfinite(loss) and math.isfinite(grad_norm) and params_finite:
    return
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    stop_training(step, f"loss is {loss} (grad norm {grad_norm})", ckpts,
                  gave_it=step - 1 if weights_of is None else weights_of)
  stop_training(step, f"the updated weights are not finite (loss {loss}, grad norm {grad_norm})", ckpts)


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
  grad_accum: int = 1
  bound_loss: Callable | None = None  # (params, micro_batch) -> sums: the loss step_fn differentiates
  seed: int = 0
  save_every: int = 100
  keep: int = 3
  async_save: bool = True
  batch_axes: dict = dataclasses.field(default_factory=lambda: dict(step_lib.SFT_BATCH_AXES))
  state: Any = None
  spill_step_fns: dict = dataclasses.field(default_factory=dict)  # micro-batch count -> step_fn, past grad_accum

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, cfg: ModelConfig, sharder: Sharder, total_steps: int,
             loss_fn: Callable | None = None, *, batch_size: int | None = None, seq_len: int | None = None,
             batch_axes: dict[str, tuple[str, ...]] = step_lib.SFT_BATCH_AXES,
             batch_from: tuple[str, str] | None = None) -> "Trainer":
    """The optimizer, shardings and jitted step for this config (loss_fn: (cfg, run, sharder, params, batch) ->
    sums; default the token-mean next-token loss). batch_size / seq_len: the rows of one optimizer step and their
    length (default config.batch_size / config.seq_len); batch_axes: the logical axes of each batch input;
    batch_from: the config keys and values batch_size comes from, as errors name them (`step.check_batch`)."""
    batch_size = batch_size or config.batch_size
    seq_len = seq_len or config.seq_len
    step_lib.check_batch(batch_size, config.grad_accum, sharder, batch_from)
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
               grad_accum=config.grad_accum, bound_loss=bound, seed=config.seed, save_every=config.save_every, keep=config.keep, async_save=config.async_checkpoint,
               batch_axes=dict(batch_axes))

  @property
  def batch_sharding(self) -> NamedSharding:
    return step_lib.batch_sharding(self.sharder)

  @property
  def local_rows(self) -> slice:
    return local_rows(self.batch_sharding, (self.batch_size, self.seq_len))

  @property
  def params(self) -> dict:
    """The current weights (on the mesh, train sharding)."""
    return self.state["params"]

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

  def start_or_resume(self, config: ml_collections.ConfigDict, out: Path, record, loader,
                      on_first_save: Callable[[], None] | None = None) -> tuple[checkpoints_lib.Checkpoints, int]:
    """The checkpoint manager, and the step to start from: the newest good checkpoint's when resuming (the state
    and `loader` are restored), else 0. `record` (the run's settings) is written once the start is known;
    `on_first_save` runs once the run's first checkpoint is durable (an overwritten run is dropped then)."""
    writer = jax.process_index() == 0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("run directory ready")
    out.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoints_lib.Checkpoints(out / "checkpoints", keep=self.keep, async_save=self.async_save,
                                        on_first_save=on_first_save if writer else None)
    restored = ckpts.restore_latest(self.abstract_state(), delete_broken=True) if config.resume else None
    step = 0 if restored is None else restored[0]
    if writer:
      record.record(stale=[], at_step=step)
    if restored is None:
      if config.resume:
        print(f"resume: no checkpoint in {out / 'checkpoints'}; starting at step 0")
      return ckpts, 0
    _, self.state, data_state = restored
    loader.set_state(data_state)
    print(f"resumed from step {step} ({out / 'checkpoints'})")
    return ckpts, step

  # -- batches
  def put_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a step's batch -> the global batch on the mesh."""
    return {k: to_global(self.sharder.named(axes), local[k], self.batch_size) for k, axes in self.batch_axes.items()}

  def put_rows(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A global batch given as host rows ([N, ...] each, the same on every process; N: batch_size, or more whole
    micro-batches) -> on the mesh: this process puts its own rows."""
    n, T = next(iter(rows.values())).shape[:2]
    span = local_rows(self.batch_sharding, (n, T))
    return {k: to_global(self.sharder.named(axes), rows[k][span], n) for k, axes in self.batch_axes.items()
            if k in rows}  # inputs missing here are made on device (`train_on`'s prepare)

  def step_on(self, batch: dict[str, jax.Array]) -> dict[str, float]:
    """One optimizer step on a placed batch of any whole number of micro-batches (batch_size / grad_accum rows
    each: more than grad_accum of them compiles the step once for that count); the step's metrics, fetched."""
    per_micro = self.batch_size // self.grad_accum
    n = next(iter(batch.values())).shape[0]
    if n % per_micro:
      raise ValueError(f"a batch of {n} rows is not whole micro-batches of {per_micro} rows")
    self.state, device_metrics = self._step_fn_for(n // per_micro)(self.state, batch)
    return {k: float(v) for k, v in jax.device_get(device_metrics).items()}

  def _step_fn_for(self, accum: int) -> Callable:
    if accum == self.grad_accum:
      return self.step_fn
    if accum not in self.spill_step_fns:
      self.spill_step_fns[accum] = step_lib.jit_train_step(self.bound_loss, self.tx, accum=accum,
                                                           sharder=self.sharder, shardings=self.state_shardings,
                                                           batch_axes=self.batch_axes)
    return self.spill_step_fns[accum]

  def train_on(self, rows: dict[str, np.ndarray], prepare: Callable[[dict], dict] | None = None
               ) -> dict[str, float]:
    """One optimizer step on a global batch given as host rows (`put_rows`). `prepare` may complete the placed
    batch on device (e.g. a reference model's log-probs); the step's metrics come back fetched (the host waits for
    the step)."""
    batch = self.put_rows(rows)
    return self.step_on(prepare(batch) if prepare is not None else batch)

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
    pending: tuple[int, dict, dict] | None = None
    clock = [time.perf_counter()]

    def finish(item) -> dict:
      s, device_metrics, extra = item
      m = jax.device_get(device_metrics)
      now = time.perf_counter()
      seconds, clock[0] = now - clock[0], now
      loss = float(m["loss"])
      stop_if_not_finite(s, loss, float(m["grad_norm"]), ckpts, bool(m["params_finite"]))
      tps = tokens_per_step / max(seconds, 1e-9)
      row = {"step": s, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(self.schedule(s - 1)),
             "tokens_per_s": tps, "mfu": metrics.mfu(tps, flops_per_token, n_devices, self.peak_flops),
             "tokens": int(m["weight"]), "time_s": seconds}
      return {**row, **extra}

    for s in range(start + 1, self.total_steps + 1):
      ckpts.check()  # a background save that failed stops the run at once
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
    if pending is not None:
      yield finish(pending)
    ckpts.wait()

  # -- export
  def export_hf(self, source_ckpt: Path, out_dir: Path, tokenizer_dir: str | None = None) -> Path | None:
    """The trained weights as a HF checkpoint (the start checkpoint's config.json and tokenizer carried over)."""
    from flax import nnx

    from astro_jax import checkpoint
    from astro_jax.model.llama import abstract_model
    writer = jax.process_index() == 0
    params = host_params(self.state["params"], keep=writer)
    if not writer:
      return None
    graphdef, abs_state = nnx.split(abstract_model(self.cfg))
    nnx.replace_by_pure_dict(abs_state, params)
    model = nnx.merge(graphdef, abs_state)
    hf_config, generation = checkpoint.hf_extras(source_ckpt)
    tok = tokenizer_dir or checkpoint.tokenizer_dir_of(source_ckpt)
    return checkpoint.save_hf(model, out_dir, tokenizer_dir=tok, hf_config=hf_config, generation_config=generation,
                              overwrite=True)


def abstract_params(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  return {name: jax.ShapeDtypeStruct(shape, cfg.jnp_param_dtype) for name, (shape, _) in weight_specs(cfg).items()}
