"""Policy-gradient pieces for RL with verifiable rewards (GRPO family): group advantages, the clipped-ratio loss,
k3 KL, and the three aggregations, each as (sum, weight) so the trainer's division is exact under accumulation.

Aggregations over a batch of responses (mask M: response tokens; L: per-token loss):
  token-mean               Σ M·L / Σ M                        (DAPO: every token of the global batch weighs the same)
  seq-mean-token-mean      Σ_seq (Σ_t M·L / Σ_t M) / n_seq      (GRPO: every response weighs the same)
  seq-mean-token-sum-norm  Σ_seq (Σ_t M·L / max_len) / n_seq    (Dr. GRPO: no length normalisation; a constant)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards_PG: jax.Array, scale_std: bool = True, eps: float = 1e-6) -> jax.Array:
  """r - mean over each prompt's G responses, divided by the group's (unbiased) std when `scale_std` (GRPO;
  Dr. GRPO does not). A group whose rewards are all equal gets 0: it carries no signal."""
  r = rewards_PG.astype(jnp.float32)
  centred = r - jnp.mean(r, axis=-1, keepdims=True)
  if not scale_std:
    return centred
  G = r.shape[-1]
  std = jnp.sqrt(jnp.sum(centred ** 2, axis=-1, keepdims=True) / max(G - 1, 1))
  return centred / (std + eps)


def k3_kl(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
  """The k3 estimator of KL(π || π_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
  d = jnp.clip(ref_logp_BT - logp_BT, -20.0, 20.0)
  return jnp.exp(d) - d - 1.0


def policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, advantages_B: jax.Array, mask_BT: jax.Array, *,
                eps_low: float = 0.2, eps_high: float = 0.28, aggregation: str = "token-mean", max_len: int = 1,
                ref_logp_BT: jax.Array | None = None, beta: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
  """The clipped surrogate max(-A·ρ, -A·clip(ρ, 1 - eps_low, 1 + eps_high)) (+ beta·k3 KL) per token, aggregated.

  Returns (loss sum, weight, extra sums): loss = sum / weight over the whole batch (all micro-batches).
  Extra sums (each with its own denominator): tokens, clipped (tokens whose ratio was clipped), kl (sum of k3
  over tokens, when a reference is given), ratio (sum of ρ over tokens).
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
  mask = mask_BT.astype(jnp.float32)
  ratio = jnp.exp(jnp.clip(logp_BT - old_logp_BT, -20.0, 20.0))
  adv = advantages_B[:, None].astype(jnp.float32)
  unclipped, clipped = -adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  per_token = jnp.maximum(unclipped, clipped)
  extra = {"tokens": jnp.sum(mask), "clipped": jnp.sum(mask * (clipped > unclipped)),
           "ratio": jnp.sum(mask * ratio)}
  if ref_logp_BT is not None and beta:
    kl = k3_kl(logp_BT, ref_logp_BT)
    per_token = per_token + beta * kl
    extra["kl"] = jnp.sum(mask * kl)
  token_sums_B = jnp.sum(per_token * mask, axis=-1)
  has_tokens_B = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
  if aggregation == "token-mean":
    return jnp.sum(token_sums_B), jnp.sum(mask), extra
  if aggregation == "seq-mean-token-mean":
    per_seq = token_sums_B / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  else:
    per_seq = token_sums_B / float(max_len)
  return jnp.sum(per_seq * has_tokens_B), jnp.sum(has_tokens_B), extra
