"""Continuous engine: the static sampler's results (greedy token for token, sampled rows counted), slots refilled as
rows finish, prefix reuse exact and counted, prefixes forgotten on new weights, completions streamed as they finish,
the same results on 8 (simulated) devices."""
from __future__ import annotations

import json

import numpy as np
import pytest

from astro_jax.engine import Engine, make_sampler
from astro_jax.model import init_model, preset
from astro_jax.sampler import Request, Sampler, SamplingParams
from astro_jax.tokenizer import Tokenizer
from tests.conftest import run_with_devices

P = SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
  from astro_jax import assets
  return Tokenizer.load(assets.smollm2_hf_dir())


@pytest.fixture(scope="module")
def model():
  m = init_model(preset("tiny"), seed=3)
  m.embed[...] = m.embed[...] * 4.0  # peaked logits: stops and EOS happen at varied lengths
  return m


def _ids(results):
  return [[c.token_ids for c in samples] for samples in results]


def _requests(n: int = 18, seed: int = 0) -> list[Request]:
  """Mixed requests: prompt lengths 4-40, budgets 3-60, greedy and sampled (top-p, top-k), n = 1..3."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    ids = [1] + rng.integers(2, 500, int(rng.integers(3, 40))).tolist()
    params = P(temperature=0 if i % 2 else 0.9, top_p=0.9 if i % 3 == 0 else 1.0, top_k=20 if i % 5 == 0 else 0,
               max_new_tokens=int(rng.integers(3, 60)), n=1 + i % 3, seed=1)
    out.append(Request(ids, params, key=["r", i]))
  return out


def test_engine_equals_static_sampler_and_keeps_slots_busy(model, tokenizer):
  """4 slots for 36 rows: rows enter as others finish. Every greedy row is the static path's token for token;
  sampled rows draw from the same streams (measured: all equal here, where the logits are bit-equal)."""
  requests = _requests()
  static = Sampler(model, tokenizer, max_batch=4)
  engine = Engine(model, tokenizer, max_batch=4, chunk_steps=8)
  want, got = static.sample(requests), engine.sample(requests)
  greedy = [i for i, r in enumerate(requests) if r.params.temperature == 0]
  assert [_ids(want)[i] for i in greedy] == [_ids(got)[i] for i in greedy]
  rows = [(a, b) for x, y in zip(_ids(want), _ids(got)) for a, b in zip(x, y)]
  same = sum(a == b for a, b in rows) / len(rows)
  print(f"sampled+greedy rows identical to the static path: {same:.3f}")
  assert same >= 0.9
  for w, g in zip(want, got):
    for a, b in zip(w, g):
      if a.token_ids == b.token_ids:
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
        np.testing.assert_allclose(a.model_logprobs, b.model_logprobs, atol=1e-4)
  assert engine.stats.rows == static.stats.rows == sum(r.params.n for r in requests)
  assert engine.stats.tokens == sum(len(c.token_ids) for s in got for c in s)
  assert engine.stats.live_row_fraction > static.stats.live_row_fraction
  # any slot count and chunk size: the same rows
  other = Engine(model, tokenizer, max_batch=8, chunk_steps=3)
  assert _ids(other.sample(requests)) == _ids(got)


def test_min_width_narrows_the_tails_not_the_results(model, tokenizer):
  """Decode programs down to 1 slot (a CPU's default) or 8: the same rows, and the narrower tails waste less."""
  requests = _requests(12, seed=2)
  narrow, wide = (Engine(model, tokenizer, max_batch=16, chunk_steps=8, min_width=w) for w in (None, 8))
  assert (narrow.narrowest, wide.narrowest) == (1, 8)  # None: the device's default (this is a CPU)
  assert _ids(narrow.sample(requests)) == _ids(wide.sample(requests))
  assert narrow.stats.live_row_fraction > wide.stats.live_row_fraction
  with pytest.raises(ValueError, match="min_width"):
    Engine(model, tokenizer, max_batch=16, min_width=0)


def test_prefix_reuse_is_exact_and_counted(model, tokenizer):
  """A prompt that extends a kept one computes only its new tokens; a request continuing a finished row (kept with
  keep_completions, as its request has stop strings: a step) computes one; the outputs are those of an engine that
  keeps nothing."""
  base = list(range(1, 31))
  greedy = P(temperature=0, max_new_tokens=12, ignore_eos=True, stop=("\x00never",))
  engine = Engine(model, tokenizer, max_batch=4, keep_completions=True)
  fresh = Engine(model, tokenizer, max_batch=4, prefix_cache_mb=0)
  first = engine.sample([Request(base, greedy, key=0)])[0][0]
  assert (engine.stats.prefill_tokens, engine.stats.prefill_computed) == (30, 30)
  longer = base + [7, 8, 9, 10, 11]
  got = engine.sample([Request(longer, greedy, key=1)])[0][0]
  assert engine.stats.prefill_computed == 30 + 5  # the kept 30 are copied, the 5 new ones computed
  assert got.token_ids == fresh.sample([Request(longer, greedy, key=1)])[0][0].token_ids
  child = base + first.token_ids  # the finished row: base + 11 fed tokens; its last token is new
  before = engine.stats.prefill_computed
  got = engine.sample([Request(child, greedy, key=2)])[0][0]
  assert engine.stats.prefill_computed - before == 1
  assert got.token_ids == fresh.sample([Request(child, greedy, key=2)])[0][0].token_ids
  assert fresh.stats.prefill_computed == fresh.stats.prefill_tokens  # nothing kept, nothing reused
  # a sampled group: its n samples share the prompt's one prefill
  group = engine.sample([Request(list(range(40, 90)), P(temperature=1.0, max_new_tokens=6, n=8, seed=3), key=3)])
  # 4 slots: the first 4 samples share one prefill of 50 tokens; the 4 that wait reuse the kept prompt (its last
  # token recomputed for the logits), in one insert or more as slots free up
  assert len(group[0]) == 8 and 50 + 1 <= engine.stats.prefill_computed - before - 1 <= 50 + 4
  # a row sampled without stop strings (a whole rollout) is not kept: a request continuing it computes its tokens
  other = list(range(100, 130))
  rollout = engine.sample([Request(other, P(temperature=0, max_new_tokens=12, ignore_eos=True), key=5)])[0][0]
  before = engine.stats.prefill_computed
  engine.sample([Request(other + rollout.token_ids, greedy, key=6)])
  assert engine.stats.prefill_computed - before == len(rollout.token_ids) == 12  # only the prompt's 30 reused


def test_new_weights_forget_kept_prefixes(model, tokenizer):
  other = init_model(preset("tiny"), seed=4)
  prompt = list(range(1, 25))
  greedy = P(temperature=0, max_new_tokens=10, ignore_eos=True)
  engine = Engine(model, tokenizer, max_batch=4)
  engine.sample([Request(prompt, greedy, key=0)])
  engine.update_weights(other)
  before = engine.stats.prefill_computed
  got = engine.sample([Request(prompt + [3], greedy, key=0)])[0][0]
  assert engine.stats.prefill_computed - before == 25  # all recomputed: the kept rows were the old weights'
  assert got.token_ids == Sampler(other, tokenizer).sample([Request(prompt + [3], greedy, key=0)])[0][0].token_ids


def test_stream_delivers_each_row_once_as_it_finishes(model, tokenizer):
  requests = [Request([1, 2, 3, i], P(temperature=0, max_new_tokens=m, ignore_eos=True), key=i)
              for i, m in enumerate([40, 4, 40, 4, 20, 8])]
  engine = Engine(model, tokenizer, max_batch=8, chunk_steps=4)
  order = [(r, j) for r, j, _ in engine.stream(requests)]
  assert sorted(order) == [(r, 0) for r in range(6)]
  assert order.index((1, 0)) < order.index((0, 0)) and order.index((5, 0)) < order.index((4, 0)) < order.index((2, 0))


def test_make_sampler_names_the_engine(model, tokenizer):
  assert type(make_sampler("static", model, tokenizer, keep_completions=True)) is Sampler
  assert isinstance(make_sampler("continuous", model, tokenizer), Engine)
  with pytest.raises(ValueError, match="unknown sampler engine 'paged'"):
    make_sampler("paged", model, tokenizer)


SHARDED = """
import json, jax
from astro_jax import assets
from astro_jax.engine import Engine
from astro_jax.model import init_model, preset
from astro_jax.sampler import Request, Sampler, SamplingParams as P
from astro_jax.sharding import Sharder, make_mesh
from astro_jax.tokenizer import Tokenizer
assert jax.device_count() == 8
tok = Tokenizer.load(assets.smollm2_hf_dir())
model = init_model(preset("tiny"), seed=3)
model.embed[...] = model.embed[...] * 40.0
reqs = [Request([1, 17, 42, 99, 7], P(temperature=0, max_new_tokens=24, ignore_eos=True), key=0),
        Request([1, 5], P(temperature=0, max_new_tokens=9, ignore_eos=True), key=1),
        Request([1, 300, 200, 100, 50, 25, 12], P(temperature=1.0, top_p=0.9, max_new_tokens=16, n=3, seed=4), key=2),
        Request([1, 2, 3], P(temperature=0, max_new_tokens=30), key=3)]
runs = {"static": [[c.token_ids for c in r] for r in Sampler(model, tok).sample(reqs)]}
for name, mesh in [("single", None), ("d2f2t2", (2, 2, 2)), ("f8", (1, 8, 1))]:
  sharder = None if mesh is None else Sharder.create(make_mesh(*mesh), "sample")
  e = Engine(model, tok, sharder=sharder, max_batch=8, chunk_steps=5)
  runs[name] = [[c.token_ids for c in r] for r in e.sample(reqs)]
print(json.dumps(runs))
"""


def test_engine_on_8_devices_matches_one():
  runs = json.loads(run_with_devices(SHARDED, n_devices=8, timeout=900).strip().splitlines()[-1])
  assert runs["single"] == runs["d2f2t2"] == runs["f8"]
  greedy = [0, 1, 3]
  assert [runs["single"][i] for i in greedy] == [runs["static"][i] for i in greedy]
