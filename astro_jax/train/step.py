"""The training step: one jitted program, state donated, explicit shardings (the `train` rule set).

A loss is a function `(params, micro_batch) -> (loss_sum, weight_sum, extra_sums)`: the step adds the sums of
all micro-batches and divides once, so a token mean (or a sequence mean) is exact under gradient accumulation.
SFT's loss is `losses.nll_loss`; RL brings its own with the same contract.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from astro_jax.model.config import ModelConfig
from astro_jax.model.llama import weight_specs
from astro_jax.sharding import Sharder

LossFn = Callable[[dict, dict], tuple[jax.Array, jax.Array, dict]]
TrainState = dict  # {"params": name -> array, "opt_state": optax state, "step": int32 []}

BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "weights")


def param_shardings(cfg: ModelConfig, sharder: Sharder) -> dict[str, NamedSharding]:
  return {name: sharder.named(axes, shape) for name, (shape, axes) in weight_specs(cfg).items()}


def state_shardings(tx: optax.GradientTransformation, cfg: ModelConfig, params_abstract: dict,
                    sharder: Sharder) -> TrainState:
  """Shardings of the whole train state: optimizer moments are sharded like their params, scalars replicated."""
  replicated = NamedSharding(sharder.mesh, PartitionSpec())
  by_name = param_shardings(cfg, sharder)
  opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params_abstract), by_name,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return {"params": by_name, "opt_state": opt, "step": replicated}


def batch_sharding(sharder: Sharder) -> NamedSharding:
  """[B, T] inputs: rows over the batch axes (data x fsdp), positions whole."""
  return sharder.named(("batch", "seq"))


def check_batch(batch_size: int, accum: int, sharder: Sharder, batch_from: tuple[str, str] | None = None) -> None:
  """ConfigError unless every micro-batch splits evenly over the batch axes (else each device would silently
  compute a replicated micro-batch, or the batch could not be placed at all). batch_from: how the config makes the
  batch_size rows, as (keys, values), e.g. ("batch_prompts x group_size", "4 x 2"); default ("batch_size", N)."""
  from astro_jax.errors import ConfigError
  shards = math.prod(sharder.mesh.shape[a] for a in (dict(sharder.rules)["batch"] or ()))
  if (batch_size // accum) % shards:
    keys, values = batch_from or ("batch_size", str(batch_size))
    named = [k for k in re.findall(r"[A-Za-z_][\w.]*", keys) if k != "x"] + ["grad_accum", "mesh"]  # x: times
    raise ConfigError(f"config keys {', '.join(map(repr, named))}: {keys} / grad_accum = {values} / {accum} = "
                      f"{batch_size // accum} rows per micro-batch must be a multiple of the devices the batch is "
                      f"split over (mesh data x fsdp = {shards})")


def init_state(params: dict, tx: optax.GradientTransformation, shardings: TrainState | None = None) -> TrainState:
  """The state at step 0 (the optimizer state made on device in its sharding, never whole on one device)."""
  init = lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}
  return jax.jit(init, out_shardings=shardings)(params)


def _micro_batches(batch: dict, accum: int, sharder: Sharder | None) -> dict:
  """[B, ...] -> [accum, B / accum, ...], micro-batch a = rows a, a + accum, ...: every device keeps its rows."""
  def split(x):
    B = x.shape[0]
    if B % accum:
      raise ValueError(f"batch of {B} rows does not split into {accum} micro-batches")
    x = x.reshape(B // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    if sharder is not None:
      x = sharder.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return x
  return jax.tree.map(split, batch)


def _combine_extra(acc: dict, new: dict) -> dict:
  """A loss's extra sums add up over micro-batches; an extra named *_max (of values >= 0) keeps the largest."""
  return {k: (jnp.maximum if k.endswith("_max") else jnp.add)(a, new[k].astype(a.dtype)) for k, a in acc.items()}


def train_step(loss_fn: LossFn, tx: optax.GradientTransformation, accum: int, sharder: Sharder | None,
               state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """Gradients of sum(loss) / sum(weights) over `accum` micro-batches, one optimizer update, metrics."""
  params = state["params"]

  def micro(carry, mb):
    grads, loss_sum, weight_sum, extra = carry
    (l, (w, e)), g = grad_fn(params, mb)
    add = lambda a, b: a + b.astype(a.dtype)
    return (jax.tree.map(add, grads, g), loss_sum + l, weight_sum + w, _combine_extra(extra, e)), None

  def loss_with_weight(p, mb):
    l, w, e = loss_fn(p, mb)
    return l, (w, e)
  grad_fn = jax.value_and_grad(loss_with_weight, has_aux=True)  # gradient of the micro-batch's loss SUM
  first = jax.tree.map(lambda x: x[0], _micro_batches(batch, accum, sharder))
  extra0 = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), jax.eval_shape(loss_fn, params, first)[2])
  zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), extra0)
  (grad_sum, loss_sum, weight_sum, extra), _ = jax.lax.scan(micro, zeros, _micro_batches(batch, accum, sharder))
  denom = jnp.maximum(weight_sum, 1e-9)
  grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grad_sum)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  # params_finite: every updated weight is finite (an update can blow the weights up past float range while the
  # loss and gradients it came from were finite); the loop stops on it before the state is saved
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
  metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "weight": weight_sum, "params_finite": params_finite,
             **extra}  # extra sums as they are: each has its own denominator (e.g. clipped tokens / tokens)
  return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def batch_shardings(sharder: Sharder, batch_axes: dict[str, tuple[str, ...]]) -> dict[str, NamedSharding]:
  return {k: sharder.named(axes) for k, axes in batch_axes.items()}


SFT_BATCH_AXES = {k: ("batch", "seq") for k in BATCH_KEYS}


def jit_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, accum: int = 1,
                   sharder: Sharder | None = None, shardings: TrainState | None = None,
                   batch_axes: dict[str, tuple[str, ...]] = SFT_BATCH_AXES) -> Callable:
  """`train_step` jitted: the state is donated (updated in place) and keeps its sharding; metrics replicated.
  batch_axes: the logical axes of each batch input (RL adds per-row advantages, ("batch",))."""
  fn = functools.partial(train_step, loss_fn, tx, accum, sharder)
  if sharder is None:
    return jax.jit(fn, donate_argnums=0)
  replicated = NamedSharding(sharder.mesh, PartitionSpec())
  in_batch = batch_shardings(sharder, batch_axes)
  return jax.jit(fn, in_shardings=(shardings, in_batch), out_shardings=(shardings, replicated), donate_argnums=0)


def eval_step(loss_fn: LossFn, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(loss sum, weight sum) of a batch without gradients (held-out loss)."""
  loss_sum, weight_sum, _ = loss_fn(params, batch)
  return loss_sum, weight_sum


def tree_bytes(tree: Any) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
