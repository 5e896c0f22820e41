"""Continuous batching: a fixed set of decode slots that requests enter and leave while decoding runs.

`Engine` is a `Sampler` (same constructor, `sample` / `generate`, weights, stop strings, seeding, completions) whose
`sample` keeps B = max_batch slots busy instead of running static batches until their longest row stops:

  slots    each slot holds one row (a sample of a request) in its own cache row, left-aligned at slot 0: a row's
           tokens sit at cache positions 0..len-1 and its next token goes to position len (`KVCache.index` [B], per
           row), so rows of one program are at different positions and attention masks by each row's own length.
  decode   (jit) a `lax.while_loop` of decode steps in chunks: a chunk ends after `chunk_steps` steps, or as soon
           as max_batch / 16 rows finished (while requests wait: they fill the freed slots), or when half its slots
           idle (none wait: the remaining rows then move into the lower half). A chunk runs over the occupied slots
           only and over the cache positions its rows reach (`width`, `length`: powers of two; a copy of that
           window per chunk, not per step), so its work follows the rows and their lengths, not the allocation.
           Finished rows leave on the host and their completions are delivered then (`stream`).
  insert   (jit, one program per (prompts, prompt tokens, new rows) bucket, never per slot) waiting requests are
           prefilled and written into free slots: the distinct prompts once each (the n samples of a prompt copy
           its cache row), their first token sampled, the slots' state replaced in place (the state is donated).
           Decode programs are at least `min_width` slots wide (1 on a CPU, where a step's cost follows its rows down
           to one; 8 on an accelerator, where fewer rows cost what 8 do and each width is one more compilation);
           inserts, moves and keeps copy at least 8 rows (`copy_rows`) to bound their programs.
  prefixes a pool of cache rows (`prefix_cache_mb`, least recently used out) indexed on the host by token ids: a
           prompt's row is kept after its prefill, and, with `keep_completions`, each finished row of a request with
           stop strings (prompt + its sampled tokens; not after an EOS): a step, which MCTS children and rollouts
           continue (whole rollouts, sampled without stops, are not kept: nothing continues them). A request whose
           prompt shares a prefix with a kept row starts from a copy of that row and prefills only the rest (the
           longest common prefix wins; at least the last prompt token is recomputed for its logits). Exact: a
           position's keys and values depend only on the tokens up to it. `update_weights` forgets every row.

Results are the static sampler's: a row's tokens come from its own stream fold_in(row stream, token index) (see
`sampler.stream_id`), whatever slot, chunk or batch it ran in; greedy decoding gives the static path's tokens and
sampling gives them wherever the logits are bit-equal (batch shapes can move a logit's last bits; see the tests).
Stats: `row_steps` counts every slot of every decode step (the work done), so `live_row_fraction` is the share of
decode work that produced tokens; `prefill_tokens` / `prefill_computed` count prompt tokens asked for / computed.
"""
from __future__ import annotations

import collections
import functools
import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from astro_jax.model.config import ModelConfig
from astro_jax.model.llama import KVCache, Llama, forward, head_logits
from astro_jax.sampler import (_EOS, _LENGTH, _RUNNING, _STOP, Completion, DecodeOut, Request, RowParams, Sampler,
                               _constrain_cache, _fetch, _round_up, bucket, sample_tokens, stream_id)
from astro_jax.sharding import Sharder

ENGINES = ("static", "continuous")


class SlotState(NamedTuple):
  """Everything the device keeps per slot (all [B, ...])."""
  cache: KVCache        # per-layer buffers [B, K, H, S] / [B, K, S, H]; index [B] = tokens in the row's cache
  last: jax.Array       # [B] int32: the token sampled last (fed at the next step)
  out: DecodeOut        # tokens / logprobs / model_logprobs [B, N]; lengths [B] = tokens produced; finish [B]
  stop_state: jax.Array  # [B, n_stop] int32: each stop automaton's state
  rows: RowParams       # the rows' sampling settings (active False: a free slot)


