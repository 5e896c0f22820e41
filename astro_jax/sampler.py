"""Batched autoregressive sampling with a preallocated KV cache: prompts -> completions.

This is the static path (`sampler.engine = static`): each batch decodes until its longest row stops.
`astro_jax/engine.py` (the default) runs the same rows with continuous batching and prefix reuse, on the pieces here
(token selection, stop automata, seeding, completions).

One `sample` call takes a list of `Request`s (a prompt's token ids, its `SamplingParams` and a key; `generate` is
the same for prompts that share their params). Rows (a row = one of the n samples of a request) with the same stop
set share decodes: they are sorted by prompt length and cut into batches of at most `max_batch` rows, each row with
its own temperature, top-p, top-k and token budget. Per batch:

  prefill  (jit)  the batch's distinct prompts (identical prompts of different requests are one), left-padded to a bucketed length P, fill a cache of P slots; the
                  cache is padded to P + N slots (N = bucketed token budget) and each prompt's rows are gathered
                  from it, so the n samples of a prompt share one prefill. Logits only at the last position.
  decode   (jit)  one `lax.while_loop` samples a token per row per step until every row has stopped; the cache is
                  donated into it and updated in place.
  host            detokenize, cut exactly at the first stop string, build `Completion`s.

Shapes are bucketed (powers of two: rows, distinct prompts, P, N, stop tables) so that few programs compile.
Randomness. Each row draws from its own stream, fold_in(fold_in(fold_in(key(0), hi), lo), step), where (hi, lo) is a
64-bit hash of (seed, the request's key, sample index) and the key is a stable identity the caller gives (an input
row index, a problem id, (round, tree, node) for MCTS). Never a position in a batch or call: results do not depend
on batching, padding, the mesh or where a run resumed, and identical prompts with different keys get different
samples. On a mesh
the weights follow the "sample" rules (the Sharder given) and rows are split over the batch axes (data x fsdp);
row counts are padded to a multiple of that.

Decode speed (XLA:CPU, SmolLM2-135M; see benchmarks/sampler.py): by default the sampler keeps its own copy of
the weights split into per-layer buffers and a per-layer KV cache, and unrolls the layers, so a step reads each
weight and cache buffer in place; slicing layer i out of stacked [L, ...] arrays inside `lax.scan` copied every
weight and the layer's cache once per step (about 2x slower at batch 1). The copy also fuses each layer's q/k/v
projections into one matmul (`split_layers(fuse=True)`; each matmul pays a fixed cost). It costs one more set
of weights in memory; `unroll_layers=False` keeps the stacked layout and scans (fast compiles for deep models).
Where a CPU step goes (profiled on 2 cores): at batch 1, the matmuls stream the weights at ~20-27 GB/s against
~31 GB/s for one large matrix-vector product: of the 151 matmuls, those that follow single-threaded work (q/k/v
after the norm, the output projection after attention) wait 40-70 us for the second core to join;
at batch 16 and 64 the matmuls run through YNNPACK at ~70 GFLOP/s and attention over the cache takes 25-35%.
Measured and not worth it there: [out, in] weight layouts, gate/up fusion (-5% at batch 16/64), attention as
batched dots, the XLA flags that route dots to Eigen, oneDNN or XNNPACK instead of YNNPACK or reductions away
from YNNPACK, splitting the [576, 576] output projection (it runs on one core) into two batched halves (<= 5% at
batch 1, hurts at 64), and attending over a static live prefix of the cache (a strided slice: 30-75% slower).

Stop strings. Inside the loop each row runs one small automaton per stop string over the text of its tokens (a
host-precomputed [state, token] transition table, like KMP over token texts), so a row stops at the token that
completes a stop string, even when the string spans several tokens. The automaton assumes a sequence's text is
the concatenation of its tokens' texts (true for byte-level BPE on whole characters); the host then checks the
decoded text, which is authoritative: it cuts the text exactly at the first occurrence and the tokens at the one
that completes it (that token may carry text past the stop string; its ids stay, the text is cut). A stop the
loop missed is still cut on the host (the row just ran longer than needed).

Log-probs. `logprobs`: under the distribution actually sampled from (temperature, then top-k, then top-p,
renormalized); with temperature 0 (greedy) it is the untempered model's log-prob, like `model_logprobs`.
`model_logprobs`: log_softmax of the raw model logits (temperature 1, full vocabulary).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from astro_jax.model.config import Execution, ModelConfig
from astro_jax.model.llama import KVCache, Llama, forward, split_layers, weight_specs
from astro_jax.sharding import Sharder

# Finish codes used inside the loop; 0 = still running.
_RUNNING, _EOS, _STOP, _LENGTH = 0, 1, 2, 3
_NEVER = 255  # stop length of padding automata: states are uint8 <= 254, so they never match
FINISH_REASONS = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters.

  stop: strings that end a completion (searched in the generated text only, not the prompt), e.g. "\n\n"
    to expand one reasoning step at a time.
  include_stop_str: keep the stop string at the end of `Completion.text` (default: cut just before it).
  ignore_eos: do not stop on EOS ids (EOS may still be sampled; benchmarks: always produce max_new_tokens).
  seed: with the request's key, the sample index and the step, the only source of randomness.
  """
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 256
  n: int = 1
  stop: tuple[str, ...] = ()
  include_stop_str: bool = False
  ignore_eos: bool = False
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
    problems = sampling_problems(self)
    if problems:
      raise ValueError("invalid sampling settings: " + "; ".join(f"{k} {why}" for k, why in problems.items()))


