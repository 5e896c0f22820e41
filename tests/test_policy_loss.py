"""The RL loss against a direct NumPy implementation: advantages with and without std, the clipped ratio on both
sides, k3 KL, each aggregation, and gradient-accumulation splits (sums over micro-batches, divided once)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astro_jax.train import policy_loss as pl


def numpy_advantages(r: np.ndarray, scale_std: bool) -> np.ndarray:
  out = np.zeros_like(r, dtype=np.float64)
  for p in range(r.shape[0]):
    g = r[p].astype(np.float64)
    a = g - g.mean()
    out[p] = a / (g.std(ddof=1) + 1e-6) if scale_std else a
  return out


def numpy_loss(logp, old, adv, mask, eps_low, eps_high, aggregation, max_len, ref=None, beta=0.0) -> float:
  """Token by token, with explicit loops: the reference."""
  B, T = logp.shape
  per_seq_sums, per_seq_counts, total, count = [], [], 0.0, 0
  for b in range(B):
    s, n = 0.0, 0
    for t in range(T):
      if not mask[b, t]:
        continue
      rho = np.exp(logp[b, t] - old[b, t])
      loss = max(-adv[b] * rho, -adv[b] * min(max(rho, 1 - eps_low), 1 + eps_high))
      if ref is not None and beta:
        d = ref[b, t] - logp[b, t]
        loss += beta * (np.exp(d) - d - 1)
      s, n = s + loss, n + 1
    per_seq_sums.append(s)
    per_seq_counts.append(n)
    total, count = total + s, count + n
  if aggregation == "token-mean":
    return total / count
  seqs = [i for i in range(B) if per_seq_counts[i]]
  if aggregation == "seq-mean-token-mean":
    return float(np.mean([per_seq_sums[i] / per_seq_counts[i] for i in seqs]))
  return float(np.mean([per_seq_sums[i] / max_len for i in seqs]))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  B, T = 8, 12
  old = rng.normal(-2.0, 0.5, (B, T))
  logp = old + rng.normal(0.0, 0.4, (B, T))  # ratios from ~0.3 to ~3: both clip sides are hit
  mask = np.zeros((B, T), bool)
  for b, n in enumerate([12, 3, 7, 1, 0, 9, 5, 12]):  # one response has no tokens (masked out entirely)
    mask[b, :n] = True
  adv = rng.normal(0, 1, B)
  ref = old + rng.normal(0.0, 0.3, (B, T))
  return logp, old, adv, mask, ref


def test_group_advantages_match_numpy():
  r = np.array([[1, -1, -1, 1], [1, 1, 1, 1], [-1, -1, -1, 1], [0.5, 0.25, 0.0, 1.0]])
  for scale in (True, False):
    np.testing.assert_allclose(pl.group_advantages(jnp.asarray(r), scale_std=scale), numpy_advantages(r, scale),
                               rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(pl.group_advantages(jnp.asarray(r)))[1] == 0)  # equal rewards: no signal


@pytest.mark.parametrize("aggregation", pl.AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_matches_numpy_and_accumulation_splits(batch, aggregation, beta):
  logp, old, adv, mask, ref = batch
  kw = dict(eps_low=0.2, eps_high=0.28, aggregation=aggregation, max_len=12, beta=beta)
  want = numpy_loss(logp, old, adv, mask, 0.2, 0.28, aggregation, 12, ref, beta)
  j = lambda x: jnp.asarray(x, jnp.float32)
  s, w, extra = pl.policy_loss(j(logp), j(old), j(adv), jnp.asarray(mask), ref_logp_BT=j(ref), **kw)
  np.testing.assert_allclose(float(s / w), want, rtol=1e-5)
  for split in ([4, 4], [1, 2, 5], [3, 3, 2]):  # micro-batches: add the sums, divide once
    at, sums, weights = 0, 0.0, 0.0
    for n in split:
      rows = slice(at, at + n)
      a, b, _ = pl.policy_loss(j(logp[rows]), j(old[rows]), j(adv[rows]), jnp.asarray(mask[rows]),
                               ref_logp_BT=j(ref[rows]), **kw)
      sums, weights, at = sums + float(a), weights + float(b), at + n
    np.testing.assert_allclose(sums / weights, want, rtol=1e-5, err_msg=str(split))
  # clip fraction against NumPy
  rho = np.exp(logp - old)
  clipped = np.where(adv[:, None] > 0, rho > 1.28, rho < 0.8) & mask
  assert float(extra["clipped"]) == clipped.sum() and float(extra["tokens"]) == mask.sum()
  assert 0 < clipped.sum() < mask.sum()


def test_clipped_tokens_carry_no_gradient(batch):
  """d loss / d logp is -A·ρ / count where the ratio is inside its band (or clipping would not bind), 0 where clipped."""
  logp, old, adv, mask, _ = batch
  j = lambda x: jnp.asarray(x, jnp.float32)
  f = lambda lp: (lambda s, w, _: s / w)(*pl.policy_loss(lp, j(old), j(adv), jnp.asarray(mask)))
  grad = np.asarray(jax.grad(f)(j(logp)))
  rho = np.exp(logp - old)
  clipped = np.where(adv[:, None] > 0, rho > 1.28, rho < 0.8)
  want = np.where(mask & ~clipped, -adv[:, None] * rho / mask.sum(), 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage(batch):
  logp, _, adv, mask, _ = batch
  j = lambda x: jnp.asarray(x, jnp.float32)
  s, w, extra = pl.policy_loss(j(logp), j(logp), j(adv), jnp.asarray(mask), aggregation="seq-mean-token-mean")
  assert float(extra["ratio"]) == pytest.approx(mask.sum()) and float(extra["clipped"]) == 0
  has = mask.any(-1)
  np.testing.assert_allclose(float(s / w), -adv[has].mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="aggregation"):
    pl.policy_loss(j(logp), j(logp), j(adv), jnp.asarray(mask), aggregation="mean")