def _select(state: SlotState, logits_BV: jax.Array, stop_table: jax.Array, stop_len: jax.Array,
            eos_ids: tuple[int, ...], pad_id: int) -> SlotState:
  """Sample each running row's next token (its index = tokens it produced), record it, update stop/finish state."""
  B, N = state.out.tokens.shape
  rows, out = state.rows, state.out
  root = jax.random.key(0)
  t_B = out.lengths
  keys_B = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, s[0]), s[1]), t))(
      rows.stream, t_B)
  tok_B, lp_B, mlp_B = sample_tokens(logits_BV, keys_B, rows.temperature, rows.top_p, rows.top_k)
  running_B = out.finish == _RUNNING
  tok_B = jnp.where(running_B, tok_B, pad_id)
  col_B = jnp.where(running_B, t_B, N)  # out of range: dropped
  write = lambda buf, x: buf.at[jnp.arange(B), col_B].set(x.astype(buf.dtype), mode="drop")
  n_stop = stop_table.shape[0]
  stop_state_BK = stop_table[jnp.arange(n_stop)[None], state.stop_state, tok_B[:, None]].astype(jnp.int32)
  eos_E = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  is_eos = jnp.any(tok_B[:, None] == eos_E[None], axis=-1)
  is_stop = jnp.any(stop_state_BK == stop_len[None], axis=-1)
  code = jnp.where(is_eos, _EOS, jnp.where(is_stop, _STOP, jnp.where(t_B + 1 >= rows.max_new, _LENGTH, _RUNNING)))
  out = DecodeOut(write(out.tokens, tok_B), write(out.logprobs, lp_B), write(out.model_logprobs, mlp_B),
                  jnp.where(running_B, t_B + 1, out.lengths), jnp.where(running_B, code, out.finish))
  return state._replace(last=jnp.where(running_B, tok_B, state.last), out=out, stop_state=stop_state_BK)


def _window(state: SlotState, width: int, length: int) -> SlotState:
  """The first `width` slots, their caches cut to `length` positions (a copy, unless it is everything)."""
  B, S = state.out.tokens.shape[0], state.cache.length
  if (width, length) == (B, S):
    return state
  cut = lambda x: x[:width]
  cache = KVCache(tuple(k[:width, :, :, :length] for k in state.cache.k),
                  tuple(v[:width, :, :length] for v in state.cache.v), state.cache.index[:width])
  return jax.tree.map(cut, state._replace(cache=None))._replace(cache=cache)


def _unwindow(state: SlotState, window: SlotState) -> SlotState:
  """`state` with its first slots (and cache positions) replaced by `window`."""
  if window.out.tokens.shape == state.out.tokens.shape and window.cache.length == state.cache.length:
    return window
  at0 = lambda x, w: jax.lax.dynamic_update_slice(x, w.astype(x.dtype), (0,) * x.ndim)
  cache = KVCache(tuple(map(at0, state.cache.k, window.cache.k)), tuple(map(at0, state.cache.v, window.cache.v)),
                  at0(state.cache.index, window.cache.index))
  return jax.tree.map(at0, state._replace(cache=None), window._replace(cache=None))._replace(cache=cache)


def _decode_chunk(cfg: ModelConfig, run, sharder: Sharder | None, params: dict, state: SlotState,
                  stop_table: jax.Array, stop_len: jax.Array, max_steps: jax.Array, min_running: jax.Array, *,
                  width: int, length: int, eos_ids: tuple[int, ...], pad_id: int) -> tuple[SlotState, jax.Array]:
  """Decode steps over the first `width` slots, attending to their first `length` cache positions (the host
  picks both to cover every running row: work follows the rows and their lengths, not the allocation), until
  `max_steps` ran or at most `min_running` rows still run. Returns the state and the number of steps."""
  def cond(carry):
    t, st = carry
    return (t < max_steps) & (jnp.sum(st.out.finish == _RUNNING) > min_running)

  def body(carry):
    t, st = carry
    running_B = st.out.finish == _RUNNING
    index_B = st.cache.index
    logits_B1V, cache = forward(cfg, sharder, params, st.last[:, None], index_B[:, None], None, st.cache, run=run)
    cache = _constrain_cache(sharder, cache._replace(index=jnp.where(running_B, index_B + 1, index_B)))
    return t + 1, _select(st._replace(cache=cache), logits_B1V[:, 0], stop_table, stop_len, eos_ids, pad_id)

  steps, window = jax.lax.while_loop(cond, body, (jnp.int32(0), _window(state, width, length)))
  return _unwindow(state, window), steps


