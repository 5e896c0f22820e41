"""Policy-gradient pieces for RL with verifiable rewards (GRPO family): group advantages, the clipped-ratio loss,
k3 KL, and the three aggregations, each as (sum, weight) so the trainer's division is exact under accumulation.

Aggregations over a batch of responses (mask M: response tokens; L: per-token loss):
  token-mean               Σ M·L / Σ M                        (DAPO: every token of the global batch weighs the same)
  seq-mean-token-mean      Σ_seq (Σ_t M·L / Σ_t M) / n_seq      (GRPO: every response weighs the same)
  seq-mean-token-sum-norm  Σ_seq (Σ_t M·L / max_len) / n_seq    (Dr. GRPO: no length normalisation; a constant)
A "seq" is a row, or with segment ids (packed rows: several responses a row) a segment of a row.

Rollout/trainer mismatch (the sampler's log-probs are not exactly the trainer's: another dtype, kernel or a stale
weight copy): `mismatch_sums` measures it per token; `policy_loss(tis_cap=C)` corrects it with token-level truncated
importance sampling (verl's TIS, decoupled PPO): the PPO ratio is taken against the trainer's own log-probs at the
sampling weights (the proximal policy), and each token's loss is weighted by min(π_trainer / π_sampler, C), no
gradient through the weight.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
MISMATCH_BAND = 2.0  # mismatch_out counts tokens whose ratio π_trainer / π_sampler leaves [1/2, 2]


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


def segment_sums(x_BT: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T] -> [B, T + 1]: per row, the sum of x over each segment id 0..T (a row of T tokens has at most T
  segments; 0 is padding). A scatter-add along each row: stays on the devices that hold the row."""
  T = x_BT.shape[-1]
  return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=T + 1))(x_BT, segment_ids_BT)


def mismatch_sums(trainer_logp_BT: jax.Array, sampler_logp_BT: jax.Array, mask_BT: jax.Array) -> dict:
  """How far the sampler's log-probs of its tokens are from the trainer's, over the masked (response) tokens, as
  sums (the trainer adds them over micro-batches; divide by the token count) and one max:
  mismatch_abs Σ |Δ|; mismatch_max max |Δ|; mismatch_k3 Σ k3, the estimate of KL(π_sampler || π_trainer) from the
  sampler's tokens; mismatch_out, tokens whose ratio exp(Δ) leaves [1/2, 2]. Δ = log p_trainer - log p_sampler,
  no gradient."""
  m = mask_BT.astype(jnp.float32)
  d = jax.lax.stop_gradient(trainer_logp_BT - sampler_logp_BT)
  return {"mismatch_abs": jnp.sum(jnp.abs(d) * m), "mismatch_max": jnp.max(jnp.abs(d) * m, initial=0.0),
          "mismatch_k3": jnp.sum(k3_kl(sampler_logp_BT, sampler_logp_BT + d) * m),
          "mismatch_out": jnp.sum((jnp.abs(d) > math.log(MISMATCH_BAND)) * m)}


def policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, advantages: jax.Array, mask_BT: jax.Array, *,
                eps_low: float = 0.2, eps_high: float = 0.28, aggregation: str = "token-mean", max_len: int = 1,
                ref_logp_BT: jax.Array | None = None, beta: float = 0.0, segment_ids_BT: jax.Array | None = None,
                tis_cap: float | None = None,
                prox_logp_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
  """The clipped surrogate max(-A·ρ, -A·clip(ρ, 1 - eps_low, 1 + eps_high)) (+ beta·k3 KL) per token, aggregated.

  advantages: [B] (one response a row) or [B, T] (per token: packed rows hold several responses).
  old_logp_BT: the sampler's log-probs. Without TIS ρ = π / π_sampler. With tis_cap > 0, ρ = π / π_prox and the
  surrogate is weighted by w = min(π_prox / π_sampler, tis_cap) (no gradient), π_prox = prox_logp_BT (the trainer's
  log-probs at the weights that sampled; default the current ones, stop-gradient: exact on the first update).
  segment_ids_BT: the sequences of the seq-mean aggregations are segments (packed rows), not rows.

  Returns (loss sum, weight, extra sums): loss = sum / weight over the whole batch (all micro-batches).
  Extra sums (each with its own denominator): tokens, clipped (tokens whose ratio was clipped), kl (sum of k3
  over tokens, when a reference is given), ratio (sum of ρ over tokens); with TIS tis_weight (sum of w) and
  tis_capped (tokens whose weight hit the cap).
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
  mask = mask_BT.astype(jnp.float32)
  sg = jax.lax.stop_gradient
  adv = advantages.astype(jnp.float32)
  adv_BT = adv[:, None] if adv.ndim == 1 else adv
  extra = {}
  if tis_cap:
    prox = sg(logp_BT) if prox_logp_BT is None else sg(prox_logp_BT)
    raw_w = jnp.exp(jnp.clip(prox - old_logp_BT, -20.0, 20.0))
    weight_BT = jnp.minimum(raw_w, tis_cap)
    extra |= {"tis_weight": jnp.sum(mask * weight_BT), "tis_capped": jnp.sum(mask * (raw_w > tis_cap))}
  else:
    prox, weight_BT = old_logp_BT, 1.0
  ratio = jnp.exp(jnp.clip(logp_BT - prox, -20.0, 20.0))
  unclipped, clipped = -adv_BT * ratio, -adv_BT * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  per_token = weight_BT * jnp.maximum(unclipped, clipped)
  extra |= {"tokens": jnp.sum(mask), "clipped": jnp.sum(mask * (clipped > unclipped)),
            "ratio": jnp.sum(mask * ratio)}
  if ref_logp_BT is not None and beta:
    kl = k3_kl(logp_BT, ref_logp_BT)
    per_token = per_token + beta * kl
    extra["kl"] = jnp.sum(mask * kl)
  if aggregation == "token-mean":
    return jnp.sum(per_token * mask), jnp.sum(mask), extra
  if segment_ids_BT is None:  # a sequence a row
    token_sums, counts = jnp.sum(per_token * mask, axis=-1), jnp.sum(mask, axis=-1)
  else:
    token_sums, counts = segment_sums(per_token * mask, segment_ids_BT), segment_sums(mask, segment_ids_BT)
  has_tokens = (counts > 0).astype(jnp.float32)
  if aggregation == "seq-mean-token-mean":
    per_seq = token_sums / jnp.maximum(counts, 1.0)
  else:
    per_seq = token_sums / float(max_len)
  return jnp.sum(per_seq * has_tokens), jnp.sum(has_tokens), extra