def sampling_problems(params) -> dict[str, str]:
  """{field: what is wrong} for sampling settings (a SamplingParams or anything with its fields, e.g. a config)."""
  checks = {"temperature": (params.temperature >= 0, "must be >= 0 (0 = greedy)"),
            "top_p": (0 < params.top_p <= 1, "must be in (0, 1]"),
            "top_k": (params.top_k >= 0, "must be >= 0 (0 = off)"),
            "max_new_tokens": (params.max_new_tokens >= 1, "must be >= 1"),
            "n": (params.n >= 1, "must be >= 1"),
            "seed": (0 <= params.seed < 2**32, "must be in [0, 2**32)"),
            "stop": (all(isinstance(x, str) and x for x in params.stop), "strings must be non-empty")}
  return {name: f"= {getattr(params, name)!r}: {why}" for name, (ok, why) in checks.items() if not ok}


SEEDING = "blake2b-64(json([seed, key, sample])) -> fold_in(fold_in(key(0), hi), lo), then step"  # see stream_id


def stream_id(seed: int, key: Any, sample: int) -> tuple[int, int]:
  """One row's 64-bit PRNG stream as two uint32 words: a hash of (seed, the request's key, sample index).
  `key` is any JSON value (an int, a string, a list of them): a stable identity given by the caller."""
  blob = json.dumps([seed, key, sample], separators=(",", ":")).encode()
  digest = int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")
  return digest >> 32, digest & 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class Request:
  """params.n samples continuing `prompt` (token ids); `key` (a JSON value) seeds them, with params.seed."""
  prompt: Sequence[int]
  params: SamplingParams
  key: Any


@dataclasses.dataclass
class Completion:
  """One sampled continuation. token_ids includes the terminating token (EOS, or the one completing a stop)."""
  text: str
  token_ids: list[int]
  logprobs: list[float]        # per token, under the sampling distribution (see module doc)
  model_logprobs: list[float]  # per token, under the untempered full model distribution
  finish_reason: str           # "eos" | "stop" | "length"


@dataclasses.dataclass
class SamplerStats:
  """Running totals of a Sampler (reset by assigning a new one): what benchmarks and search stages report."""
  calls: int = 0        # `sample` / `generate` calls
  batches: int = 0      # prefill + decode programs run
  requests: int = 0
  rows: int = 0         # sampled continuations
  tokens: int = 0       # tokens generated (all rows)
  row_steps: int = 0    # decode slots spent: rows x loop steps of their batch (finished rows idle until the last)
  seconds: float = 0.0  # wall time inside `sample`
  prefill_tokens: int = 0    # prompt tokens of the prompts prefilled (each distinct prompt of a batch once)
  prefill_computed: int = 0  # of those, the ones computed (the rest came from kept prefixes: the engine)

  @property
  def live_row_fraction(self) -> float:
    """Fraction of decoded row-steps that belonged to rows still running."""
    return self.tokens / self.row_steps if self.row_steps else 1.0


# --- Token selection (pure, jit-friendly) ----------------------------------------------------------------------

