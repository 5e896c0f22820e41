"""SFT input: chat JSONL -> token/mask examples -> packed rows [T] -> per-step batches from a resumable grain loader.

Rows are `{"messages": [{"role", "content"}, ...]}` (other fields ignored) or `{"prompt", "response"}`. A conversation
is rendered with the tokenizer's chat template (`Tokenizer.chat`, generation prompt off) and encoded as written.

Loss masks (`loss_on`):
- "all" (the paper's SFT): every token but the first is a target.
- "assistant": the tokens of each assistant turn's content and the end-of-turn token the template writes after it
  (`<|eot_id|>`, `<|im_end|>`). Not the assistant header (the generation prompt), and not whitespace the template
  writes after the end-of-turn token (SmolLM2's `\n` after `<|im_end|>`): the model stops at the end-of-turn token.
  Turn boundaries come from rendering prefixes of the conversation; the pieces between them are encoded separately
  and must give exactly the tokens of the whole text, else the row is an error (the template is not prefix-stable).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from astro_jax.data import DataError, parse_json_line

logger = logging.getLogger(__name__)

LOSS_ON = ("all", "assistant")  # loss on every token (paper default) or on assistant tokens only
OVERLONG = ("truncate", "drop")
ON_ERROR = ("raise", "skip")
ROLES = ("system", "user", "assistant")
ROW_KEYS = ("tokens", "positions", "segment_ids", "targets", "weights")
_MAX_SKIP_WARNINGS = 10


@dataclasses.dataclass(frozen=True)
class Example:
  id: str  # the row's "id" (str() of it) if it has one, else "path:line"
  tokens: np.ndarray  # int32 [n]: the whole conversation in the chat format
  loss_mask: np.ndarray  # bool [n]: token i is a training target (predicted from tokens[:i]); loss_mask[0] is False


@dataclasses.dataclass
class DataCounts:
  """What reading did. rows = kept + dropped + skipped; `truncated` counts kept examples that were cut to length;
  `duplicates` kept rows whose conversation equals an earlier row's (they weigh twice: Direct-SFT data repeats rows
  on purpose to match counts); `tokens` and `target_tokens` are totals over the kept examples."""
  rows: int = 0
  kept: int = 0
  truncated: int = 0
  dropped: int = 0
  skipped: int = 0
  duplicates: int = 0
  tokens: int = 0
  target_tokens: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def _messages_of(row: Any) -> list[dict[str, str]]:
  """The validated conversation of one decoded row; ValueError with the reason."""
  if not isinstance(row, dict):
    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
  if "messages" in row:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
      raise ValueError("'messages' must be a non-empty list")
  elif "prompt" in row and "response" in row:
    for key in ("prompt", "response"):
      if not isinstance(row[key], str):
        raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
  else:
    raise ValueError("expected a 'messages' list or 'prompt' and 'response' strings")
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ValueError(f"message {i} must be an object, got {type(m).__name__}")
    if m.get("role") not in ROLES:
      raise ValueError(f"message {i} has role {m.get('role')!r}, expected one of {', '.join(ROLES)}")
    if not isinstance(m.get("content"), str):
      raise ValueError(f"message {i} content must be a string, got {type(m.get('content')).__name__}")
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError("the conversation has no assistant turn")
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def _assistant_spans(tokenizer, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
  """Character spans [start, stop) of `full` that are targets: each assistant turn's content and end of turn."""
  spans, cursor = [], 0
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    head = tokenizer.chat(messages[:i], add_generation_prompt=True)
    upto = tokenizer.chat(messages[:i + 1], add_generation_prompt=False)
    if not (full.startswith(head) and full.startswith(upto) and cursor <= len(head) <= len(upto)):
      raise ValueError(f"the chat template is not prefix-stable at message {i}: rendering the conversation up to an "
                       "assistant turn does not give a prefix of the whole rendering")
    start, stop = len(head), max(len(head), len(upto.rstrip()))
    spans.append((start, stop))
    cursor = len(upto)
  return spans


