"""Sampled responses -> the RL training batch, fixed shapes, the sampler's log-probs aligned with the trainer's
targets, and the loss that scores them (`rl_loss`, the trainer's loss contract). Three layouts:

`response_rows`: one response a row of max_prompt_tokens + max_new_tokens ([T] each): tokens = prompt + response
(+ padding), positions 0.., segment_ids 1 on real tokens, targets[j] = tokens[j + 1], weights 1 where targets[j] is
a response token, old_logprobs[j] = the sampler's log-prob of targets[j]; per row, its advantage.

`packed_response_rows`: (prompt + response) sequences packed first-fit into rows of `train_tokens` (the SFT
packing: segment ids 1, 2, ... a row, positions restarting at 0 per segment, attention within a segment), the same
per-token arrays, and the advantages per token ([B, T]). Loss and gradients equal the padded layout's (the
seq-mean aggregations sum per segment); the update costs the tokens sampled, not rows x the longest row.

`shared_prompt_rows`: packed, with a GRPO group's prompt packed once and its responses after it, each attending
to the prompt and itself (the model's prefix_segment input): the same loss and gradients, and a group of G
responses costs one prompt, not G.

Either way most positions of a row are prompt: `rl_loss(targets_per_row=K)` runs the head (vocabulary projection,
log-softmax, entropy) only at each row's response positions (K: max_new_tokens for one response a row; for packed
rows the cap `packed_response_rows` packed them under), not at all T.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from astro_jax.model.config import Execution, ModelConfig
from astro_jax.model.llama import forward
from astro_jax.sharding import Sharder
from astro_jax.train import data, losses
from astro_jax.train import policy_loss as pl

_TOKEN_KEYS = ("tokens", "positions", "segment_ids", "targets", "weights", "old_logprobs")
RL_BATCH_AXES = {**{k: ("batch", "seq") for k in _TOKEN_KEYS}, "advantages": ("batch",)}
REF_BATCH_AXES = {**RL_BATCH_AXES, "ref_logprobs": ("batch", "seq")}  # with a KL term: the reference's log-probs
PACKED_BATCH_AXES = {k: ("batch", "seq") for k in _TOKEN_KEYS + ("advantages",)}  # advantages per token


def rl_batch_axes(*, packed: bool = False, shared: bool = False, ref: bool = False,
                  prox: bool = False) -> dict[str, tuple[str, ...]]:
  """The logical axes of the RL batch inputs: packed rows (per-token advantages; with `shared` prompts packed once,
  `shared_prompt_rows`) or one response a row; with the reference's log-probs (KL term) and/or the trainer's
  log-probs at the sampling weights (TIS's prox_logprobs)."""
  axes = dict(PACKED_BATCH_AXES if packed else RL_BATCH_AXES)
  for key, wanted in (("prefix_segment", packed and shared), ("ref_logprobs", ref), ("prox_logprobs", prox)):
    if wanted:
      axes[key] = ("batch", "seq")
  return axes


def targets_per_row(max_new_tokens: int, seq_len: int, train_tokens: int = 0, group_size: int = 0) -> int:
  """The response tokens a training row holds at most (the head runs only at those positions): one response's
  budget in a padded row; in a packed row of train_tokens, one budget per seq_len-long sequence it could hold,
  rounded up; with prompts shared by groups of `group_size` (> 0), one group's budget, or the row less half the
  prompt budget if smaller (the packer keeps every row under this cap: a row whose responses would hold more
  starts another row)."""
  if group_size and train_tokens:
    return min(group_size * max_new_tokens, train_tokens - (seq_len - max_new_tokens) // 2)
  return max_new_tokens * (-(-train_tokens // seq_len) if train_tokens else 1)


def packed_rows(configured: int, rows_per_micro: int, max_prompt_tokens: int, max_new_tokens: int,
                train_tokens: int, group_size: int = 0) -> int:
  """Packed rows per micro-batch: `configured`, or (0) the rows that hold its items whole at half the response
  budget: rows_per_micro sequences of max_prompt_tokens + max_new_tokens / 2 tokens, or with prompts shared by
  groups of `group_size` (> 0) its groups of one prompt + G such responses (a group longer than a row is cut into
  rows). Items are not split across rows, so a row holds floor(train_tokens / item) of them. A step whose responses
  run longer spills into another micro-batch."""
  if configured:
    return configured
  items, item_tokens = ((-(-rows_per_micro // group_size), max_prompt_tokens + group_size * (max_new_tokens // 2 + 1))
                        if group_size else (rows_per_micro, max_prompt_tokens + max_new_tokens // 2))
  if item_tokens > train_tokens:
    return max(1, -(-items * item_tokens // train_tokens))
  return max(1, -(-items // (train_tokens // item_tokens)))


def _check_responses(prompt_ids, responses, old_logprobs, advantages) -> None:
  if not (len(prompt_ids) == len(old_logprobs) == len(advantages) == len(responses)):
    raise ValueError("prompt_ids, responses, old_logprobs and advantages need one entry per response")
  for b, (response, lps) in enumerate(zip(responses, old_logprobs)):
    if len(lps) != len(response):
      raise ValueError(f"response {b}: {len(response)} tokens but {len(lps)} log-probs")


def response_rows(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  old_logprobs: Sequence[Sequence[float]], advantages: Sequence[float],
                  seq_len: int) -> dict[str, np.ndarray]:
  """One row per (prompt, response) pair (prompts repeated by the caller for its G responses)."""
  _check_responses(prompt_ids, responses, old_logprobs, advantages)
  B = len(responses)
  out = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "positions", "segment_ids", "targets")}
  out["weights"] = np.zeros((B, seq_len), np.float32)
  out["old_logprobs"] = np.zeros((B, seq_len), np.float32)
  out["advantages"] = np.asarray(advantages, np.float32)
  for b, (prompt, response, lps) in enumerate(zip(prompt_ids, responses, old_logprobs)):
    P, R = len(prompt), len(response)
    if P < 1 or P + R > seq_len:
      raise ValueError(f"response {b}: prompt {P} + response {R} tokens do not fit seq_len {seq_len}")
    seq = np.asarray(list(prompt) + list(response), np.int32)
    n = P + R
    out["tokens"][b, :n], out["positions"][b, :n], out["segment_ids"][b, :n] = seq, np.arange(n), 1
    out["targets"][b, :n - 1] = seq[1:]
    out["weights"][b, P - 1:n - 1] = 1.0  # position j predicts token j + 1: the response starts at P
    out["old_logprobs"][b, P - 1:n - 1] = np.asarray(lps, np.float32)
  return out


def packed_response_rows(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                         old_logprobs: Sequence[Sequence[float]], advantages: Sequence[float], *, train_tokens: int,
                         rows_per_micro: int, micro_batches: int = 1, in_loss: Sequence[bool] | None = None,
                         targets_per_row: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
  """One optimizer update's responses packed into rows of `train_tokens`: (rows, info).

  Each (prompt + response) sequence goes, longest first, into the first row with room (first-fit, as `data.pack`):
  room for its tokens and, with `targets_per_row`, for its response tokens (so `rl_loss(targets_per_row=...)` can
  project only those through the head). The rows come in whole micro-batches of `rows_per_micro`: `micro_batches`
  of them, or more when the sequences need more rows (a spill: the update then has info["micro_batches"]
  micro-batches, a new shape for the step); empty rows (segment 0, weight 0) make up the rest. Responses out of
  the loss (`in_loss` False, e.g. truncated ones under reward.overlong = mask) and empty responses are left out:
  like their zero-weight padded rows, they would add nothing to the loss, its gradients or its sums.

  rows ([micro_batches * rows_per_micro, train_tokens] each): tokens, positions, segment_ids, targets, weights,
  old_logprobs as `response_rows` lays them out per segment, and advantages per token (its response's advantage
  on its weighted positions, else 0). info: micro_batches, spilled (micro-batches past `micro_batches`), rows
  (rows holding a sequence), sequences, tokens (real tokens), fill (tokens / token slots).
  """
  keep = _packable(prompt_ids, responses, old_logprobs, advantages, train_tokens, rows_per_micro, micro_batches,
                   in_loss, targets_per_row)
  examples = []  # (tokens, loss mask) of each kept sequence: the SFT packer's Example
  for b in keep:
    P, R = len(prompt_ids[b]), len(responses[b])
    mask = np.zeros(P + R, bool)
    mask[P:] = True  # token i is a target: the response's
    examples.append(data.Example(str(b), np.asarray(list(prompt_ids[b]) + list(responses[b]), np.int32), mask))
  bins = _first_fit([(len(examples[i].tokens), len(responses[keep[i]])) for i in range(len(keep))],
                    (train_tokens, targets_per_row or train_tokens))
  n_micro = max(micro_batches, -(-len(bins) // rows_per_micro))
  n_rows = n_micro * rows_per_micro
  out = _empty_rows(n_rows, train_tokens, PACKED_BATCH_AXES)
  for r, members in enumerate(bins):
    for k, v in data._pack_row([examples[i] for i in members], train_tokens).items():
      out[k][r] = v
    offset = 0
    for i in members:
      b, n = keep[i], len(examples[i].tokens)
      span = slice(offset + len(prompt_ids[b]) - 1, offset + n - 1)  # the positions that predict the response
      out["old_logprobs"][r, span] = np.asarray(old_logprobs[b], np.float32)
      out["advantages"][r, span] = np.float32(advantages[b])
      offset += n
  tokens = sum(len(e.tokens) for e in examples)
  info = {"micro_batches": n_micro, "spilled": n_micro - micro_batches, "rows": len(bins), "sequences": len(keep),
          "tokens": tokens, "fill": tokens / (n_rows * train_tokens)}
  return out, info


def _packable(prompt_ids, responses, old_logprobs, advantages, train_tokens: int, rows_per_micro: int,
              micro_batches: int, in_loss: Sequence[bool] | None, targets_per_row: int | None) -> list[int]:
  """The packers' checks; the responses they pack: those in the loss and not empty."""
  _check_responses(prompt_ids, responses, old_logprobs, advantages)
  if train_tokens < 2 or rows_per_micro < 1 or micro_batches < 1:
    raise ValueError(f"train_tokens={train_tokens}, rows_per_micro={rows_per_micro}, micro_batches={micro_batches}:"
                     " need train_tokens >= 2 and at least one row and one micro-batch")
  keep = [b for b in range(len(responses)) if len(responses[b]) and (in_loss is None or in_loss[b])]
  for b in keep:
    P, R = len(prompt_ids[b]), len(responses[b])
    if P < 1 or P + R > train_tokens:
      raise ValueError(f"response {b}: prompt {P} + response {R} tokens do not fit train_tokens {train_tokens}")
  if targets_per_row is not None and any(len(responses[b]) > targets_per_row for b in keep):
    raise ValueError(f"a response of {max(len(responses[b]) for b in keep)} tokens > targets_per_row "
                     f"{targets_per_row}")
  return keep


def _first_fit(sizes: Sequence[tuple[int, int]], room: tuple[int, int]) -> list[list[int]]:
  """Items of (tokens, targets) sizes, largest first (stable), each into the first row with room for both: the
  rows' item indices."""
  order = sorted(range(len(sizes)), key=lambda i: -sizes[i][0])
  free_N2 = np.tile(room, (max(len(sizes), 1), 1))
  bins: list[list[int]] = []
  for i in order:
    r = int(np.argmax(np.all(free_N2 >= sizes[i], axis=1)))  # the first row with room (an empty one always has)
    free_N2[r] -= sizes[i]
    if r == len(bins):
      bins.append([])
    bins[r].append(i)
  return bins


def _empty_rows(n_rows: int, train_tokens: int, axes: dict) -> dict[str, np.ndarray]:
  floats = ("weights", "old_logprobs", "advantages")
  return {k: np.zeros((n_rows, train_tokens), np.float32 if k in floats else np.int32) for k in axes}


def shared_prompt_rows(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                       old_logprobs: Sequence[Sequence[float]], advantages: Sequence[float], *, train_tokens: int,
                       rows_per_micro: int, micro_batches: int = 1, in_loss: Sequence[bool] | None = None,
                       targets_per_row: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
  """`packed_response_rows` with each prompt packed once for its responses: (rows, info), rows also holding
  prefix_segment (the model's attention input: a response's tokens see its prompt's segment, not its siblings').

  The responses of one prompt (equal prompt token lists: a GRPO group) form chunks: the prompt's first P - 1 tokens
  (positions 0..P-2, a segment of their own, weight 0), then each response as a segment of its own that repeats
  the prompt's last token first (positions P-1.., prefix_segment = the prompt's segment), so the position that
  predicts a response's first token is the response's own. A chunk takes a prompt's responses, longest first,
  while they fit one row (train_tokens, and targets_per_row response tokens); chunks are packed first-fit, largest
  first, into whole micro-batches as `packed_response_rows` packs sequences. Every response token's context is
  its prompt and its own earlier tokens, as in its padded row: the same loss and gradients, for G responses a
  prompt (G - 1)(P - 1) fewer tokens through the layers.
  """
  keep = _packable(prompt_ids, responses, old_logprobs, advantages, train_tokens, rows_per_micro, micro_batches,
                   in_loss, targets_per_row)
  groups: dict[tuple[int, ...], list[int]] = {}
  for b in keep:
    groups.setdefault(tuple(int(t) for t in prompt_ids[b]), []).append(b)
  chunks: list[tuple[tuple[int, ...], list[int]]] = []  # (prompt, its responses in this chunk)
  sizes: list[tuple[int, int]] = []  # (tokens, response tokens) of each chunk
  for prompt, members in groups.items():
    current, tokens, targets = [], len(prompt) - 1, 0
    for b in sorted(members, key=lambda b: -len(responses[b])):
      R = len(responses[b])
      if current and (tokens + 1 + R > train_tokens or (targets_per_row and targets + R > targets_per_row)):
        chunks.append((prompt, current))
        sizes.append((tokens, targets))
        current, tokens, targets = [], len(prompt) - 1, 0
      current, tokens, targets = current + [b], tokens + 1 + R, targets + R
    chunks.append((prompt, current))
    sizes.append((tokens, targets))
  bins = _first_fit(sizes, (train_tokens, targets_per_row or train_tokens))
  n_micro = max(micro_batches, -(-len(bins) // rows_per_micro))
  n_rows = n_micro * rows_per_micro
  out = _empty_rows(n_rows, train_tokens, rl_batch_axes(packed=True, shared=True))
  for r, members in enumerate(bins):
    offset, segment = 0, 0
    for i in members:
      prompt, bs = chunks[i]
      P, prefix = len(prompt), 0
      if P > 1:
        segment += 1
        prefix, span = segment, slice(offset, offset + P - 1)
        out["tokens"][r, span], out["positions"][r, span], out["segment_ids"][r, span] = prompt[:-1], \
            np.arange(P - 1), segment
        offset += P - 1
      for b in bs:
        segment += 1
        seq = np.asarray([prompt[-1], *responses[b]], np.int32)
        n = len(seq)
        span, predicts = slice(offset, offset + n), slice(offset, offset + n - 1)
        out["tokens"][r, span], out["positions"][r, span] = seq, np.arange(P - 1, P - 1 + n)
        out["segment_ids"][r, span], out["prefix_segment"][r, span] = segment, prefix
        out["targets"][r, predicts], out["weights"][r, predicts] = seq[1:], 1.0
        out["old_logprobs"][r, predicts] = np.asarray(old_logprobs[b], np.float32)
        out["advantages"][r, predicts] = np.float32(advantages[b])
        offset += n
  tokens = sum(t for t, _ in sizes)
  info = {"micro_batches": n_micro, "spilled": n_micro - micro_batches, "rows": len(bins), "sequences": len(keep),
          "tokens": tokens, "fill": tokens / (n_rows * train_tokens)}
  return out, info


def response_logprobs(cfg: ModelConfig, run: Execution, sharder: Sharder | None, params: dict, batch: dict, *,
                      chunk: int, temperature: float = 1.0, targets_per_row: int | None = None
                      ) -> tuple[jax.Array, jax.Array, dict]:
  """(log p [B, K], entropy [B, K], the batch's per-token arrays at those K positions a row) of the targets.

  targets_per_row None: every position (K = T). Else only the first K weighted positions of each row go through the
  head (the vocabulary projection: most positions of an RL row are prompt, and the head is computed at every one);
  a row with more weighted positions loses the rest, counted in the extra sum "targets_dropped" (must be 0: one
  response a row of max_new_tokens, or packed with the same targets_per_row, never drops any)."""
  if targets_per_row is None:
    logp_BT, entropy_BT = losses.sequence_logprobs(cfg, run, sharder, params, batch, chunk=chunk, with_entropy=True,
                                                   temperature=temperature)
    return logp_BT, entropy_BT, batch
  hidden_BTD, _ = forward(cfg, sharder, params, batch["tokens"], batch["positions"],
                          segment_ids_BT=batch["segment_ids"],
                          prefix_segment_BT=batch.get("prefix_segment"), run=run, hidden_only=True)
  targeted_BT = batch["weights"] > 0
  idx_BK = jax.vmap(lambda w: jnp.nonzero(w, size=targets_per_row, fill_value=0)[0])(targeted_BT)
  valid_BK = jnp.arange(targets_per_row)[None, :] < jnp.sum(targeted_BT, axis=1, keepdims=True)
  take = lambda x: jnp.take_along_axis(x, idx_BK, axis=1)
  at = {k: take(v) if v.ndim == 2 else v for k, v in batch.items()}  # advantages [B] stay
  at["weights"] = at["weights"] * valid_BK
  hidden_BKD = jnp.take_along_axis(hidden_BTD, idx_BK[..., None], axis=1)
  logp_BK, entropy_BK = losses.target_logprobs(cfg, params, hidden_BKD, at["targets"], dt=run.jnp_dtype,
                                               chunk=chunk, sharder=sharder, with_entropy=True,
                                               temperature=temperature)
  return logp_BK, entropy_BK, at


def rl_loss(cfg: ModelConfig, run: Execution, sharder: Sharder | None, params: dict, batch: dict, *, chunk: int,
            temperature: float = 1.0, eps_low: float = 0.2, eps_high: float = 0.28, aggregation: str = "token-mean",
            max_len: int = 1, beta: float = 0.0, tis_cap: float | None = None,
            targets_per_row: int | None = None) -> tuple[jax.Array, jax.Array, dict]:
  """The clipped policy loss of a response batch, padded or packed (+ beta * k3 KL to batch["ref_logprobs"] when
  beta > 0; token-level truncated importance sampling when tis_cap > 0, see `policy_loss.policy_loss`; the head
  only at the response positions with targets_per_row, see `response_logprobs`), with extra sums over response
  tokens for the metrics: entropy; logprob_gap, |old - new log-prob| (the sampler vs the trainer: ~0 on the first
  update of a batch); kl, k3 KL to the reference, or without one to the sampling policy (how far the updates have
  moved it); policy_loss's tokens, clipped, ratio (tis_weight, tis_capped); and the rollout/trainer mismatch
  (`policy_loss.mismatch_sums`: mismatch_abs, mismatch_max, mismatch_k3, mismatch_out) of the sampler's log-probs
  against the trainer's at the sampling weights: batch["prox_logprobs"] when given, else the current weights'
  (exact on the first update of a batch, drift included on later ones)."""
  logp_BT, entropy_BT, at = response_logprobs(cfg, run, sharder, params, batch, chunk=chunk, temperature=temperature,
                                              targets_per_row=targets_per_row)
  mask, ref, old, prox = at["weights"], at.get("ref_logprobs"), at["old_logprobs"], at.get("prox_logprobs")
  total, weight, extra = pl.policy_loss(logp_BT, old, at["advantages"], mask,
                                        eps_low=eps_low, eps_high=eps_high, aggregation=aggregation, max_len=max_len,
                                        ref_logp_BT=ref if beta else None, beta=beta, segment_ids_BT=at["segment_ids"],
                                        tis_cap=tis_cap, prox_logp_BT=prox)
  m = mask.astype(jnp.float32)
  sg = jax.lax.stop_gradient
  extra["entropy"] = jnp.sum(sg(entropy_BT) * m)
  extra["logprob_gap"] = jnp.sum(jnp.abs(sg(old - logp_BT)) * m)
  extra["kl"] = jnp.sum(sg(pl.k3_kl(logp_BT, ref if ref is not None else old)) * m)
  extra |= pl.mismatch_sums(logp_BT if prox is None else prox, old, mask)
  if targets_per_row is not None:
    extra["targets_dropped"] = jnp.sum(batch["weights"].astype(jnp.float32)) - jnp.sum(m)
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