def _move(state: SlotState, src_M: jax.Array, dst_M: jax.Array) -> SlotState:
  """Rows of slots src_M moved to slots dst_M (out of range: nothing), so that running rows sit in the first slots."""
  move = lambda x: x.at[dst_M].set(jnp.take(x, src_M, axis=0), mode="drop")
  return jax.tree.map(move, state)


def _insert(cfg: ModelConfig, run, sharder: Sharder | None, params: dict, state: SlotState, pool: KVCache,
            tokens_PT: jax.Array, start_P: jax.Array, length_P: jax.Array, src_P: jax.Array, keep_P: jax.Array,
            prompt_R: jax.Array, slot_R: jax.Array, rows_R: RowParams, stop_table: jax.Array, stop_len: jax.Array, *,
            eos_ids: tuple[int, ...], pad_id: int) -> tuple[SlotState, KVCache]:
  """Prefill P prompts and put R new rows into their slots.

  Prompt p starts from pool row src_P[p] (valid up to start_P[p]; -1: none, start 0) and computes its tokens
  start..length-1 (tokens_PT, right-padded); keep_P[p]: pool row to keep its cache in (out of range: not kept).
  New row r samples from prompt prompt_R[r] into slot slot_R[r] (out of range: padding, nothing written).
  """
  T = tokens_PT.shape[1]
  take = lambda x: jnp.take(x, jnp.maximum(src_P, 0), axis=0)
  cache = KVCache(tuple(map(take, pool.k)), tuple(map(take, pool.v)), start_P)
  positions_PT = start_P[:, None] + jnp.arange(T)[None]
  hidden_PTD, cache = forward(cfg, sharder, params, tokens_PT, positions_PT, None, cache, run=run, hidden_only=True)
  last_P1D = jnp.take_along_axis(hidden_PTD, (length_P - start_P - 1)[:, None, None], axis=1)
  logits_PV = head_logits(cfg, params, last_P1D, run.jnp_dtype)[:, 0]
  keep = lambda p, c: p.at[keep_P].set(c.astype(p.dtype), mode="drop")
  pool = _constrain_cache(sharder, pool._replace(k=tuple(map(keep, pool.k, cache.k)),
                                                 v=tuple(map(keep, pool.v, cache.v))))

  R, N = prompt_R.shape[0], state.out.tokens.shape[1]
  pick = lambda x: jnp.take(x, prompt_R, axis=0)
  zeros = jnp.zeros((R, N), jnp.float32)
  fresh = SlotState(
      KVCache((), (), pick(length_P)), jnp.full((R,), pad_id, jnp.int32),
      DecodeOut(jnp.full((R, N), pad_id, jnp.int32), zeros, zeros, jnp.zeros((R,), jnp.int32),
                jnp.where(rows_R.active, _RUNNING, _LENGTH).astype(jnp.int32)),
      jnp.zeros((R, state.stop_state.shape[1]), jnp.int32), rows_R)
  fresh = _select(fresh, pick(logits_PV), stop_table, stop_len, eos_ids, pad_id)
  put = lambda s, f: s.at[slot_R].set(f.astype(s.dtype), mode="drop")
  # cache rows go layer by layer (a row of every layer at once would be R x the whole cache row)
  cache_out = KVCache(tuple(put(s, pick(c)) for s, c in zip(state.cache.k, cache.k)),
                      tuple(put(s, pick(c)) for s, c in zip(state.cache.v, cache.v)), put(state.cache.index, fresh.cache.index))
  state = jax.tree.map(put, state._replace(cache=None), fresh._replace(cache=None))
  return state._replace(cache=_constrain_cache(sharder, cache_out)), pool


def _keep_rows(pool: KVCache, cache: KVCache, slot_M: jax.Array, row_M: jax.Array) -> KVCache:
  """Copy slots slot_M of the cache into pool rows row_M (out of range: skipped)."""
  keep = lambda p, c: p.at[row_M].set(jnp.take(c, slot_M, axis=0), mode="drop")
  return pool._replace(k=tuple(map(keep, pool.k, cache.k)), v=tuple(map(keep, pool.v, cache.v)))


