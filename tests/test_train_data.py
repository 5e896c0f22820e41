"""SFT input pipeline: chat JSONL -> examples (loss masks), packing into rows, the resumable grain loader."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from astro_jax.data import DataError
from astro_jax.tokenizer import Tokenizer
from astro_jax.train.data import DataCounts, Example, make_loader, pack, read_examples

from .conftest import REPO

TWO_TURNS = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "2+2 = 4.\n\nThe answer is \\boxed{4}."},
             {"role": "user", "content": "And 3+3?"},
             {"role": "assistant", "content": "It is \\boxed{6}."}]
EOT = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
  return Tokenizer.load(smollm2_dir)


@pytest.fixture(scope="module")
def llama3_tok(llama3_tokenizer_dir):
  return Tokenizer.load(llama3_tokenizer_dir)


@pytest.fixture(params=["smollm2", "llama3"])
def named_tok(request):
  return request.param, request.getfixturevalue(f"{request.param}_tok")


def write_rows(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
  return path


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """[start, stop) of each run of True."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------

def test_assistant_mask_is_content_plus_end_of_turn(tmp_path, named_tok):
  name, tok = named_tok
  path = write_rows(tmp_path / "sft.jsonl", [{"id": 7, "messages": TWO_TURNS, "k": 0}])
  (ex,), counts = read_examples(path, tok, max_length=512, loss_on="assistant")
  assert ex.id == "7" and ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
  assert ex.tokens.tolist() == tok.encode(tok.chat(TWO_TURNS, add_generation_prompt=False))
  spans = runs(ex.loss_mask)
  assert len(spans) == 2
  for (a, b), m in zip(spans, [TWO_TURNS[2], TWO_TURNS[4]]):
    assert tok.decode(ex.tokens[a:b], skip_special_tokens=False) == m["content"] + EOT[name]
    assert ex.tokens[b - 1] == tok.hf.convert_tokens_to_ids(EOT[name])
  # Nothing after the end-of-turn token (SmolLM2's template writes "\n" there) and no header is a target.
  assert "assistant" not in tok.decode(ex.tokens[ex.loss_mask], skip_special_tokens=False)
  assert counts == DataCounts(rows=1, kept=1, tokens=len(ex.tokens), target_tokens=int(ex.loss_mask.sum()))

  (ex_all,), counts_all = read_examples(path, tok, max_length=512, loss_on="all")
  assert np.array_equal(ex_all.tokens, ex.tokens)
  assert not ex_all.loss_mask[0] and ex_all.loss_mask[1:].all()
  assert counts_all.target_tokens == len(ex.tokens) - 1 > counts.target_tokens


def test_prompt_response_rows_and_ids(tmp_path, smollm2_tok):
  path = write_rows(tmp_path / "pr.jsonl", [{"prompt": "Hi", "response": "Hello!"}, "", {"id": "x", "prompt": "A",
                                                                                        "response": "B"}])
  exs, counts = read_examples(path, smollm2_tok, max_length=512, loss_on="assistant")
  assert [e.id for e in exs] == [f"{path}:1", "x"] and counts.rows == 2
  msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
  assert exs[0].tokens.tolist() == smollm2_tok.encode(smollm2_tok.chat(msgs, add_generation_prompt=False))
  assert smollm2_tok.decode(exs[0].tokens[exs[0].loss_mask], skip_special_tokens=False) == "Hello!<|im_end|>"


