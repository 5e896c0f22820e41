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
REF_BATCH_AXES = {**RL_BATCH_AXES, "ref_logprobs": ("batch", "seq")}  # with a KL term: the reference's log-probs


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
            aggregation: str = "token-mean", max_len: int = 1, beta: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
  """The clipped policy loss of a response batch (+ beta * k3 KL to batch["ref_logprobs"] when beta > 0), with
  extra sums over response tokens for the metrics: entropy; logprob_gap, |old - new log-prob| (the sampler vs the
  trainer: ~0 on the first update of a batch); kl, k3 KL to the reference, or without one to the sampling policy
  (how far the updates have moved it); and policy_loss's tokens, clipped, ratio."""
  logp_BT, entropy_BT = losses.sequence_logprobs(cfg, run, sharder, params, batch, chunk=chunk, with_entropy=True,
                                                 temperature=temperature)
  mask, ref = batch["weights"], batch.get("ref_logprobs")
  total, weight, extra = pl.policy_loss(logp_BT, batch["old_logprobs"], batch["advantages"], mask, eps_low=eps_low,
                                        eps_high=eps_high, aggregation=aggregation, max_len=max_len,
                                        ref_logp_BT=ref if beta else None, beta=beta)
  m = mask.astype(jnp.float32)
  sg = jax.lax.stop_gradient
  extra["entropy"] = jnp.sum(sg(entropy_BT) * m)
  extra["logprob_gap"] = jnp.sum(jnp.abs(sg(batch["old_logprobs"] - logp_BT)) * m)
  extra["kl"] = jnp.sum(sg(pl.k3_kl(logp_BT, ref if ref is not None else batch["old_logprobs"])) * m)
  return total, weight, extra


# --- rewards and prompt order (host side) -------------------------------------------------------------------------

OVERLONG = ("none", "mask", "penalty")


def rewards(correct: np.ndarray, lengths: np.ndarray, *, max_new_tokens: int, correct_reward: float = 1.0,
            wrong_reward: float = -1.0, overlong: str = "none", buffer: int = 0, penalty: float = 1.0) -> np.ndarray:
  """Verifiable reward per response: correct_reward / wrong_reward, plus DAPO's soft overlong penalty when
  `overlong` = "penalty": -penalty * (L - (max_new_tokens - buffer)) / buffer for a response of L tokens within
  the last `buffer` tokens of the budget (0 before it, -penalty at the budget). ("mask" drops truncated responses
  from the loss instead: see `response_rows`' weights, zeroed by the caller.)"""
  r = np.where(np.asarray(correct, bool), correct_reward, wrong_reward).astype(np.float32)
  if overlong == "penalty" and buffer > 0:
    over = np.asarray(lengths, np.float32) - (max_new_tokens - buffer)
    r = r - penalty * np.clip(over, 0.0, float(buffer)) / buffer
  return r


def has_signal(labels_G: np.ndarray) -> bool:
  """Whether a group's labels differ: its verdicts (some right, some wrong), not its shaped rewards, which also
  differ by length under the overlong penalty (see `stages.rl.has_signal`). All equal: the group teaches nothing."""
  v = np.asarray(labels_G)
  return bool(v.size and np.any(v != v.flat[0]))


class PromptStream:
  """Problem ids in a seeded order, reshuffled each epoch (the order depends on (seed, epoch) only). Its state,
  {"epoch", "position"}, is what a checkpoint keeps to resume exactly."""

  def __init__(self, ids: Sequence[str], seed: int):
    if not ids:
      raise ValueError("no prompts")
    self.ids, self.seed, self.epoch, self.position = list(ids), seed, 0, 0
    self._order = self._shuffled(0)

  def _shuffled(self, epoch: int) -> list[str]:
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
    return [self.ids[i] for i in perm]

  def take(self, n: int) -> list[tuple[int, str]]:
    """The next n (epoch, id) pairs (crossing into the next epoch's order when this one runs out)."""
    out = []
    while len(out) < n:
      if self.position == len(self._order):
        self.epoch, self.position = self.epoch + 1, 0
        self._order = self._shuffled(self.epoch)
      out.append((self.epoch, self._order[self.position]))
      self.position += 1
    return out

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position, "prompts": len(self.ids)}

  def set_state(self, state: dict) -> None:
    if state.get("prompts", len(self.ids)) != len(self.ids):
      raise ValueError(f"the checkpoint's prompt stream had {state['prompts']} prompts, this run has {len(self.ids)}")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    self._order = self._shuffled(self.epoch)
