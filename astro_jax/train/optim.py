"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask by weight name."""
from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(peak: float, total_steps: int, warmup_steps: int, decay: str = "cosine",
                  final_fraction: float = 0.1) -> optax.Schedule:
  """The rate of step s = count + 1 (optax counts from 0): peak * s / warmup_steps for s <= warmup_steps (no step
  at rate 0), then `decay` from peak to final_fraction * peak at s = total_steps."""
  if decay not in SCHEDULES:
    raise ValueError(f"schedule {decay!r}; expected one of {SCHEDULES}")

  def schedule(count):
    s = jnp.asarray(count, jnp.float32) + 1.0
    warm = peak * jnp.minimum(s / max(warmup_steps, 1), 1.0)
    progress = jnp.clip((s - warmup_steps - 1) / max(total_steps - warmup_steps - 1, 1), 0.0, 1.0)
    if decay == "cosine":
      factor = final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay == "linear":
      factor = 1.0 - (1.0 - final_fraction) * progress
    else:
      factor = jnp.ones_like(progress)
    return jnp.where(s <= warmup_steps, warm, peak * factor)
  return schedule


def decay_mask(params: dict, decay_norms: bool = False, decay_embeddings: bool = False) -> dict:
  """True for the weights weight decay applies to: matmul weights; norms and embeddings only when asked."""
  def decays(name: str) -> bool:
    if name.endswith("norm"):
      return decay_norms
    if name in ("embed", "lm_head"):
      return decay_embeddings
    return True
  return {name: decays(name) for name in params}


def adamw(schedule: optax.Schedule, params: dict, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.0, clip_norm: float = 1.0, decay_norms: bool = False,
          decay_embeddings: bool = False, mu_dtype: str | None = None) -> optax.GradientTransformation:
  """clip_by_global_norm (clip_norm <= 0: off) then AdamW; moments in the params' dtype unless mu_dtype says."""
  mask = decay_mask(params, decay_norms, decay_embeddings)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask,
                           mu_dtype=mu_dtype or None))
  return optax.chain(*parts)
