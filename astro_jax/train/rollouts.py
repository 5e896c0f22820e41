"""Sampled responses -> the RL training batch: one response a row, fixed shapes, the sampler's log-probs aligned
with the trainer's targets, and the loss that scores them (`rl_loss`, the trainer's loss contract).

Row layout ([T] each): tokens = prompt + response (+ padding), positions 0.., segment_ids 1 on real tokens,
targets[j] = tokens[j + 1], weights 1 where targets[j] is a response token, old_logprobs[j] = the sampler's
log-prob of targets[j]; per row, its advantage.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from astro_jax.model.config import Execution, ModelConfig
from astro_jax.sharding import Sharder
from astro_jax.train import losses
from astro_jax.train import policy_loss as pl

RL_BATCH_AXES = {**{k: ("batch", "seq") for k in ("tokens", "positions", "segment_ids", "targets", "weights",
                                                  "old_logprobs")},
                 "advantages": ("batch",)}


def response_rows(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  old_logprobs: Sequence[Sequence[float]], advantages: Sequence[float],
                  seq_len: int) -> dict[str, np.ndarray]:
  """One row per (prompt, response) pair (prompts repeated by the caller for its G responses)."""
  B = len(responses)
  if not (len(prompt_ids) == len(old_logprobs) == len(advantages) == B):
    raise ValueError("prompt_ids, responses, old_logprobs and advantages need one entry per response")
  out = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "positions", "segment_ids", "targets")}
  out["weights"] = np.zeros((B, seq_len), np.float32)
  out["old_logprobs"] = np.zeros((B, seq_len), np.float32)
  out["advantages"] = np.asarray(advantages, np.float32)
  for b, (prompt, response, lps) in enumerate(zip(prompt_ids, responses, old_logprobs)):
    P, R = len(prompt), len(response)
    if len(lps) != R:
      raise ValueError(f"response {b}: {R} tokens but {len(lps)} log-probs")
    if P < 1 or P + R > seq_len:
      raise ValueError(f"response {b}: prompt {P} + response {R} tokens do not fit seq_len {seq_len}")
    seq = np.asarray(list(prompt) + list(response), np.int32)
    n = P + R
    out["tokens"][b, :n], out["positions"][b, :n], out["segment_ids"][b, :n] = seq, np.arange(n), 1
    out["targets"][b, :n - 1] = seq[1:]
    out["weights"][b, P - 1:n - 1] = 1.0  # position j predicts token j + 1: the response starts at P
    out["old_logprobs"][b, P - 1:n - 1] = np.asarray(lps, np.float32)
  return out


def rl_loss(cfg: ModelConfig, run: Execution, sharder: Sharder | None, params: dict, batch: dict, *, chunk: int,
            temperature: float = 1.0, eps_low: float = 0.2, eps_high: float = 0.28,
            aggregation: str = "token-mean", max_len: int = 1) -> tuple[jax.Array, jax.Array, dict]:
  """The clipped policy loss of a response batch, with extra sums for the metrics: entropy (per token), the
  sampler-vs-trainer gap (old - new log-prob per token; ~0 on the first update of a batch), and the loss's own."""
  logp_BT, entropy_BT = losses.sequence_logprobs(cfg, run, sharder, params, batch, chunk=chunk, with_entropy=True,
                                                 temperature=temperature)
  mask = batch["weights"]
  total, weight, extra = pl.policy_loss(logp_BT, batch["old_logprobs"], batch["advantages"], mask, eps_low=eps_low,
                                        eps_high=eps_high, aggregation=aggregation, max_len=max_len)
  m = mask.astype(jnp.float32)
  extra["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy_BT) * m)
  extra["logprob_gap"] = jnp.sum(jax.lax.stop_gradient(batch["old_logprobs"] - logp_BT) * m)
  return total, weight, extra