def test_masked_nll_matches_hand_computation(tmp_path, smollm2_tok):
  tok = smollm2_tok
  path = write_rows(tmp_path / "sft.jsonl", [{"messages": TWO_TURNS}])
  (ex,), _ = read_examples(path, tok, max_length=512, loss_on="assistant")
  (row,) = pack([ex], seq_len=len(ex.tokens) + 5, seed=0)
  T, V = len(row["tokens"]), len(tok)
  logits_TV = np.random.default_rng(0).normal(size=(T, V)).astype(np.float64)
  logp_TV = logits_TV - np.log(np.exp(logits_TV).sum(-1, keepdims=True))
  loss = -(logp_TV[np.arange(T), row["targets"]] * row["weights"]).sum() / row["weights"].sum()

  # Independently: the target positions are where the encoded assistant turns sit in the token list.
  ids = ex.tokens.tolist()
  positions = []
  for m in (TWO_TURNS[2], TWO_TURNS[4]):
    piece = tok.encode(m["content"] + "<|im_end|>")
    start = next(i for i in range(len(ids)) if ids[i:i + len(piece)] == piece and i not in positions)
    positions += range(start, start + len(piece))
  assert positions == np.flatnonzero(ex.loss_mask).tolist()
  hand = -sum(logp_TV[p - 1, ids[p]] for p in positions) / len(positions)
  assert loss == pytest.approx(hand, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Lengths and bad input
# ----------------------------------------------------------------------------------------------------------------

def test_truncate_drop_and_no_target_left(tmp_path, smollm2_tok):
  tok = smollm2_tok
  long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 50}]}
  short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
  path = write_rows(tmp_path / "d.jsonl", [long, short])
  n_long = len(tok.encode(tok.chat(long["messages"], add_generation_prompt=False)))
  n_short = len(tok.encode(tok.chat(short["messages"], add_generation_prompt=False)))
  cut = n_long - 20  # keeps some assistant tokens
  exs, c = read_examples(path, tok, max_length=cut, loss_on="assistant", overlong="truncate")
  assert [len(e.tokens) for e in exs] == [cut, n_short]
  assert (c.rows, c.kept, c.truncated, c.dropped) == (2, 2, 1, 0)
  exs, c = read_examples(path, tok, max_length=cut, loss_on="assistant", overlong="drop")
  assert len(exs) == 1 and (c.rows, c.kept, c.truncated, c.dropped) == (2, 1, 0, 1)
  # Truncated inside the user turn: no assistant token is left, so the example is dropped.
  exs, c = read_examples(path, tok, max_length=100, loss_on="assistant", overlong="truncate")
  assert len(exs) == 1 and (c.kept, c.truncated, c.dropped) == (1, 0, 1)
  exs, c = read_examples(path, tok, max_length=100, loss_on="all", overlong="truncate")
  assert len(exs) == 2 and (c.kept, c.truncated, c.dropped) == (2, 1, 0)
  assert c.target_tokens == 99 + n_short - 1 and c.tokens == 100 + n_short
  with pytest.raises(DataError, match=r"d\.jsonl: no usable examples \(2 rows: 2 dropped"):
    read_examples(path, tok, max_length=n_short - 1, overlong="drop")


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD = [('{"messages": [', "invalid JSON"),
       ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
       ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}, "role 'bot'"),
       ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "content must be a str"),
       ([1, 2], "expected a JSON object"),
       ({"text": "x"}, "'messages'"),
       ({"prompt": "x"}, "'messages'")]


@pytest.mark.parametrize("bad,why", BAD)
def test_bad_row_names_file_and_line(tmp_path, smollm2_tok, bad, why):
  path = write_rows(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
  with pytest.raises(DataError) as e:
    read_examples(path, smollm2_tok, max_length=64)
  assert str(e.value).startswith(f"{path}:3: ") and why in str(e.value) and "\n" not in str(e.value)


def test_skip_counts_bad_rows(tmp_path, smollm2_tok):
  other = {"prompt": "q2", "response": "a2"}  # not GOOD again: that would be a duplicate
  path = write_rows(tmp_path / "mixed.jsonl", [GOOD, *(b for b, _ in BAD), other])
  exs, c = read_examples(path, smollm2_tok, max_length=64, on_error="skip")
  assert [e.id for e in exs] == [f"{path}:1", f"{path}:{len(BAD) + 2}"]
  assert (c.rows, c.kept, c.skipped, c.dropped) == (len(BAD) + 2, 2, len(BAD), 0)
  only_bad = write_rows(tmp_path / "only_bad.jsonl", [b for b, _ in BAD])
  with pytest.raises(DataError, match=rf"only_bad\.jsonl: no usable examples \({len(BAD)} rows: .*{len(BAD)} skipped"):
    read_examples(only_bad, smollm2_tok, max_length=64, on_error="skip")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_missing_and_empty_files(tmp_path, smollm2_tok, on_error):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n", encoding="utf-8")
  with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: no examples$"):
    read_examples(empty, smollm2_tok, max_length=64, on_error=on_error)
  with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'nope.jsonl'))}: no such file"):
    read_examples(tmp_path / "nope.jsonl", smollm2_tok, max_length=64, on_error=on_error)