def _truncate(scaled_BV: jax.Array, top_p_B: jax.Array, top_k_B: jax.Array) -> jax.Array:
  """Top-k, then top-p (smallest set of most likely tokens with mass >= p); others -> -inf. Ties are kept."""
  V = scaled_BV.shape[-1]
  desc_BV = -jnp.sort(-scaled_BV, axis=-1)
  rank_V = jnp.arange(V)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
  desc_BV = jnp.where(rank_V < k_B[:, None], desc_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(desc_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  n_keep_B = jnp.sum((mass_before_BV < top_p_B[:, None]) & (rank_V < k_B[:, None]), axis=-1)
  threshold_B = jnp.take_along_axis(desc_BV, jnp.maximum(n_keep_B - 1, 0)[:, None], axis=-1)
  return jnp.where(scaled_BV >= threshold_B, scaled_BV, -jnp.inf)


def sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array,
                  top_k_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One token per row. Returns (token [B] int32, log-prob under the sampling distribution, model log-prob)."""
  logits_BV = logits_BV.astype(jnp.float32)
  model_lp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  greedy_B = temperature_B <= 0
  greedy_tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def draw(_):
    scaled_BV = logits_BV / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    needs_cut = jnp.any(~greedy_B & ((top_k_B > 0) | (top_p_B < 1)))
    scaled_BV = jax.lax.cond(needs_cut, _truncate, lambda x, *_: x, scaled_BV, top_p_B, top_k_B)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BV).astype(jnp.int32)
    tok_B = jnp.where(greedy_B, greedy_tok_B, drawn_B)
    sample_lp_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
    return tok_B, sample_lp_B

  tok_B, sample_lp_B = jax.lax.cond(jnp.all(greedy_B), lambda _: (greedy_tok_B, jnp.zeros_like(temperature_B)),
                                    draw, None)
  model_lp_B = jnp.take_along_axis(model_lp_BV, tok_B[:, None], axis=-1)[:, 0]
  return tok_B, jnp.where(greedy_B, model_lp_B, sample_lp_B), model_lp_B


# --- Stop strings: token-level automaton (host precompute) -----------------------------------------------------

def stop_automaton(stop: Sequence[str], token_texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Transition tables for matching stop strings over token texts.

  Returns table [n_stop, M + 1, V] uint8 (M = longest stop string; state j = the text so far ends with
  stop[:j]; state len(stop) = matched, absorbing) and lengths [n_stop] int32.
  """
  V, M = len(token_texts), max(len(s) for s in stop)
  if M >= _NEVER:
    raise ValueError(f"stop strings longer than {_NEVER - 1} characters are not supported")
  table = np.zeros((len(stop), M + 1, V), np.uint8)
  for i, s in enumerate(stop):
    m, chars = len(s), set(s)
    table[i, m, :] = m
    for t, text in enumerate(token_texts):
      if text and text[0] not in chars and text[-1] not in chars and s not in text:
        continue  # can neither complete a match nor end inside one: state 0 (the table's default)
      for j in range(m):
        u = s[:j] + text
        table[i, j, t] = m if s in u else next(k for k in range(min(m - 1, len(u)), -1, -1) if u.endswith(s[:k]))
  return table, np.array([len(s) for s in stop], np.int32)


def _find_stop(text: str, stop: Sequence[str]) -> tuple[int, str] | None:
  """(position, string) of the earliest stop string in text (the longest one on a tie), or None."""
  hits = [(text.find(s), -len(s), s) for s in stop if s in text]
  return (min(hits)[0], min(hits)[2]) if hits else None


# --- Jitted prefill and decode ----------------------------------------------------------------------------------

class RowParams(NamedTuple):
  """Per-row sampling settings (all [B])."""
  stream: jax.Array       # [B, 2] uint32: the row's PRNG stream (`stream_id`)
  active: jax.Array       # bool: False for batch padding rows
  temperature: jax.Array  # float32
  top_p: jax.Array        # float32
  top_k: jax.Array        # int32
  max_new: jax.Array      # int32: token budget


class DecodeOut(NamedTuple):
  tokens: jax.Array          # [B, N] int32
  logprobs: jax.Array        # [B, N] float32
  model_logprobs: jax.Array  # [B, N] float32
  lengths: jax.Array         # [B] int32: tokens produced
  finish: jax.Array          # [B] int32 finish code


def _constrain_cache(sharder: Sharder | None, cache: KVCache) -> KVCache:
  if sharder is None:
    return cache
  lead = 1 if cache.per_layer else 0  # per-layer buffers have no "layers" axis
  k_axes, v_axes = KVCache.AXES_K[lead:], KVCache.AXES_V[lead:]
  return cache._replace(k=jax.tree.map(lambda x: sharder.constrain(x, k_axes), cache.k),
                        v=jax.tree.map(lambda x: sharder.constrain(x, v_axes), cache.v))


def _expand_cache(cache: KVCache, src_R: jax.Array, new_slots: int) -> KVCache:
  """Rows src_R of the cache (one copy per decode row), with `new_slots` empty slots appended."""
  lead = 0 if cache.per_layer else 1  # index of the batch axis

  def expand(x, seq_axis):
    x = jnp.take(x, src_R, axis=lead)
    return jnp.pad(x, [(0, new_slots if a == seq_axis + lead else 0) for a in range(x.ndim)])
  return cache._replace(k=jax.tree.map(lambda x: expand(x, 3), cache.k),
                        v=jax.tree.map(lambda x: expand(x, 2), cache.v))


def _prefill(cfg: ModelConfig, run: Execution, sharder: Sharder | None, params: dict, tokens_BP: jax.Array,
             kv_mask_BP: jax.Array, src_R: jax.Array, *, new_slots: int, cache_dtype) -> tuple[KVCache, jax.Array]:
  """Prefill B distinct prompts, then give each of the R decode rows a copy of its prompt's cache (src_R).

  Returns the cache (P + new_slots slots, R rows) and the next-token logits [R, V].
  """
  B, P = tokens_BP.shape
  positions_BP = jnp.maximum(jnp.cumsum(kv_mask_BP, axis=1) - 1, 0).astype(jnp.int32)
  cache = KVCache.zeros(cfg, B, P, cache_dtype, per_layer="layers" in params)
  logits_B1V, cache = forward(cfg, sharder, params, tokens_BP, positions_BP, kv_mask_BP, cache, run=run,
                              last_only=True)
  cache = _constrain_cache(sharder, _expand_cache(cache, src_R, new_slots))
  return cache, jnp.take(logits_B1V[:, 0], src_R, axis=0)


def _decode(cfg: ModelConfig, run: Execution, sharder: Sharder | None, params: dict, cache: KVCache,
            logits_BV: jax.Array,
            kv_mask_BS: jax.Array, pos_B: jax.Array, rows: RowParams, stop_table: jax.Array, stop_len: jax.Array, *,
            budget: int, eos_ids: tuple[int, ...], pad_id: int) -> tuple[DecodeOut, KVCache]:
  """Sample up to `budget` tokens per row in one while_loop that ends when every row has finished."""
  B = logits_BV.shape[0]
  root = jax.random.key(0)
  row_keys_B = jax.vmap(lambda hi, lo: jax.random.fold_in(jax.random.fold_in(root, hi), lo))(
      rows.stream[:, 0], rows.stream[:, 1])
  eos_E = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  stop_ids_K = jnp.arange(stop_table.shape[0])

  def select(t, logits_BV, out: DecodeOut, stop_state_BK):
    """Sample step t for every row, record it, update stop/finish state."""
    keys_B = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys_B)
    tok_B, lp_B, mlp_B = sample_tokens(logits_BV, keys_B, rows.temperature, rows.top_p, rows.top_k)
    running_B = out.finish == _RUNNING
    tok_B = jnp.where(running_B, tok_B, pad_id)
    write = lambda buf, col: jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, t))
    stop_state_BK = stop_table[stop_ids_K[None], stop_state_BK, tok_B[:, None]].astype(jnp.int32)
    is_eos = jnp.any(tok_B[:, None] == eos_E[None], axis=-1)
    is_stop = jnp.any(stop_state_BK == stop_len[None], axis=-1)
    code = jnp.where(is_eos, _EOS, jnp.where(is_stop, _STOP, jnp.where(t + 1 >= rows.max_new, _LENGTH, _RUNNING)))
    out = DecodeOut(write(out.tokens, tok_B), write(out.logprobs, lp_B), write(out.model_logprobs, mlp_B),
                    jnp.where(running_B, t + 1, out.lengths), jnp.where(running_B, code, out.finish))
    return out, stop_state_BK

  zeros = jnp.zeros((B, budget), jnp.float32)
  out = DecodeOut(jnp.full((B, budget), pad_id, jnp.int32), zeros, zeros, jnp.zeros((B,), jnp.int32),
                  jnp.where(rows.active, _RUNNING, _LENGTH).astype(jnp.int32))
  out, stop_state_BK = select(0, logits_BV, out, jnp.zeros((B, stop_table.shape[0]), jnp.int32))

  def cond(carry):
    t, _, out, _ = carry
    return (t < budget) & jnp.any(out.finish == _RUNNING)

  def body(carry):
    t, cache, out, stop_state_BK = carry
    prev_B = jax.lax.dynamic_index_in_dim(out.tokens, t - 1, axis=1, keepdims=False)
    logits_B1V, cache = forward(cfg, sharder, params, prev_B[:, None], (pos_B + t - 1)[:, None], kv_mask_BS, cache,
                                run=run)
    out, stop_state_BK = select(t, logits_B1V[:, 0], out, stop_state_BK)
    return t + 1, cache, out, stop_state_BK

  _, cache, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, stop_state_BK))
  return out, cache