class PrefixIndex:
  """Host index of the pool's rows: the token ids each row holds the keys/values of; least recently used out."""

  def __init__(self, rows: int):
    self.ids: list[np.ndarray | None] = [None] * rows
    self.used = [0] * rows
    self.clock = 0

  def clear(self) -> None:
    self.ids = [None] * len(self.ids)

  def longest(self, ids: np.ndarray) -> tuple[int, int]:
    """(row, n): the row sharing the longest prefix with ids, n tokens of it (-1, 0: none)."""
    best = (-1, 0)
    for row, held in enumerate(self.ids):
      if held is None:
        continue
      m = min(len(held), len(ids))
      same = held[:m] == ids[:m]
      n = m if same.all() else int(np.argmin(same))
      if n > best[1]:
        best = (row, n)
    return best

  def touch(self, row: int) -> None:
    self.clock += 1
    self.used[row] = self.clock

  def claim(self, ids: np.ndarray, protect: set[int]) -> int:
    """A row to keep `ids` in (the one holding exactly ids, else the least recently used not in `protect`);
    -1 when every row is protected."""
    for row, held in enumerate(self.ids):
      if held is not None and len(held) == len(ids) and (held == ids).all():
        self.touch(row)
        return -1  # already kept
    free = [r for r in range(len(self.ids)) if r not in protect]
    if not free:
      return -1
    row = min(free, key=lambda r: (self.ids[r] is not None, self.used[r]))
    self.ids[row] = ids
    self.touch(row)
    return row