def test_template_boundaries_that_do_not_split_cleanly(tmp_path, smollm2_tok):
  # SmolLM2's template adds a default system turn only when the first message is not a system one, so an
  # assistant-first conversation's prefix renders differently; and "\n\n" opening a turn merges with the header's
  # "\n" into one token. Both are row errors in assistant mode (skippable), and fine in all-tokens mode.
  rows = [{"messages": [{"role": "assistant", "content": "hi"}]},
          {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nhi"}]}, GOOD]
  path = write_rows(tmp_path / "t.jsonl", rows)
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: the chat template is not prefix-stable"):
    read_examples(path, smollm2_tok, max_length=64, loss_on="assistant")
  exs, c = read_examples(path, smollm2_tok, max_length=64, loss_on="assistant", on_error="skip")
  assert [e.id for e in exs] == [f"{path}:3"] and c.skipped == 2
  exs, c = read_examples(path, smollm2_tok, max_length=64, loss_on="all")
  assert c.kept == 3
  write_rows(path, rows[1:])
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: encoding the text between assistant-turn"):
    read_examples(path, smollm2_tok, max_length=64, loss_on="assistant")


def test_bad_arguments(tmp_path, smollm2_tok):
  path = write_rows(tmp_path / "ok.jsonl", [GOOD])
  for kwargs in ({"loss_on": "user"}, {"overlong": "wrap"}, {"on_error": "ignore"}, {"max_length": 1}):
    with pytest.raises(ValueError):
      read_examples(path, smollm2_tok, **{"max_length": 64, **kwargs})


def test_real_mcts_sft_file(smollm2_tok):
  path = os.path.join(REPO, "docs", "smollm2_run", "sft.jsonl")
  ids = [json.loads(line)["id"] for line in open(path, encoding="utf-8") if line.strip()]
  exs_all, c_all = read_examples(path, smollm2_tok, max_length=4096, loss_on="all")
  exs_ast, c_ast = read_examples(path, smollm2_tok, max_length=4096, loss_on="assistant")
  assert [e.id for e in exs_all] == [e.id for e in exs_ast] == ids
  assert c_all.kept == c_ast.kept == len(ids) and c_all.tokens == c_ast.tokens
  assert 0 < c_ast.target_tokens < c_all.target_tokens == c_all.tokens - len(ids)
  for e in exs_ast:
    assert smollm2_tok.decode(e.tokens[e.loss_mask], skip_special_tokens=False).endswith("<|im_end|>")


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------

def random_examples(n: int, seed: int = 0, max_len: int = 24) -> list[Example]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(2, max_len + 1))
    mask = rng.random(length) < 0.6
    mask[0] = False
    out.append(Example(id=f"e{i}", tokens=rng.integers(1, 1000, length).astype(np.int32), loss_mask=mask))
  return out


def segments(row: dict) -> list[slice]:
  seg = row["segment_ids"]
  return [slice(int(np.flatnonzero(seg == s)[0]), int(np.flatnonzero(seg == s)[-1]) + 1)
          for s in range(1, seg.max() + 1)]


def test_pack_rows_are_consistent():
  exs = random_examples(40)
  T = 32
  rows = pack(exs, T, seed=1)
  by_tokens = {e.tokens.tobytes(): e for e in exs}
  seen = []
  for row in rows:
    assert sorted(row) == ["positions", "segment_ids", "targets", "tokens", "weights"]
    assert all(v.shape == (T,) for v in row.values()) and row["weights"].dtype == np.float32
    assert all(row[k].dtype == np.int32 for k in ("tokens", "positions", "segment_ids", "targets"))
    pad = row["segment_ids"] == 0
    assert not row["tokens"][pad].any() and not row["positions"][pad].any() and not row["weights"][pad].any()
    assert not row["targets"][pad].any()
    end = 0
    for sl in segments(row):
      assert sl.start == end  # segments are contiguous, padding only at the end
      end = sl.stop
      ex = by_tokens[row["tokens"][sl].tobytes()]
      seen.append(ex.id)
      assert row["positions"][sl].tolist() == list(range(len(ex.tokens)))
      assert row["targets"][sl][:-1].tolist() == ex.tokens[1:].tolist() and row["targets"][sl][-1] == 0
      assert row["weights"][sl][:-1].tolist() == ex.loss_mask[1:].astype(np.float32).tolist()
      assert row["weights"][sl][-1] == 0
    assert pad[end:].all()
  assert sorted(seen) == sorted(e.id for e in exs)  # every example exactly once
  assert sum(r["weights"].sum() for r in rows) == sum(e.loss_mask.sum() for e in exs)
  assert sum((r["segment_ids"] > 0).sum() for r in rows) == sum(len(e.tokens) for e in exs)
  assert len(rows) < len(exs)  # rows do get shared


def test_pack_first_fit_and_determinism():
  exs = random_examples(30, seed=3)
  a, b, c = pack(exs, 40, seed=5), pack(exs, 40, seed=5), pack(exs, 40, seed=6)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)
  assert len(a) != len(c) or any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
  # First fit by hand over the seed's permutation: the same rows, in the same order.
  order = np.random.default_rng(5).permutation(len(exs))
  bins: list[list[int]] = []
  for k in order:
    n = len(exs[k].tokens)
    fit = next((b for b in bins if sum(len(exs[j].tokens) for j in b) + n <= 40), None)
    if fit is None:
      bins.append(fit := [])
    fit.append(int(k))
  assert len(bins) == len(a)
  for members, row in zip(bins, a):
    assert row["tokens"][:sum(len(exs[j].tokens) for j in members)].tolist() == [
        t for j in members for t in exs[j].tokens.tolist()]