# --- Host side --------------------------------------------------------------------------------------------------

def _fetch(tree):
  """Device results -> NumPy on this host. Multi-host, rows live on every process's devices: all-gather them, so
  that every process gets every row (and so makes the same decisions, e.g. identical search trees)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum): the static sizes programs are compiled for."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Sampler:
  """Generates completions for batches of prompts with a model (optionally on a mesh, sample rule set)."""

  def __init__(self, model: Llama | ModelConfig, tokenizer, *, sharder: Sharder | None = None, max_batch: int = 64,
               dtype: str = "float32", cache_dtype: str | None = None, unroll_layers: bool = True):
    """model: our Llama (its weights are copied, resharded; see `update_weights`), or just its ModelConfig (then
    `update_weights` must give the weights before the first sample, e.g. a trainer's params); tokenizer: an astro_jax
    Tokenizer; sharder: a Sharder with the "sample" rules (None: one device); max_batch: most rows (prompts x
    n) per program; dtype: the sampler's compute dtype (its weight copy is stored in it; the model's own
    execution settings are not used); cache_dtype: KV cache dtype (default: dtype); unroll_layers: per-layer
    weight and cache buffers, layers unrolled (fast decode, slower compiles), else `lax.scan` over stacked layers."""
    self.cfg = model if isinstance(model, ModelConfig) else model.cfg
    self.tokenizer, self.sharder, self.unroll_layers = tokenizer, sharder, unroll_layers
    self.run = Execution(dtype=dtype, remat="none", scan_layers=not unroll_layers)
    self.batch_shards = 1 if sharder is None else math.prod(
        sharder.mesh.shape[a] for a in dict(sharder.rules)["batch"])
    self.max_batch = _round_up(max_batch, self.batch_shards)
    self.cache_dtype = jnp.dtype(cache_dtype or dtype)
    self.eos_ids = tuple(int(i) for i in tokenizer.eos_ids)
    self.pad_id = int(tokenizer.pad_id)
    self._prefill = jax.jit(functools.partial(_prefill, self.cfg, self.run, sharder),
                            static_argnames=("new_slots", "cache_dtype"))
    self._decode = jax.jit(functools.partial(_decode, self.cfg, self.run, sharder),
                           static_argnames=("budget", "eos_ids", "pad_id"), donate_argnames=("cache",))
    self._prepare_weights = jax.jit(self._sampling_weights)
    self.params: dict | None = None
    self._owned: list[jax.Array] = []  # the buffers of self.params that this sampler made (freed on update)
    self._token_texts: list[str] | None = None
    self._stop_tables: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
    self.stats = SamplerStats()
    if not isinstance(model, ModelConfig):
      self.update_weights(model)

  def _sampling_weights(self, params: dict) -> dict:
    """Weights as the sampler keeps them: in its dtype, resharded with the sample rules, per layer if unrolled."""
    out = {}
    for name, (shape, axes) in weight_specs(self.cfg).items():
      w = params[name].astype(self.run.jnp_dtype)
      out[name] = w if self.sharder is None else jax.lax.with_sharding_constraint(w, self.sharder.named(axes, shape))
    return split_layers(out, fuse=True, sharder=self.sharder) if self.unroll_layers else out

  def update_weights(self, weights: Llama | dict) -> None:
    """Take new weights (a model, or its params pytree, e.g. a trainer's after a step) on device: the old copy
    is freed first, then the new one is cast and resharded in one jitted program (compiled once per layout)."""
    params = weights.weights() if isinstance(weights, Llama) else weights
    for a in self._owned:
      a.delete()
    self.params, self._owned = None, []
    params = {name: params[name] for name in weight_specs(self.cfg)}
    self.params = self._prepare_weights(params)
    # jit hands back an input unchanged when the output is that input (same dtype, layout): not ours to free
    given = {id(a) for a in jax.tree.leaves(params)}
    self._owned = [a for a in jax.tree.leaves(self.params) if id(a) not in given]

  def forget_prefixes(self) -> None:
    """Drop kept prefixes (the continuous engine keeps some; this sampler keeps none)."""

  # -- helpers
  def _stop_table(self, stop: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
    """Device stop automaton for these stop strings, padded to bucketed shapes (few decode programs)."""
    if stop not in self._stop_tables:
      if stop and self._token_texts is None:
        texts = self.tokenizer.hf.batch_decode([[i] for i in range(len(self.tokenizer))])
        self._token_texts = (texts + [""] * self.cfg.vocab_size)[:self.cfg.vocab_size]
      exact, exact_lengths = (stop_automaton(stop, self._token_texts) if stop else
                              (np.zeros((0, 1, self.cfg.vocab_size), np.uint8), np.zeros((0,), np.int32)))
      table = np.zeros((bucket(len(stop), 4), bucket(exact.shape[1], 4), self.cfg.vocab_size), np.uint8)
      table[:exact.shape[0], :exact.shape[1]] = exact
      lengths = np.full((table.shape[0],), _NEVER, np.int32)  # padding automata never match
      lengths[:len(exact_lengths)] = exact_lengths
      self._stop_tables[stop] = (self._put(table, replicate=True), self._put(lengths, replicate=True))
    return self._stop_tables[stop]

  def _put(self, x: np.ndarray, replicate: bool = False) -> jax.Array:
    """Host array -> device: split over the batch shards along its leading axis, or replicated."""
    if self.sharder is None:
      return jnp.asarray(x)
    axes = (None,) * x.ndim if replicate else ("batch",) + (None,) * (x.ndim - 1)
    return jax.device_put(x, self.sharder.named(axes, x.shape))

  def encode(self, prompt: str | Sequence[int]) -> list[int]:
    return self.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

  # -- main entry point
  def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams = SamplingParams(),
               keys: Sequence[Any] | None = None) -> list[list[Completion]]:
    """Completions for each prompt (text, or token ids used as is): outer list = prompts, inner = n samples.

    keys: one stable identity per prompt (a JSON value: input row index, problem id, ...) that seeds its samples
    with params.seed; default: the prompt's index in this call (fine for one call, not for a job cut into calls).
    To continue a partial answer, pass prompt + prefix (as text, or better as token ids): the completion is
    what follows it, and stop strings are searched in the completion only.
    """
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
      raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    return self.sample([Request(self.encode(p), params, k) for p, k in zip(prompts, keys)])

  def _check(self, requests: Sequence[Request]) -> None:
    """One line naming the first bad request (empty prompt, prompt + new tokens beyond the context), or no
    weights, before any work."""
    for r, req in enumerate(requests):
      if not req.prompt:
        raise ValueError(f"request {r} (key {req.key!r}): empty prompt")
      longest = len(req.prompt) + req.params.max_new_tokens
      if longest > self.cfg.max_position_embeddings:
        raise ValueError(f"request {r} (key {req.key!r}): prompt ({len(req.prompt)} tokens) + max_new_tokens "
                         f"({req.params.max_new_tokens}) = {longest} > max_position_embeddings "
                         f"{self.cfg.max_position_embeddings}")
    if self.params is None:
      raise ValueError("the sampler has no weights: call update_weights first")

  def sample(self, requests: Sequence[Request]) -> list[list[Completion]]:
    """Completions for each request (its params.n samples), in as few programs as the requests allow: rows that
    share a stop set and EOS handling share decodes, identical prompts share a prefill."""
    self._check(requests)
    began = time.perf_counter()
    results: list[list[Completion | None]] = [[None] * req.params.n for req in requests]
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, req in enumerate(requests):
      group = groups.setdefault((req.params.stop, req.params.ignore_eos), [])
      group.extend((r, j) for j in range(req.params.n))
    for rows in groups.values():
      rows.sort(key=lambda row: -len(requests[row[0]].prompt))  # similar lengths share a batch
      for start in range(0, len(rows), self.max_batch):
        chunk = rows[start:start + self.max_batch]
        for (r, j), completion in zip(chunk, self._sample_batch(requests, chunk)):
          results[r][j] = completion
    self.stats.calls += 1
    self.stats.requests += len(requests)
    self.stats.seconds += time.perf_counter() - began
    return results  # type: ignore[return-value]

  def _sample_batch(self, requests: Sequence[Request], rows: list[tuple[int, int]]) -> list[Completion]:
    """One prefill + one decode for `rows` (request index, sample index), which share stop set and EOS handling."""
    n_shards = self.batch_shards
    first = requests[rows[0][0]].params
    prompts = list(dict.fromkeys(tuple(requests[r].prompt) for r, _ in rows))  # distinct prompts, in order
    B = _round_up(bucket(len(prompts), 1), n_shards)
    R = _round_up(min(bucket(len(rows), 1), self.max_batch), n_shards)
    P = bucket(max(map(len, prompts)))
    N = bucket(max(requests[r].params.max_new_tokens for r, _ in rows))
    tokens = np.full((B, P), self.pad_id, np.int32)
    mask = np.zeros((B, P), bool)
    for b, ids in enumerate(prompts):
      tokens[b, P - len(ids):], mask[b, P - len(ids):] = ids, True
    slot = {ids: b for b, ids in enumerate(prompts)}
    src = np.zeros((R,), np.int32)
    src[:len(rows)] = [slot[tuple(requests[r].prompt)] for r, _ in rows]
    stream = np.zeros((R, 2), np.uint32)
    stream[:len(rows)] = [stream_id(requests[r].params.seed, requests[r].key, j) for r, j in rows]

    def column(field: str, dtype) -> np.ndarray:
      values = np.zeros((R,), dtype)
      values[:len(rows)] = [getattr(requests[r].params, field) for r, _ in rows]
      return values
    row_params = RowParams(stream, np.arange(R) < len(rows), column("temperature", np.float32),
                           column("top_p", np.float32), column("top_k", np.int32), column("max_new_tokens", np.int32))
    kv_mask_RS = np.concatenate([mask[src], np.ones((R, N), bool)], axis=1)
    pos_R = mask.sum(1).astype(np.int32)[src]
    table, stop_len = self._stop_table(first.stop)

    cache, logits = self._prefill(self.params, self._put(tokens), self._put(mask), self._put(src),
                                  new_slots=N, cache_dtype=self.cache_dtype)
    out, _ = self._decode(self.params, cache, logits, self._put(kv_mask_RS), self._put(pos_R),
                          jax.tree.map(self._put, row_params), table, stop_len, budget=N,
                          eos_ids=() if first.ignore_eos else self.eos_ids, pad_id=self.pad_id)
    out = _fetch(out)
    lengths = out.lengths[:len(rows)]
    self.stats.batches += 1
    self.stats.prefill_tokens += sum(map(len, prompts))
    self.stats.prefill_computed += sum(map(len, prompts))
    self.stats.rows += len(rows)
    self.stats.tokens += int(lengths.sum())
    self.stats.row_steps += len(rows) * int(lengths.max())
    return [self._completion(out, i, requests[r].params) for i, (r, _) in enumerate(rows)]

  def _completion(self, out: DecodeOut, r: int, params: SamplingParams) -> Completion:
    length, code = int(out.lengths[r]), int(out.finish[r])
    token_ids = out.tokens[r, :length].tolist()
    text = self.tokenizer.decode(token_ids)
    hit = _find_stop(text, params.stop) if params.stop else None
    if hit is not None:
      pos, s = hit
      # Keep tokens up to the one that completes the first stop string (usually the last one already).
      while length > 1 and _find_stop(self.tokenizer.decode(token_ids[:length - 1]), params.stop) == hit:
        length -= 1
      token_ids = token_ids[:length]
      text = text[:pos + (len(s) if params.include_stop_str else 0)]
      code = _STOP
    return Completion(text, token_ids, out.logprobs[r, :length].tolist(), out.model_logprobs[r, :length].tolist(),
                      FINISH_REASONS[code])
