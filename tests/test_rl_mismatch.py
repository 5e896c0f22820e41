"""Rollout/trainer mismatch: the metrics against NumPy, their detection of a bf16 or stale sampler, and truncated
importance sampling (TIS) bringing the expected gradient under a stale sampler back to the on-policy one.

The expected-gradient test is exact, not sampled: one-token responses, every token of the vocabulary for each
prompt, each row weighted by its probability under the policy that "sampled" it (the clipped surrogate is
positively homogeneous in the advantage, so a row's weight q(a) goes into its advantage q(a)·A(a)). Then
  on-policy  Σ_a π(a) A(a) ∇log π(a)               (the trainer samples: its own log-probs as the sampler's)
  no TIS     Σ_a μ(a) ∇ clipped-surrogate(π/μ)      = Σ π A ∇log π over the tokens PPO's band does not clip
  TIS C      Σ_a μ(a) min(π/μ, C) A ∇log π          = the on-policy gradient but for tokens with π/μ > C
for a stale sampler μ whose ratios leave the clip band."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astro_jax.model import Execution, init_model, preset
from astro_jax.train import losses, rollouts
from astro_jax.train import policy_loss as pl

J = lambda x: jnp.asarray(x, jnp.float32)


@pytest.fixture(scope="module")
def hand_batch():
  rng = np.random.default_rng(3)
  B, T = 4, 6
  trainer = rng.normal(-2.0, 0.6, (B, T)).astype(np.float32)
  sampler = (trainer + rng.normal(0.0, 0.5, (B, T))).astype(np.float32)  # ratios from ~0.3 to ~3
  sampler[0, 1] = trainer[0, 1] + 3.0  # one far-off token (ratio e^-3)
  mask = np.ones((B, T), bool)
  mask[1, 4:] = mask[3, :] = False
  mask[2, 0] = False
  return trainer, sampler, mask, rng.normal(0.0, 1.0, B)


def test_mismatch_metrics_match_numpy(hand_batch):
  trainer, sampler, mask, _ = hand_batch
  got = {k: float(v) for k, v in pl.mismatch_sums(J(trainer), J(sampler), jnp.asarray(mask)).items()}
  d = [float(trainer[b, t]) - float(sampler[b, t]) for b, t in zip(*np.nonzero(mask))]
  want = {"mismatch_abs": sum(abs(x) for x in d), "mismatch_max": max(abs(x) for x in d),
          "mismatch_k3": sum(math.exp(x) - x - 1 for x in d),  # r - 1 - log r, r = π_trainer / π_sampler
          "mismatch_out": sum(not 0.5 <= math.exp(x) <= 2.0 for x in d)}
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-5), k
  assert 0 < want["mismatch_out"] < len(d) and want["mismatch_max"] == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("given_prox", [False, True])
def test_tis_loss_and_gradient_match_numpy(hand_batch, given_prox):
  """TIS: ρ = π / π_prox clipped, weight min(π_prox / π_sampler, C) without gradient; prox defaults to the current
  log-probs (ρ = 1, nothing clipped, the loss is -Σ w·A / tokens)."""
  trainer, sampler, mask, adv = hand_batch
  rng = np.random.default_rng(4)
  logp = (trainer + rng.normal(0.0, 0.3, trainer.shape)).astype(np.float32) if given_prox else trainer
  cap, lo, hi = 2.0, 0.8, 1.28
  w = np.minimum(np.exp(trainer.astype(np.float64) - sampler), cap)
  rho = np.exp(logp.astype(np.float64) - trainer)
  per = w * np.maximum(-adv[:, None] * rho, -adv[:, None] * np.clip(rho, lo, hi))
  n = mask.sum()
  f = lambda lp: pl.policy_loss(lp, J(sampler), J(adv), jnp.asarray(mask), tis_cap=cap,
                                prox_logp_BT=J(trainer) if given_prox else None)
  s, wsum, extra = f(J(logp))
  assert float(s / wsum) == pytest.approx(float(per[mask].sum() / n), rel=1e-5)
  assert float(extra["tis_weight"]) == pytest.approx(float(w[mask].sum()), rel=1e-5)
  assert float(extra["tis_capped"]) == np.sum(mask & (np.exp(trainer.astype(np.float64) - sampler) > cap)) > 0
  grad = np.asarray(jax.grad(lambda lp: (lambda a, b, _: a / b)(*f(lp)))(J(logp)))
  clipped = np.where(adv[:, None] > 0, rho > hi, rho < lo)
  want = np.where(mask & ~clipped, -adv[:, None] * w * rho / n, 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)
  assert given_prox == bool((clipped & mask).any())  # with prox = the current log-probs nothing is clipped


# --- a tiny model: detection, and the expected gradient with and without TIS -------------------------------------

V = 512
PROMPTS = [[1, 17, 250, 33], [1, 400, 5, 6, 77, 9]]


@pytest.fixture(scope="module")
def model():
  """A tiny fp32 trainer with peaked next-token distributions (varied probabilities, as a trained model's) and a
  stale copy of it (the weights before a few updates: its ratios to the trainer leave PPO's band)."""
  cfg = preset("tiny")
  params = init_model(cfg, seed=7).weights()
  params["embed"] = params["embed"] * 3.0  # tied: the head's logits too
  key = jax.random.PRNGKey(11)
  stale = {k: v + 0.5 * jnp.std(v) * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
           for i, (k, v) in enumerate(sorted(params.items()))}
  return cfg, params, stale


def all_tokens_rows() -> dict:
  """Every vocabulary token as a one-token response to each prompt: rows [len(PROMPTS) * V, 7]."""
  prompts = [p for p in PROMPTS for _ in range(V)]
  resp = [[a] for _ in PROMPTS for a in range(V)]
  return rollouts.response_rows(prompts, resp, [[0.0]] * len(resp), [0.0] * len(resp), seq_len=7)


def logprobs(cfg, params, rows, dtype: str = "float32") -> np.ndarray:
  """The log-prob of each row's targets under `params` run in `dtype` (bf16: weights and matmuls)."""
  run = Execution(dtype=dtype)
  p = {k: v.astype(run.jnp_dtype) for k, v in params.items()}
  lp, _ = jax.jit(lambda p, b: losses.sequence_logprobs(cfg, run, None, p, b, chunk=8))(p, rows)
  return np.asarray(lp, np.float32) * rows["weights"]


def test_metrics_detect_a_bf16_or_stale_sampler(model):
  cfg, params, stale = model
  rows = all_tokens_rows()
  trainer = logprobs(cfg, params, rows)
  n = rows["weights"].sum()
  got = {}
  for name, sampler in (("same", trainer), ("bf16", logprobs(cfg, params, rows, "bfloat16")),
                        ("stale", logprobs(cfg, stale, rows))):
    sums = pl.mismatch_sums(J(trainer), J(sampler), jnp.asarray(rows["weights"]))
    got[name] = {k: float(v) / (1.0 if k == "mismatch_max" else n) for k, v in sums.items()}
  assert all(v == 0.0 for v in got["same"].values()), got
  bf16, stale_ = got["bf16"], got["stale"]
  assert 1e-3 < bf16["mismatch_abs"] < bf16["mismatch_max"] < 0.5 and bf16["mismatch_k3"] > 1e-6, got
  assert stale_["mismatch_abs"] > 10 * bf16["mismatch_abs"] and stale_["mismatch_out"] > 0.02, got
  # the loss reports them: rl_loss with the bf16 sampler's log-probs as the batch's old_logprobs
  batch = {k: jnp.asarray(v) for k, v in rows.items()} | {"old_logprobs": J(logprobs(cfg, params, rows, "bfloat16"))}
  _, _, extra = rollouts.rl_loss(cfg, Execution(), None, params, batch, chunk=8)
  assert float(extra["mismatch_abs"]) / n == pytest.approx(bf16["mismatch_abs"], rel=1e-3)
  assert float(extra["mismatch_max"]) == pytest.approx(bf16["mismatch_max"], rel=1e-3)


def test_tis_corrects_a_stale_sampler(model):
  cfg, params, stale = model
  rows = all_tokens_rows()
  w = rows["weights"]
  trainer, sampler = logprobs(cfg, params, rows), logprobs(cfg, stale, rows)
  adv_BT = np.random.default_rng(5).normal(0.0, 1.0, w.shape).astype(np.float32) * w  # A(prompt, token)
  pi, mu = np.exp(trainer) * w, np.exp(sampler) * w

  def expected_grad(old, q, tis_cap=None):
    """Σ_a q(a) ∇ loss(a): rows weighted by the sampling policy q through their advantages."""
    batch = {k: jnp.asarray(v) for k, v in rows.items()} | {"old_logprobs": J(old), "advantages": J(q * adv_BT)}
    loss = lambda p: (lambda s, wt, _: s / wt)(*rollouts.rl_loss(cfg, Execution(), None, p, batch, chunk=8,
                                                                 tis_cap=tis_cap))
    g = jax.jit(jax.grad(loss))(params)
    return np.concatenate([np.ravel(g[k]) for k in sorted(g)]).astype(np.float64)

  on_policy = expected_grad(trainer, pi)  # the trainer samples its own tokens: ratio 1
  no_tis, naive = expected_grad(sampler, mu), expected_grad(trainer, mu)
  tis2, tis_inf = expected_grad(sampler, mu, tis_cap=2.0), expected_grad(sampler, mu, tis_cap=1e9)
  err = lambda g: float(np.linalg.norm(g - on_policy) / np.linalg.norm(on_policy))
  ratio = np.exp(trainer - sampler)[w > 0]
  assert np.mean((ratio < 0.8) | (ratio > 1.28)) > 0.2  # the stale sampler's ratios leave PPO's band
  assert np.mean(ratio > 2.0) > 0.01  # and some pass the cap
  assert err(tis_inf) < 1e-4, err(tis_inf)  # untruncated IS: exactly the on-policy gradient in expectation
  assert err(naive) > 0.1 and err(no_tis) > 0.1, (err(naive), err(no_tis))  # ignored or clipped: biased
  assert err(tis2) < 0.5 * err(no_tis), (err(tis2), err(no_tis))
  print(f"relative error to the on-policy gradient: naive {err(naive):.3g}, no TIS {err(no_tis):.3g}, "
        f"TIS cap 2 {err(tis2):.3g}, TIS uncapped {err(tis_inf):.2g}")
