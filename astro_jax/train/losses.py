"""Losses on the model's final hidden states: float32 log-probs of targets, the vocabulary projected in chunks.

The [tokens, vocab] logits of a long batch never exist at once: `target_logprobs` projects one chunk of positions
at a time inside a rematerialised loop, so the backward pass recomputes each chunk's logits instead of keeping
them (peak extra memory ~ B x chunk x V x 4 bytes, not B x T x V x 4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from astro_jax.model.config import Execution, ModelConfig
from astro_jax.model.llama import forward, head_logits
from astro_jax.sharding import Sharder, constrain


def target_logprobs(cfg: ModelConfig, params: dict, hidden_BTD: jax.Array, targets_BT: jax.Array, *, dt,
                    chunk: int, sharder: Sharder | None = None, with_entropy: bool = False,
                    temperature: float = 1.0) -> tuple[jax.Array, jax.Array | None]:
  """log p(target) [B, T] in float32 (and the predictive entropy [B, T] if asked), `chunk` positions at a time;
  p = softmax(logits / temperature) over the whole vocabulary (the sampler's distribution without top-p/k)."""
  B, T, D = hidden_BTD.shape
  c = max(1, min(chunk, T))
  n = -(-T // c)
  pad = n * c - T
  if pad:
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  h_nBcD = hidden_BTD.reshape(B, n, c, D).swapaxes(0, 1)
  y_nBc = targets_BT.reshape(B, n, c).swapaxes(0, 1)

  @jax.checkpoint
  def one(h_BcD, y_Bc):
    logits_BcV = constrain(sharder, head_logits(cfg, params, h_BcD, dt), ("batch", "seq", "act_vocab"))
    if temperature != 1.0:
      logits_BcV = logits_BcV / temperature
    lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    logp_Bc = jnp.take_along_axis(logits_BcV, y_Bc[..., None], axis=-1)[..., 0] - lse_Bc
    if not with_entropy:
      return logp_Bc, jnp.zeros_like(logp_Bc)
    probs = jnp.exp(logits_BcV - lse_Bc[..., None])
    return logp_Bc, lse_Bc - jnp.sum(probs * logits_BcV, axis=-1)

  logp_nBc, ent_nBc = jax.lax.map(lambda xs: one(*xs), (h_nBcD, y_nBc))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * c)[:, :T]
  return unchunk(logp_nBc), (unchunk(ent_nBc) if with_entropy else None)


def sequence_logprobs(cfg: ModelConfig, run: Execution, sharder: Sharder | None, params: dict, batch: dict, *,
                      chunk: int, with_entropy: bool = False,
                      temperature: float = 1.0) -> tuple[jax.Array, jax.Array | None]:
  """log p(targets) [B, T] of a packed batch (tokens, positions, segment_ids, targets: all [B, T]; prefix_segment
  when a prompt is packed once for several responses)."""
  hidden_BTD, _ = forward(cfg, sharder, params, batch["tokens"], batch["positions"],
                          segment_ids_BT=batch["segment_ids"],
                          prefix_segment_BT=batch.get("prefix_segment"), run=run, hidden_only=True)
  return target_logprobs(cfg, params, hidden_BTD, batch["targets"], dt=run.jnp_dtype, chunk=chunk,
                         sharder=sharder, with_entropy=with_entropy, temperature=temperature)


def nll_loss(cfg: ModelConfig, run: Execution, sharder: Sharder | None, params: dict, batch: dict, *,
             chunk: int) -> tuple[jax.Array, jax.Array, dict]:
  """Next-token cross entropy as (sum over target tokens, number of target tokens, no extra sums): the trainer
  divides the sums of all micro-batches once, so the token mean is exact under gradient accumulation."""
  logp_BT, _ = sequence_logprobs(cfg, run, sharder, params, batch, chunk=chunk)
  weights_BT = batch["weights"].astype(jnp.float32)
  return -jnp.sum(logp_BT * weights_BT), jnp.sum(weights_BT), {}


def full_logits_nll(cfg: ModelConfig, run: Execution, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
  """The same loss from the whole [B, T, V] logits at once (the reference the chunked loss is tested against)."""
  logits_BTV, _ = forward(cfg, None, params, batch["tokens"], batch["positions"],
                          segment_ids_BT=batch["segment_ids"],
                          prefix_segment_BT=batch.get("prefix_segment"), run=run)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
  weights_BT = batch["weights"].astype(jnp.float32)
  return -jnp.sum(logp_BT * weights_BT), jnp.sum(weights_BT)