def test_pack_rejects_too_long_examples():
  with pytest.raises(ValueError, match="seq_len=8"):
    pack(random_examples(3, max_len=20) + [Example("long", np.ones(9, np.int32), np.zeros(9, bool))], 8, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------------------------

def numbered_rows(n: int, T: int = 4) -> list[dict[str, np.ndarray]]:
  return [{"tokens": np.full(T, i, np.int32), "weights": np.ones(T, np.float32)} for i in range(n)]


def ids_of(batch) -> list[int]:
  return batch["tokens"][:, 0].tolist()


def test_loader_epochs_resume_and_sharding():
  rows = numbered_rows(10)
  loader = make_loader(rows, global_batch=4, seed=3)
  assert loader.steps_per_epoch == 2
  stream = [next(loader) for _ in range(10)]
  assert all(b["tokens"].shape == (4, 4) and b["tokens"].dtype == np.int32 for b in stream)
  flat = [i for b in stream for i in ids_of(b)]
  epochs = [flat[i:i + 10] for i in range(0, 40, 10)]
  assert all(sorted(e) == list(range(10)) for e in epochs)  # each epoch is a permutation of the rows
  assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
  assert flat != [i for b in (next(make_loader(rows, global_batch=4, seed=4)) for _ in range(10)) for i in ids_of(b)]

  # Resume: a fresh loader from a JSON round-tripped state continues the same stream (across epoch boundaries).
  first = make_loader(rows, global_batch=4, seed=3)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = make_loader(rows, global_batch=4, seed=3)
  resumed.set_state(state)
  for want in stream[3:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)

  # Two processes' halves make the one-process batch; their states agree and resume either half.
  lo = make_loader(rows, global_batch=4, seed=3, local_rows=slice(0, 2))
  hi = make_loader(rows, global_batch=4, seed=3, local_rows=slice(2, 4))
  for want in stream[:5]:
    a, b = next(lo), next(hi)
    assert a["tokens"].shape == (2, 4)
    assert all(np.array_equal(np.concatenate([a[k], b[k]]), want[k]) for k in want)
  assert lo.get_state() == hi.get_state()
  with pytest.raises(ValueError, match="other data"):
    make_loader(rows, global_batch=2, seed=3).set_state(state)


def test_loader_with_fewer_rows_than_batch():
  loader = make_loader(numbered_rows(3), global_batch=4, seed=0)
  assert loader.steps_per_epoch == 1
  flat = [i for _ in range(3) for i in ids_of(next(loader))]
  assert all(sorted(flat[i:i + 3]) == [0, 1, 2] for i in range(0, 12, 3))  # epochs wrap inside batches


def test_loader_with_one_row_per_step():
  """batch 1: an endless stream batched by one (grain's length of it must not overflow)."""
  rows = [{"tokens": np.full(4, i, np.int32)} for i in range(3)]
  loader = make_loader(rows, global_batch=1, seed=0)
  seen = [int(next(loader)["tokens"][0, 0]) for _ in range(6)]
  assert sorted(seen[:3]) == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2]
