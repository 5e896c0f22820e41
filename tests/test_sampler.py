"""Sampler: greedy parity with HF generate on the real SmolLM2, sampling statistics, stop strings, n samples per
prefill, continuation from a prefix, and the same results on 1 and 8 (simulated) devices."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astro_jax.model import init_model, preset
from astro_jax.model.llama import forward
from astro_jax.sampler import Sampler, SamplingParams, _truncate, stop_automaton
from astro_jax.tokenizer import Tokenizer
from tests.conftest import run_with_devices

PROMPTS = (  # different lengths, all <= 24 tokens so that a prefix of 8 more tokens stays in the 32 bucket
    "Hi",
    "The capital of France is",
    "Solve 2x = 10 for x.",
    "Write a haiku about the sea.\n",
    "Once upon a time, in a land far away, there lived a",
    "Question: A farmer has 17 sheep and buys 5 more. How many sheep?\n",
    "def fib(n):",
    "Translate to French: I like apples and pears.",
)
NEW = 64


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir():
  from astro_jax import assets
  return assets.smollm2_hf_dir()


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
  return Tokenizer.load(hf_dir)


@pytest.fixture(scope="module")
def smol(hf_dir, tokenizer):
  from astro_jax.checkpoint import load_hf_model
  return Sampler(load_hf_model(hf_dir), tokenizer)


@pytest.fixture(scope="module")
def greedy(smol, tokenizer):
  """(prompt ids, our greedy completions) for PROMPTS: one padded batch of 8 rows."""
  ids = [tokenizer.encode_prompt(p) for p in PROMPTS]
  return ids, [c[0] for c in smol.generate(ids, SamplingParams(temperature=0, max_new_tokens=NEW))]


@pytest.fixture(scope="module")
def tiny(tokenizer):
  """A tiny random model with peaked logits (embeddings scaled up), for sampling statistics."""
  model = init_model(preset("tiny"), seed=3)
  model.embed[...] = model.embed[...] * 4.0
  return model, Sampler(model, tokenizer, max_batch=1024)


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, weights, tokens_BT):
  return forward(cfg, None, weights, tokens_BT, jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape))[0]


def teacher_forced_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0):
  """log softmax(logits / T) of each completion token, from one full forward pass over prompt + completion."""
  logits = _logits(model.cfg, model.weights(), jnp.asarray([prompt + completion]))
  lp = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1] / temperature, axis=-1)
  return np.asarray(jnp.take_along_axis(lp, jnp.asarray(completion)[:, None], axis=-1)[:, 0])


# --- real model: parity with HF ---------------------------------------------------------------------------------

def test_greedy_matches_hf_generate(hf_dir, tokenizer, greedy):
  import torch
  from transformers import AutoModelForCausalLM
  ids, ours = greedy
  assert len(set(map(len, ids))) >= 6  # really different lengths in one padded batch
  hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  P = max(map(len, ids))
  input_ids = torch.tensor([[tokenizer.pad_id] * (P - len(x)) + x for x in ids])
  mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids])
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's thread pool crawls when the CPU is shared (CI runs tests side by side)
  try:
    with torch.no_grad():
      out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                        return_dict_in_generate=True, output_logits=True, pad_token_id=tokenizer.pad_id)
  finally:
    torch.set_num_threads(threads)
  hf_tokens = out.sequences[:, P:].numpy()
  hf_lp = torch.stack(out.logits, 1).log_softmax(-1).numpy()
  for b, c in enumerate(ours):
    n = len(c.token_ids)
    assert c.token_ids == hf_tokens[b, :n].tolist(), b
    if c.finish_reason == "eos":
      assert c.token_ids[-1] in tokenizer.eos_ids
    else:
      assert c.finish_reason == "length" and n == NEW
    ref = hf_lp[b, np.arange(n), c.token_ids]
    np.testing.assert_allclose(c.model_logprobs, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(c.logprobs, ref, atol=1e-4, rtol=0)  # greedy: the model's own log-probs
    assert c.text == tokenizer.decode(c.token_ids)
  assert "length" in {c.finish_reason for c in ours}


def test_continue_from_prefix_equals_whole(smol, greedy):
  ids, whole = greedy
  k = 8
  rows = [b for b, c in enumerate(whole) if len(c.token_ids) > k + 4]
  prefixed = [ids[b] + whole[b].token_ids[:k] for b in rows]
  rest = smol.generate(prefixed, SamplingParams(temperature=0, max_new_tokens=NEW - k))
  for b, (c,) in zip(rows, rest):
    assert c.token_ids == whole[b].token_ids[k:]
    assert c.finish_reason == whole[b].finish_reason
    np.testing.assert_allclose(c.model_logprobs, whole[b].model_logprobs[k:], atol=1e-4)


def _first_stop(tokenizer, token_ids, stop):
  """Reference: the shortest token prefix whose text holds a stop string, and the cut text."""
  for k in range(1, len(token_ids) + 1):
    text = tokenizer.decode(token_ids[:k])
    hits = [(text.find(s), s) for s in stop if s in text]
    if hits:
      pos, s = min(hits)
      return k, text[:pos], s
  return None


def test_stop_strings_cut_at_first_occurrence(smol, tokenizer, greedy):
  ids, whole = greedy
  # Stop strings taken from the greedy texts, two of them straddling a token boundary.
  text = whole[4].text
  boundary = len(tokenizer.decode(whole[4].token_ids[:5]))
  straddle = text[boundary - 1:boundary + 1]
  text1 = whole[1].text
  boundary1 = len(tokenizer.decode(whole[1].token_ids[:3]))
  stop = ("\n\n", straddle, text1[boundary1 - 2:boundary1 + 1])
  for include in (False, True):
    got = smol.generate(ids, SamplingParams(temperature=0, max_new_tokens=NEW, stop=stop,
                                            include_stop_str=include))
    n_stopped = 0
    for b, (c,) in enumerate(got):
      ref = _first_stop(tokenizer, whole[b].token_ids, stop)
      if ref is None:
        assert c.token_ids == whole[b].token_ids and c.finish_reason == whole[b].finish_reason
        continue
      n_stopped += 1
      k, cut, s = ref
      assert c.finish_reason == "stop"
      assert c.token_ids == whole[b].token_ids[:k]  # stopped in the loop at the completing token
      assert c.text == (cut + s if include else cut)
      assert len(c.logprobs) == len(c.model_logprobs) == k
    assert n_stopped >= 2


# --- tiny model: sampling ---------------------------------------------------------------------------------------

def test_truncate_matches_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
  top_p = np.array([1.0, 0.5, 0.9, 0.3, 1.0, 0.8], np.float32)
  top_k = np.array([0, 0, 5, 0, 1, 10], np.int32)
  got = np.asarray(_truncate(jnp.asarray(logits), jnp.asarray(top_p), jnp.asarray(top_k)))
  for b in range(6):
    order = np.argsort(-logits[b])
    keep = order[:top_k[b]] if top_k[b] else order
    probs = np.exp(logits[b, keep] - logits[b, keep].max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    keep = keep[mass_before < top_p[b]]
    assert set(np.flatnonzero(np.isfinite(got[b]))) == set(keep.tolist()), b
    np.testing.assert_array_equal(got[b, keep], logits[b, keep])


def test_stop_automaton_matches_brute_force():
  texts = ["a", "\n", "\n\n", "b\n", "\nc", "", "x\n\ny", "ab"]
  stop = ("\n\n", "ab\n")
  table, lengths = stop_automaton(stop, texts)
  for seq in itertools.product(range(len(texts)), repeat=3):
    state = np.zeros(len(stop), np.int64)
    matched = []
    for t in seq:
      state = table[np.arange(len(stop)), state, t]
      matched.append(bool(np.any(state == lengths)))
    expect = [any(s in "".join(texts[t] for t in seq[:i + 1]) for s in stop) for i in range(len(seq))]
    assert matched == expect, seq


def test_first_token_frequencies_match_softmax(tiny):
  from scipy import stats
  model, sampler = tiny
  prompt, T, n = [1, 17, 42, 99, 7], 0.7, 4096
  logits, _ = model(jnp.asarray([prompt]), jnp.arange(len(prompt))[None])
  probs = np.asarray(jax.nn.softmax(logits[0, -1] / T), np.float64)
  probs /= probs.sum()  # exact normalisation in float64 (chisquare checks the totals)
  (out,) = sampler.generate([prompt], SamplingParams(temperature=T, max_new_tokens=1, n=n, seed=1,
                                                     ignore_eos=True))
  tokens = np.array([c.token_ids[0] for c in out])
  assert len(set(tokens.tolist())) > 20  # a real distribution, not a near-greedy one
  counts = np.bincount(tokens, minlength=probs.size)
  big = probs * n >= 5  # pool the rare tokens into one bin for the chi-square test
  observed = np.append(counts[big], counts[~big].sum())
  expected = np.append(probs[big], probs[~big].sum()) * n
  assert stats.chisquare(observed, expected).pvalue > 1e-3
  np.testing.assert_allclose([c.logprobs[0] for c in out], np.log(probs[tokens]), atol=1e-4)
  np.testing.assert_allclose([c.model_logprobs[0] for c in out],
                             np.asarray(jax.nn.log_softmax(logits[0, -1]))[tokens], atol=1e-4)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.8)])
def test_top_k_top_p_never_leave_their_set(tiny, top_k, top_p):
  model, sampler = tiny
  prompt, T = [1, 5, 9], 1.3
  params = SamplingParams(temperature=T, top_k=top_k, top_p=top_p, max_new_tokens=2, n=1024, seed=2,
                          ignore_eos=True)
  (out,) = sampler.generate([prompt], params)
  logits, _ = model(jnp.asarray([prompt]), jnp.arange(3)[None])
  allowed = np.isfinite(np.asarray(_truncate(logits[0, -1:] / T, jnp.array([top_p]), jnp.array([top_k])))[0])
  assert 1 < allowed.sum() < allowed.size
  first = np.array([c.token_ids[0] for c in out])
  assert allowed[first].all() and len(set(first.tolist())) > 1
  # The reported log-prob is that of the renormalised, truncated distribution.
  scaled = np.asarray(logits[0, -1] / T, np.float64)
  lp = scaled - np.log(np.exp(scaled[allowed]).sum())
  np.testing.assert_allclose([c.logprobs[0] for c in out], lp[first], atol=1e-4)


def test_n_samples_share_a_prefill_and_are_valid(tiny):
  model, sampler = tiny
  prompts = [[1, 2, 3, 4, 5, 6, 7], [1, 300, 200]]
  params = SamplingParams(temperature=0.9, max_new_tokens=12, n=6, seed=5, ignore_eos=True)
  out = sampler.generate(prompts, params)
  for prompt, samples in zip(prompts, out):
    assert len(samples) == 6
    assert len({tuple(c.token_ids) for c in samples}) == 6  # they differ
    for c in samples:
      assert len(c.token_ids) == 12 and c.finish_reason == "length"
      np.testing.assert_allclose(c.logprobs, teacher_forced_logprobs(model, prompt, c.token_ids, 0.9), atol=1e-4)
      np.testing.assert_allclose(c.model_logprobs, teacher_forced_logprobs(model, prompt, c.token_ids), atol=1e-4)
  # Each row has its own random stream: the same samples in smaller batches, or for a prompt alone.
  small = Sampler(model, sampler.tokenizer, max_batch=4).generate(prompts, params)
  assert [[c.token_ids for c in s] for s in small] == [[c.token_ids for c in s] for s in out]
  other_seed = sampler.generate(prompts, dataclasses.replace(params, seed=6))
  assert other_seed[0][0].token_ids != out[0][0].token_ids


# --- mesh --------------------------------------------------------------------------------------------------------

SHARDED = """
import json, jax
from astro_jax import assets
from astro_jax.model import init_model, preset
from astro_jax.sampler import Sampler, SamplingParams
from astro_jax.sharding import Sharder, make_mesh
from astro_jax.tokenizer import Tokenizer
assert jax.device_count() == 8
tok = Tokenizer.load(assets.smollm2_hf_dir())
model = init_model(preset("tiny"), seed=3)  # heads, kv heads, mlp and vocab all split over tensor=2
model.embed[...] = model.embed[...] * 40.0  # peaked logits, as in the `tiny` fixture
prompts = [[1, 17, 42, 99, 7], [1, 5], [1, 300, 200, 100, 50, 25, 12], [1, 2, 3]]
runs = {}
for name, mesh in [("single", None), ("d2f2t2", (2, 2, 2)), ("f8", (1, 8, 1))]:
  sharder = None if mesh is None else Sharder.create(make_mesh(*mesh), "sample")
  s = Sampler(model, tok, sharder=sharder)
  greedy = s.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
  sampled = s.generate(prompts[:2], SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24, n=3, seed=4,
                                                   ignore_eos=True))
  runs[name] = [[(c.token_ids, c.model_logprobs) for c in r] for r in greedy + sampled]
  if name == "d2f2t2":  # really tensor-parallel: the sample rules split the MLP and (fused) kv heads over "tensor"
    layer = s.params["layers"][0]
    assert tuple(layer["w_gate"].sharding.spec) == (None, "tensor"), layer["w_gate"].sharding
    assert tuple(layer["wqkv"].sharding.spec)[1:2] == ("tensor",), layer["wqkv"].sharding