class Engine(Sampler):
  """`Sampler` with continuous batching and prefix reuse (see the module docstring)."""

  def __init__(self, model: Llama | ModelConfig, tokenizer, *, prefix_cache_mb: float = 4096.0,
               chunk_steps: int = 32, prefill_tokens: int = 8192, prefill_rows: int = 8, keep_completions: bool = False,
               min_width: int | None = None, **kwargs):
    """As `Sampler`, plus: prefix_cache_mb: memory for kept prefixes (0: no reuse); chunk_steps: most decode steps
    between two looks at the slots; prefill_tokens: most prompt tokens (prompts x bucketed length) one insert
    computes; keep_completions: keep finished rows of requests with stop strings as prefixes too (search: children
    continue them); min_width: the fewest slots a decode program runs over (default: 1 on a CPU, 8 on an
    accelerator)."""
    super().__init__(model, tokenizer, **kwargs)
    self.prefix_cache_mb, self.chunk_steps = prefix_cache_mb, chunk_steps
    self.prefill_budget, self.prefill_rows = prefill_tokens, max(prefill_rows, self.batch_shards)
    self.keep_completions = keep_completions
    if min_width is None:
      platform = (jax.devices() if self.sharder is None else self.sharder.mesh.devices.flat)[0].platform
      min_width = 1 if platform == "cpu" else 8
    if min_width < 1:
      raise ValueError(f"min_width must be >= 1, got {min_width}")
    self.narrowest = min(self.max_batch, _round_up(min_width, self.batch_shards))  # decode programs' fewest slots
    self.copy_rows = min(self.max_batch, _round_up(8, self.batch_shards))  # inserts', moves' and keeps' fewest rows
    self._decode_chunk = jax.jit(functools.partial(_decode_chunk, self.cfg, self.run, self.sharder),
                                 static_argnames=("width", "length", "eos_ids", "pad_id"),
                                 donate_argnames=("state",))
    self._move = jax.jit(_move, donate_argnames=("state",))
    self._insert = jax.jit(functools.partial(_insert, self.cfg, self.run, self.sharder),
                           static_argnames=("eos_ids", "pad_id"), donate_argnames=("state", "pool"))
    self._keep = jax.jit(_keep_rows, donate_argnames=("pool",))
    self._length = 0  # the slots' cache length S (grows in powers of two as requests need)
    self._state: SlotState | None = None
    self._pool: KVCache | None = None
    self._index = PrefixIndex(0)
    self.peak_cache_bytes = 0

  def update_weights(self, weights) -> None:
    super().update_weights(weights)
    if hasattr(self, "_index"):
      self.forget_prefixes()  # kept keys/values belong to the old weights

  def forget_prefixes(self) -> None:
    """Drop every kept prefix (new weights; or a benchmark that must not reuse its warm-up's)."""
    self._index.clear()

  # -- device buffers
  def _allocate(self, length: int) -> None:
    """Slots (and the pool) for rows of up to `length` tokens; kept prefixes are dropped when it grows."""
    if length <= self._length:
      return
    self._state = self._pool = None
    B, S, n = self.max_batch, length, self.batch_shards
    per_layer = self.unroll_layers
    row_bytes = 2 * self.cfg.n_layers * self.cfg.n_kv_heads * self.cfg.head_dim * S * self.cache_dtype.itemsize
    pool_rows = min(int(self.prefix_cache_mb * 2**20 // row_bytes), 4 * B) // n * n
    pool_rows = max(pool_rows, n)  # one (unused) row when reuse is off: the insert reads a row either way
    self._reuse = self.prefix_cache_mb > 0
    zeros = lambda rows: KVCache.zeros(self.cfg, rows, S, self.cache_dtype, per_layer=per_layer)
    cache = zeros(B)._replace(index=jnp.zeros((B,), jnp.int32))
    if not per_layer:
      raise ValueError("the continuous engine needs unroll_layers=True (per-layer cache rows)")
    put = lambda x, axes: x if self.sharder is None else jax.device_put(x, self.sharder.named(axes, x.shape))
    lead_k, lead_v = KVCache.AXES_K[1:], KVCache.AXES_V[1:]
    cache = cache._replace(k=tuple(put(x, lead_k) for x in cache.k), v=tuple(put(x, lead_v) for x in cache.v),
                           index=self._put(np.zeros((B,), np.int32)))
    pool = zeros(pool_rows)
    pool = pool._replace(k=tuple(put(x, lead_k) for x in pool.k), v=tuple(put(x, lead_v) for x in pool.v))
    f = lambda: self._put(np.zeros((B, S), np.float32))
    rows = RowParams(self._put(np.zeros((B, 2), np.uint32)), self._put(np.zeros((B,), bool)),
                     self._put(np.zeros((B,), np.float32)), self._put(np.ones((B,), np.float32)),
                     self._put(np.zeros((B,), np.int32)), self._put(np.ones((B,), np.int32)))
    self._state = SlotState(cache, self._put(np.full((B,), self.pad_id, np.int32)),
                            DecodeOut(self._put(np.full((B, S), self.pad_id, np.int32)), f(), f(),
                                      self._put(np.zeros((B,), np.int32)), self._put(np.full((B,), _LENGTH, np.int32))),
                            None, rows)
    self._pool, self._index, self._length = pool, PrefixIndex(pool_rows), S
    self.peak_cache_bytes = max(self.peak_cache_bytes, (B + pool_rows) * row_bytes)

  # -- main entry points
  def sample(self, requests: Sequence[Request]) -> list[list[Completion]]:
    results: list[list[Completion | None]] = [[None] * req.params.n for req in requests]
    for r, j, completion in self.stream(requests):
      results[r][j] = completion
    return results  # type: ignore[return-value]

  def stream(self, requests: Sequence[Request]) -> Iterator[tuple[int, int, Completion]]:
    """(request index, sample index, completion) for every sample of every request, as each finishes."""
    self._check(requests)
    began = time.perf_counter()
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, req in enumerate(requests):
      groups.setdefault((req.params.stop, req.params.ignore_eos), []).extend((r, j) for j in range(req.params.n))
    self._allocate(bucket(max(len(req.prompt) + req.params.max_new_tokens for req in requests)))
    for items in groups.values():
      for r, j, c in self._run(requests, items):
        self.stats.seconds += time.perf_counter() - began
        yield r, j, c
        began = time.perf_counter()
    self.stats.calls += 1
    self.stats.requests += len(requests)
    self.stats.seconds += time.perf_counter() - began

  def _run(self, requests: Sequence[Request], items: list[tuple[int, int]]) -> Iterator[tuple[int, int, Completion]]:
    """Decode `items` (request, sample) that share a stop set through the slots; yield completions as they end."""
    B, S = self.max_batch, self._length
    first = requests[items[0][0]].params
    table, stop_len = self._stop_table(first.stop)
    eos_ids = () if first.ignore_eos else self.eos_ids
    if self._state.stop_state is None or self._state.stop_state.shape[1] != table.shape[0]:
      self._state = self._state._replace(stop_state=self._put(np.zeros((B, table.shape[0]), np.int32)))
    # rows a consumer abandoned (a `stream` not read to its end) must not run on: every slot starts finished
    self._state = self._state._replace(out=self._state.out._replace(
        finish=self._put(np.full((B,), _LENGTH, np.int32))))
    waiting = collections.deque(items)
    holder: list[tuple[int, int] | None] = [None] * B  # slot -> (request, sample)
    prompt_ids = {r: np.asarray(requests[r].prompt, np.int32) for r in {r for r, _ in items}}
    while waiting or any(h is not None for h in holder):
      while waiting and None in holder:
        self._fill(requests, waiting, holder, prompt_ids, table, stop_len, eos_ids)
      if not waiting:
        self._compact(holder)
      occupied = [b for b in range(B) if holder[b] is not None]
      width = self._width(occupied[-1] + 1)
      index = _fetch(self._state.cache.index)
      deepest = max(int(index[b]) for b in occupied)
      length = min(S, bucket(deepest + self.chunk_steps, 64))
      # A chunk ends when enough slots are free to refill (requests wait) or when half the slots idle (none wait:
      # the rows left are then moved into half as many slots); finished rows idle until their chunk ends.
      min_running = max(0, len(occupied) - max(1, B // 16)) if waiting else (width // 2 if width > self.narrowest else 0)
      self._state, steps = self._decode_chunk(
          self.params, self._state, table, stop_len, jnp.int32(min(self.chunk_steps, length - deepest)),
          jnp.int32(min_running), width=width, length=length, eos_ids=eos_ids, pad_id=self.pad_id)
      out = _fetch(self._state.out)
      steps = int(np.asarray(steps.addressable_data(0)))
      self.stats.batches += 1
      self.stats.row_steps += width * steps
      done = [b for b in range(B) if holder[b] is not None and out.finish[b] != _RUNNING]
      if self.keep_completions and self._reuse and first.stop and done:  # rows cut at a stop are steps
        self._keep_finished(requests, holder, done, out, prompt_ids)
      for b in done:
        r, j = holder[b]
        holder[b] = None
        self.stats.rows += 1
        self.stats.tokens += int(out.lengths[b])
        yield r, j, self._completion(out, b, requests[r].params)

  def _width(self, slots: int, floor: int | None = None) -> int:
    """The program width (slots; at least `floor`, default `narrowest`) that covers the first `slots` slots."""
    return min(self.max_batch, _round_up(bucket(slots, floor or self.narrowest), self.batch_shards))

  def _compact(self, holder: list) -> None:
    """Move rows out of the upper half of the occupied slots into free lower ones when they fit (no request
    waits), so that the decode runs over fewer slots."""
    B = self.max_batch
    occupied = [b for b in range(B) if holder[b] is not None]
    if not occupied:
      return
    width, target = self._width(occupied[-1] + 1), self._width(len(occupied))
    if target >= width:
      return
    movers = [b for b in occupied if b >= target]
    free = [b for b in range(target) if holder[b] is None]
    M = bucket(len(movers), self.copy_rows)
    src_M, dst_M = np.zeros((M,), np.int32), np.full((M,), B, np.int32)
    src_M[:len(movers)], dst_M[:len(movers)] = movers, free[:len(movers)]
    for s, d in zip(movers, free):
      holder[d], holder[s] = holder[s], None
    self._state = self._move(self._state, self._put(src_M, replicate=True), self._put(dst_M, replicate=True))

  def _keep_finished(self, requests, holder, done: list[int], out: DecodeOut, prompt_ids) -> None:
    """Keep finished rows (prompt + sampled tokens but the last, whose keys were never computed) in the pool."""
    slots, rows = [], []
    for b in done:
      r, _ = holder[b]
      produced = int(out.lengths[b])
      if produced < 2 or out.finish[b] == _EOS:  # nothing continues past an EOS
        continue
      ids = np.concatenate([prompt_ids[r], out.tokens[b, :produced - 1].astype(np.int32)])
      row = self._index.claim(ids, protect=set())
      if row >= 0:
        slots.append(b), rows.append(row)
    if rows:
      M = bucket(len(rows), self.copy_rows)
      slot_M = np.zeros((M,), np.int32)
      row_M = np.full((M,), len(self._index.ids), np.int32)
      slot_M[:len(slots)], row_M[:len(rows)] = slots, rows
      self._pool = self._keep(self._pool, self._state.cache, self._put(slot_M, replicate=True),
                              self._put(row_M, replicate=True))

  def _fill(self, requests, waiting: collections.deque, holder: list, prompt_ids: dict, table, stop_len,
            eos_ids) -> None:
    """One insert: take waiting rows into free slots (as many as the prefill budget allows), prefilled."""
    B, S, n = self.max_batch, self._length, self.batch_shards
    free = [b for b in range(B) if holder[b] is None]
    taken: list[tuple[int, int]] = []
    prompts: dict[int, int] = {}  # request -> prompt row of this insert
    plan: list[tuple[int, int, int]] = []  # per prompt row: (request, start, pool row)
    protect: set[int] = set()
    while waiting and len(taken) < len(free):
      r, j = waiting[0]
      if r not in prompts:
        ids = prompt_ids[r]
        row, shared = self._index.longest(ids) if self._reuse else (-1, 0)
        start = min(shared, len(ids) - 1)
        longest = max([len(prompt_ids[q]) - s for q, s, _ in plan] + [len(ids) - start])
        if plan and (len(plan) == self.prefill_rows or bucket(len(plan) + 1, n) * bucket(longest) > self.prefill_budget):
          break
        prompts[r] = len(plan)
        plan.append((r, start, row if start > 0 else -1))
        if row >= 0 and start > 0:
          protect.add(row)
          self._index.touch(row)
      taken.append(waiting.popleft())
    # short inserts (the search's: a kept parent, a few new tokens) always take the widest program, one shape (a T
    # floor of 4 saves ~0.2 s an insert but adds shapes that later RL steps compile: test_rl_stage)
    T = bucket(max(len(prompt_ids[r]) - s for r, s, _ in plan))
    P = _round_up(bucket(len(plan), min(4, self.prefill_rows)) if T > 64 else self.prefill_rows, n)
    tokens = np.full((P, T), self.pad_id, np.int32)
    start_P, length_P = np.zeros((P,), np.int32), np.ones((P,), np.int32)
    src_P, keep_P = np.full((P,), -1, np.int32), np.full((P,), len(self._index.ids), np.int32)
    for p, (r, start, row) in enumerate(plan):
      ids = prompt_ids[r]
      start = min(start, S - T)
      if start <= 0:
        start, row = 0, -1
      tokens[p, :len(ids) - start] = ids[start:]
      start_P[p], length_P[p], src_P[p] = start, len(ids), row
      self.stats.prefill_tokens += len(ids)
      self.stats.prefill_computed += len(ids) - start
      if self._reuse:
        kept = self._index.claim(ids, protect | {row})
        if kept >= 0:
          keep_P[p] = kept
    R = self._width(len(taken), self.copy_rows)  # new rows (padded): a refill of a few slots moves a few cache rows
    prompt_R = np.zeros((R,), np.int32)
    slot_R = np.full((R,), B, np.int32)
    stream = np.zeros((R, 2), np.uint32)
    active = np.zeros((R,), bool)
    temperature, top_p = np.zeros((R,), np.float32), np.ones((R,), np.float32)
    top_k, max_new = np.zeros((R,), np.int32), np.ones((R,), np.int32)
    self.stats.row_steps += len(taken)  # each row's first token is sampled here (as in the static path's count)
    for i, ((r, j), b) in enumerate(zip(taken, free)):
      params = requests[r].params
      holder[b] = (r, j)
      prompt_R[i], slot_R[i], active[i] = prompts[r], b, True
      stream[i] = stream_id(params.seed, requests[r].key, j)
      temperature[i], top_p[i], top_k[i], max_new[i] = params.temperature, params.top_p, params.top_k, \
          params.max_new_tokens
    rep = lambda x: self._put(x, replicate=True)
    rows = RowParams(rep(stream), rep(active), rep(temperature), rep(top_p), rep(top_k), rep(max_new))
    self._state, self._pool = self._insert(self.params, self._state, self._pool, rep(tokens), rep(start_P),
                                           rep(length_P), rep(src_P), rep(keep_P), rep(prompt_R), rep(slot_R), rows,
                                           table, stop_len, eos_ids=eos_ids, pad_id=self.pad_id)


def make_sampler(engine: str, model, tokenizer, *, prefix_cache_mb: float = 4096.0, **kwargs) -> Sampler:
  """The sampler a stage asks for: "static" (`Sampler`) or "continuous" (`Engine`)."""
  if engine == "static":
    kwargs.pop("keep_completions", None)
    return Sampler(model, tokenizer, **kwargs)
  if engine == "continuous":
    return Engine(model, tokenizer, prefix_cache_mb=prefix_cache_mb, **kwargs)
  raise ValueError(f"unknown sampler engine {engine!r} (one of {', '.join(ENGINES)})")