def encode_conversation(tokenizer, messages: list[dict[str, str]], loss_on: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [n], loss_mask bool [n]) of a validated conversation; ValueError if the template misbehaves."""
  full = tokenizer.chat(messages, add_generation_prompt=False)
  ids = tokenizer.encode(full)
  if loss_on == "all":
    mask = np.ones(len(ids), bool)
  else:
    pieces, cursor = [], 0
    for start, stop in _assistant_spans(tokenizer, messages, full):
      pieces += [(full[cursor:start], False), (full[start:stop], True)]
      cursor = stop
    pieces.append((full[cursor:], False))
    encoded = [(tokenizer.encode(text), target) for text, target in pieces if text]
    if [t for piece, _ in encoded for t in piece] != ids:
      raise ValueError("encoding the text between assistant-turn boundaries separately changes the tokens (the chat "
                       "template or tokenizer is not prefix-stable here); use loss_on='all'")
    mask = np.concatenate([np.full(len(piece), target, bool) for piece, target in encoded] or [np.zeros(0, bool)])
  if len(mask):
    mask[0] = False
  return np.asarray(ids, np.int32), mask


def _lines(path: str | os.PathLike) -> list[tuple[int, bytes]]:
  """(line number, bytes) of the non-blank lines; DataError if the file is missing or has no rows."""
  try:
    data = Path(path).read_bytes()
  except FileNotFoundError:
    raise DataError(f"{os.fspath(path)}: no such file") from None
  except IsADirectoryError:
    raise DataError(f"{os.fspath(path)}: is a directory, expected a JSONL file") from None
  lines = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
  if not lines:
    raise DataError(f"{os.fspath(path)}: no examples")
  return lines


def read_examples(path: str | os.PathLike, tokenizer, *, max_length: int, loss_on: str = "all",
                  overlong: str = "truncate", on_error: str = "raise") -> tuple[list[Example], DataCounts]:
  """Every row of a chat JSONL file as an Example, all validated before returning.

  Over-long examples (> max_length tokens) are cut to their first max_length tokens or dropped (`overlong`); an
  example left without targets is dropped. A bad row raises DataError at `path:line`, or is skipped and counted with
  on_error="skip". A duplicate (its conversation, messages or prompt + response, equals an earlier row's) is kept,
  counted and named in one warning. A missing or empty file, or no example kept, is always an error.
  """
  for name, value, allowed in (("loss_on", loss_on, LOSS_ON), ("overlong", overlong, OVERLONG),
                               ("on_error", on_error, ON_ERROR)):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  if max_length < 2:
    raise ValueError(f"max_length must be at least 2, got {max_length}")
  where = os.fspath(path)
  examples, counts = [], DataCounts()
  seen: dict[bytes, int] = {}  # digest of a conversation -> the line it first appeared on
  first_duplicate = None  # (line, earlier line)
  for lineno, line in _lines(path):
    counts.rows += 1
    earlier = None  # the line of an earlier row with the same conversation
    try:
      row = parse_json_line(line)
      messages = _messages_of(row)
      digest = hashlib.blake2b(json.dumps(messages).encode(), digest_size=16).digest()
      earlier = seen.setdefault(digest, lineno)
      tokens, mask = encode_conversation(tokenizer, messages, loss_on)
    except ValueError as e:  # chat-template errors are ValueErrors too
      if on_error == "raise":
        raise DataError(f"{where}:{lineno}: {e}") from None
      counts.skipped += 1
      if counts.skipped <= _MAX_SKIP_WARNINGS:
        logger.warning("%s:%d: skipped: %s", where, lineno, e)
      continue
    if earlier != lineno:
      counts.duplicates += 1
      first_duplicate = first_duplicate or (lineno, earlier)
    truncated = len(tokens) > max_length
    if truncated and overlong == "drop":
      counts.dropped += 1
      continue
    tokens, mask = tokens[:max_length], mask[:max_length]
    if not mask.any():
      counts.dropped += 1
      continue
    counts.kept += 1
    counts.truncated += truncated
    counts.tokens += len(tokens)
    counts.target_tokens += int(mask.sum())
    row_id = str(row["id"]) if "id" in row else f"{where}:{lineno}"
    examples.append(Example(id=row_id, tokens=tokens, loss_mask=mask))
  if counts.skipped > _MAX_SKIP_WARNINGS:
    logger.warning("%s: %d rows skipped in all", where, counts.skipped)
  if first_duplicate:
    logger.warning("%s: %d row%s repeat%s an earlier row's conversation and weigh%s twice (the first: %s:%d, a "
                   "repeat of line %d)", where, counts.duplicates, "s" * (counts.duplicates > 1),
                   "" if counts.duplicates > 1 else "s", "" if counts.duplicates > 1 else "s", where, *first_duplicate)
  if not examples:
    raise DataError(f"{where}: no usable examples ({counts.rows} rows: {counts.dropped} dropped for length or no "
                    f"targets, {counts.skipped} skipped as bad)")
  return examples, counts


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------

class _FirstFit:
  """Leftmost bin with room in O(log n): a max-tree over the free space of `n` bins of `capacity`."""

  def __init__(self, n: int, capacity: int):
    self.size = 1 << max(0, n - 1).bit_length()
    self.free = np.zeros(2 * self.size, np.int64)
    self.free[self.size:self.size + n] = capacity
    for i in range(self.size - 1, 0, -1):
      self.free[i] = max(self.free[2 * i], self.free[2 * i + 1])

  def put(self, length: int) -> int:
    """Index of the leftmost bin with at least `length` free, which loses that much room."""
    i = 1
    while i < self.size:
      i = 2 * i if self.free[2 * i] >= length else 2 * i + 1
    self.free[i] -= length
    j = i // 2
    while j:
      self.free[j] = max(self.free[2 * j], self.free[2 * j + 1])
      j //= 2
    return i - self.size


def _check_example(ex: Example, seq_len: int) -> None:
  n = len(ex.tokens)
  if not 1 <= n <= seq_len:
    raise ValueError(f"example {ex.id!r} has {n} tokens; packing needs 1..seq_len={seq_len} (max_length <= seq_len)")
  if ex.loss_mask.shape != ex.tokens.shape:
    raise ValueError(f"example {ex.id!r}: loss_mask shape {ex.loss_mask.shape} != tokens shape {ex.tokens.shape}")
  if ex.loss_mask[0]:
    raise ValueError(f"example {ex.id!r}: loss_mask[0] must be False (the first token has no context)")


def pack(examples: Sequence[Example], seq_len: int, seed: int) -> list[dict[str, np.ndarray]]:
  """Rows of exactly seq_len tokens: the examples in a seeded random order, each into the first row with room.

  Row arrays [seq_len]: tokens, positions (from 0 per segment), segment_ids (1, 2, ... per example; 0 = padding),
  targets (the next token of the same segment, else 0), weights (float32: the loss mask of that next token; 0 at each
  segment's last token and on padding). So the weights sum to the number of targets of the examples.
  """
  for ex in examples:
    _check_example(ex, seq_len)
  order = np.random.default_rng(seed).permutation(len(examples))
  fit = _FirstFit(len(examples), seq_len)
  bins: list[list[int]] = []
  for k in order:
    b = fit.put(len(examples[k].tokens))
    if b == len(bins):
      bins.append([])
    bins[b].append(int(k))
  return [_pack_row([examples[k] for k in members], seq_len) for members in bins]


def _pack_row(members: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
  row = {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32) for k in ROW_KEYS}
  offset = 0
  for seg, ex in enumerate(members, 1):
    n = len(ex.tokens)
    span = slice(offset, offset + n)
    row["tokens"][span] = ex.tokens
    row["positions"][span] = np.arange(n)
    row["segment_ids"][span] = seg
    row["targets"][offset:offset + n - 1] = ex.tokens[1:]
    row["weights"][offset:offset + n - 1] = ex.loss_mask[1:]
    offset += n
  return row


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

class Loader:
  """Batches of packed rows, forever. The row stream is one seeded shuffle of all rows per epoch (a new one each
  epoch), cut into consecutive global batches of `global_batch` rows, so a batch may straddle two epochs (and, with
  fewer rows than global_batch, hold a row more than once). This process gets rows `local_rows` of each global batch:
  the global batches, and the state, do not depend on the number of processes."""

  def __init__(self, rows: list[dict[str, np.ndarray]], *, global_batch: int, seed: int,
               local_rows: slice | None = None):
    import grain
    if not rows:
      raise ValueError("no rows to load")
    if global_batch < 1:
      raise ValueError(f"global_batch must be positive, got {global_batch}")
    keys = sorted(rows[0])
    for i, r in enumerate(rows):
      if sorted(r) != keys or any(r[k].shape != rows[0][k].shape for k in keys):
        raise ValueError(f"row {i} has keys/shapes {({k: v.shape for k, v in r.items()})}, unlike row 0")
    self.columns = {k: np.stack([r[k] for r in rows]) for k in keys}  # [N, T] each
    self.local = range(global_batch)[local_rows if local_rows is not None else slice(None)]
    self.global_batch, self.num_rows = global_batch, len(rows)
    self.steps_per_epoch = max(1, len(rows) // global_batch)
    self.seed = seed
    # A well-mixed 32-bit grain seed (grain reseeds epoch e with seed + e; this keeps nearby seeds apart).
    grain_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    local = np.asarray(self.local, np.int64)
    # drop_remainder: the same batches (an endless stream has no last one) and an exact integer length; without
    # it grain computes ceil(sys.maxsize / global_batch) in floats, 2**63 for a batch of 1, and len() overflows.
    indices = (grain.MapDataset.range(len(rows)).shuffle(seed=grain_seed).repeat()
               .batch(global_batch, drop_remainder=True))
    batches = indices.map(lambda idx_G: {k: v[idx_G[local]] for k, v in self.columns.items()})
    # Rows live in memory: gathering a batch is cheap, so no prefetch threads (and no buffered batches).
    self._iter = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def _identity(self) -> dict[str, int]:
    return {"num_rows": self.num_rows, "global_batch": self.global_batch, "seed": self.seed}

  def get_state(self) -> dict:
    """JSON-serialisable position in the stream (the same on every process)."""
    return {**self._identity(), "grain": self._iter.get_state()}

  def set_state(self, state: dict) -> None:
    """Continue where a Loader built from the same rows, global_batch and seed was (any local_rows)."""
    mismatch = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
    if mismatch:
      raise ValueError(f"loader state is for other data: (saved, now) = {mismatch}")
    self._iter.set_state(state["grain"])


def make_loader(rows: list[dict[str, np.ndarray]], *, global_batch: int, seed: int,
                local_rows: slice | None = None) -> Loader:
  """A Loader over packed rows; batches are dicts of arrays [len(local rows), T]."""
  return Loader(rows, global_batch=global_batch, seed=seed, local_rows=local_rows)