print(json.dumps(runs))
"""


def test_sharded_sampling_matches_single_device():
  runs = json.loads(run_with_devices(SHARDED, n_devices=8, timeout=900).strip().splitlines()[-1])
  for name in ("d2f2t2", "f8"):
    for ref_row, row in zip(runs["single"], runs[name]):
      for (ref_ids, ref_lp), (got_ids, got_lp) in zip(ref_row, row):
        assert got_ids == ref_ids, name
        np.testing.assert_allclose(got_lp, ref_lp, atol=1e-4)


# --- randomness from stable identities; request-level sampling ---------------------------------------------------

def _ids(results):
  return [[c.token_ids for c in samples] for samples in results]


def test_samples_depend_on_keys_not_on_batching(tiny):
  """8 identical prompts at temperature 1: any max_batch (1, 4, 16), or the job cut into calls as a resumed run
  would, gives the same samples per key; identical prompts with different keys differ."""
  model, sampler = tiny
  prompts = [[1, 17, 42, 99]] * 8
  params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=7, ignore_eos=True)
  keys = [f"row-{i}" for i in range(8)]
  runs = [Sampler(model, sampler.tokenizer, max_batch=b).generate(prompts, params, keys=keys) for b in (1, 4, 16)]
  assert _ids(runs[0]) == _ids(runs[1]) == _ids(runs[2])
  resumed = (Sampler(model, sampler.tokenizer, max_batch=4).generate(prompts[:3], params, keys=keys[:3]) +
             Sampler(model, sampler.tokenizer, max_batch=16).generate(prompts[3:], params, keys=keys[3:]))
  assert _ids(resumed) == _ids(runs[0])
  rows = [tuple(ids) for samples in _ids(runs[0]) for ids in samples]
  assert len(set(rows)) == len(rows)  # 16 samples of one prompt, all different
  assert _ids(sampler.generate(prompts[:1], params, keys=["row-0"]))[0] == _ids(runs[0])[0]
  assert _ids(sampler.generate(prompts[:1], params, keys=["row-9"]))[0] != _ids(runs[0])[0]


def test_mixed_requests_in_one_call_equal_one_by_one(tiny):
  """One `sample` call with mixed n / temperature / top-p / budgets / stop sets (greedy and sampled) gives what
  each request gives alone; identical prompts of different requests share a prefill but not their samples."""
  from astro_jax.sampler import Request
  model, sampler = tiny
  texts = sampler.tokenizer.hf.batch_decode([[i] for i in range(3, 40)])
  stop = next(t for t in texts if t.strip())  # a token text the tiny model may produce
  P = SamplingParams
  requests = [
      Request([1, 5, 9], P(temperature=0, max_new_tokens=6), key=0),
      Request([1, 5, 9], P(temperature=0.8, top_p=0.9, max_new_tokens=12, n=3, seed=1), key=1),
      Request([1, 300, 200, 100, 50], P(temperature=1.2, top_k=20, max_new_tokens=5, n=2, seed=1), key=["a", 2]),
      Request([1, 5, 9], P(temperature=1.0, max_new_tokens=9, n=2, stop=(stop,), seed=3), key=3),
      Request([1, 7], P(temperature=0, max_new_tokens=16, stop=(stop, "\n\n")), key=4),
      Request([1, 5, 9], P(temperature=0.8, top_p=0.9, max_new_tokens=12, n=3, seed=1), key=5),
  ]
  together = sampler.sample(requests)
  alone = [Sampler(model, sampler.tokenizer, max_batch=3).sample([r])[0] for r in requests]
  assert _ids(together) == _ids(alone)
  for req, samples in zip(requests, together):
    assert len(samples) == req.params.n
    assert all(len(c.token_ids) <= req.params.max_new_tokens for c in samples)
    assert all(stop not in c.text for c in samples) if req.params.stop else True
  assert _ids([together[1]]) != _ids([together[5]])  # same prompt and settings, other key


def test_sampler_stats_count_rows_tokens_and_idle_steps(tiny):
  model, sampler = tiny
  s = Sampler(model, sampler.tokenizer, max_batch=8)
  out = s.generate([[1, 2, 3], [1, 4]], SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=2))
  lengths = [len(c.token_ids) for samples in out for c in samples]
  assert (s.stats.calls, s.stats.batches, s.stats.requests, s.stats.rows) == (1, 1, 2, 4)
  assert s.stats.tokens == sum(lengths) and s.stats.row_steps == 4 * max(lengths)
  assert s.stats.live_row_fraction == pytest.approx(sum(lengths) / (4 * max(lengths)))


def test_update_weights_takes_params_casts_and_never_recompiles(tokenizer):
  """The sampler takes a params pytree (a trainer's), keeps it in its own dtype, frees only its own copies, and
  a second update with same-shaped weights compiles nothing; the trainer's execution settings do not leak in."""
  from astro_jax.model import Execution
  model = init_model(preset("tiny"), seed=4, run=Execution(remat="full", scan_layers=True))
  sampler = Sampler(model, tokenizer, max_batch=8, dtype="bfloat16")
  assert sampler.run == Execution(dtype="bfloat16", remat="none", scan_layers=False)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(sampler.params))
  params = jax.tree.map(lambda a: a * 1.5, model.weights())
  before = sampler._prepare_weights._cache_size()
  sampler.update_weights(params)
  assert sampler._prepare_weights._cache_size() == before  # same shapes and layout: the program is reused
  np.testing.assert_allclose(np.asarray(sampler.params["embed"], np.float32),
                             np.asarray(params["embed"].astype(jnp.bfloat16), np.float32))
  assert all(not a.is_deleted() for a in jax.tree.leaves(params)) and not model.embed[...].is_deleted()
  out = sampler.generate([[1, 5, 7]], SamplingParams(temperature=0, max_new_tokens=4))
  assert len(out[0][0].token_ids) == 4
  f32 = Sampler(model, tokenizer, max_batch=8)  # float32 sampling of float32 weights: embed may be the model's own
  f32.update_weights(params)
  assert not model.embed[...].is_deleted() and not params["embed"].is_deleted()
