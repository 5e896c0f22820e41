"""Rotary position embeddings in HF's rotate-half layout, with optional Llama 3.1 frequency scaling."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from astro_jax.model.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """[head_dim // 2] float32 inverse frequencies (computed in float32, as the reference does)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  old_ctx = scaling.original_max_position_embeddings
  low_wavelen = old_ctx / scaling.low_freq_factor
  high_wavelen = old_ctx / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [B, T, head_dim] (float32) for integer positions."""
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles_BTD = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
  return jnp.cos(angles_BTD), jnp.sin(angles_BTD)


def apply_rope(x_BTND: jax.Array, cos_BTD: jax.Array, sin_BTD: jax.Array) -> jax.Array:
  """Rotate pairs (i, i + D/2) of every head; tables broadcast over the head axis N."""
  half = x_BTND.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTND[..., half:], x_BTND[..., :half]], axis=-1)
  cos, sin = cos_BTD[:, :, None, :].astype(x_BTND.dtype), sin_BTD[:, :, None, :].astype(x_BTND.dtype)
  return x_BTND * cos + rotated * sin
