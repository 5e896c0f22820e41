"""Packed RL updates equal padded ones: the same responses as one a row (`response_rows`) or packed first-fit into
rows of several (`packed_response_rows`) give the same loss, gradients and metric sums through the real train step
(gradient accumulation, a spill into extra micro-batches), for every aggregation, with and without the KL term and
TIS, with the head at every position or only at the response positions (`rl_loss(targets_per_row=K)`), with each
prompt packed once for its responses (`shared_prompt_rows`: the model's prefix_segment mask), on one device and on
8 simulated ones (batch split over 4, tensor over 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_with_devices

# (aggregation, beta, tis_cap, layout compared with today's padded update): "packed", or "packed_k"/"padded_k" with
# the head only at the response positions (rl_loss's targets_per_row: K_PACKED / MAX_LEN)
# "shared_k": packed with each prompt once for its responses (`shared_prompt_rows`), the head at K_SHARED positions
CASES = [("token-mean", 0.0, None, "shared_k"), ("seq-mean-token-mean", 0.0, None, "packed"),
         ("seq-mean-token-sum-norm", 0.0, None, "shared_k"), ("seq-mean-token-mean", 0.05, 2.0, "packed_k"),
         ("token-mean", 0.05, 2.0, "padded_k")]
MAX_LEN = 12  # the response budget: Dr. GRPO's constant
K_PACKED = 12
K_SHARED = 20


def responses(seed: int = 0):
  """4 prompts x 4 responses of varied lengths (one empty, one out of the loss), sampler log-probs around the
  tiny model's (so ratios land on both sides of the clip band), random advantages."""
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(3, 512, int(n))) for n in (3, 9, 5, 7)]
  lengths = rng.integers(1, MAX_LEN + 1, 16)
  lengths[5] = 0
  prompt_ids = [prompts[i // 4] for i in range(16)]
  resp = [list(rng.integers(3, 512, int(n))) for n in lengths]
  old = [list(rng.normal(-6.2, 0.4, int(n))) for n in lengths]
  adv = list(rng.normal(0.0, 1.0, 16))
  in_loss = [i != 10 for i in range(16)]  # e.g. a truncated response under reward.overlong = mask
  return prompt_ids, resp, old, adv, in_loss


def packed_vs_padded(rows_per_micro: int, micro_batches: int, cases: int = len(CASES)) -> dict:
  """Per case: the relative differences of loss, gradients and metric sums, packed vs padded; the pack info."""
  import functools

  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  from astro_jax.model import Execution, init_model, preset
  from astro_jax.sharding import Sharder, make_mesh
  from astro_jax.train import losses, rollouts
  from astro_jax.train import step as step_lib

  sharded = len(jax.devices()) > 1
  sharder = Sharder.create(make_mesh(1, 4, 2), "train") if sharded else None
  cfg, run = preset("tiny"), Execution()
  params, ref_params = init_model(cfg, seed=1).weights(), init_model(cfg, seed=2).weights()
  prompt_ids, resp, old, adv, in_loss = responses()

  padded = rollouts.response_rows(prompt_ids, resp, old, adv, seq_len=max(len(p) + len(r) for p, r in
                                                                          zip(prompt_ids, resp)))
  padded["weights"][~np.asarray(in_loss)] = 0.0
  pack = functools.partial(rollouts.packed_response_rows, prompt_ids, resp, old, adv, train_tokens=32,
                           rows_per_micro=rows_per_micro, micro_batches=micro_batches, in_loss=in_loss)
  (packed, info), (packed_k, info_k) = pack(), pack(targets_per_row=K_PACKED)
  shared, info_s = rollouts.shared_prompt_rows(prompt_ids, resp, old, adv, train_tokens=32,
                                               rows_per_micro=rows_per_micro, micro_batches=micro_batches,
                                               in_loss=in_loss, targets_per_row=K_SHARED)
  layouts = {"packed": (packed, rollouts.PACKED_BATCH_AXES, info["micro_batches"], None),
             "packed_k": (packed_k, rollouts.PACKED_BATCH_AXES, info_k["micro_batches"], K_PACKED),
             "shared_k": (shared, rollouts.rl_batch_axes(packed=True, shared=True), info_s["micro_batches"],
                          K_SHARED),
             "padded_k": (padded, rollouts.RL_BATCH_AXES, 2, MAX_LEN)}
  capture = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                         lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  if sharded:
    by_name = step_lib.param_shardings(cfg, sharder)
    state_sh = {"params": by_name, "opt_state": by_name, "step": NamedSharding(sharder.mesh, PartitionSpec())}
    params, ref_params = jax.device_put(params, by_name), jax.device_put(ref_params, by_name)
  ref_fn = jax.jit(lambda p, b: losses.sequence_logprobs(cfg, run, sharder, p, b, chunk=8)[0])

  def update(rows, axes, accum, aggregation, beta, tis_cap, targets_per_row=None):
    axes = {**axes, "ref_logprobs": ("batch", "seq")}
    put = (lambda k, v: jax.device_put(v, sharder.named(axes[k]))) if sharded else (lambda k, v: jnp.asarray(v))
    batch = {k: put(k, v) for k, v in rows.items()}
    batch["ref_logprobs"] = ref_fn(ref_params, batch)
    loss_fn = functools.partial(rollouts.rl_loss, cfg, run, sharder, chunk=8, aggregation=aggregation,
                                max_len=MAX_LEN, beta=beta, tis_cap=tis_cap, targets_per_row=targets_per_row)
    fn = step_lib.jit_train_step(loss_fn, capture, accum=accum, sharder=sharder,
                                 shardings=state_sh if sharded else None, batch_axes=axes)
    state, metrics = fn(step_lib.init_state(params, capture, state_sh if sharded else None), batch)
    return jax.device_get(metrics), jax.device_get(state["opt_state"])

  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))
  out = {"info": info, "info_k": info_k, "info_s": info_s, "cases": [],
         "row_targets": [float(r["weights"].sum(1).max()) for r in (packed, packed_k, shared)]}
  for aggregation, beta, tis_cap, layout in CASES[:cases]:
    m_pad, g_pad = update(padded, rollouts.RL_BATCH_AXES, 2, aggregation, beta, tis_cap)
    rows, axes, accum, k = layouts[layout]
    m_pack, g_pack = update(rows, axes, accum, aggregation, beta, tis_cap, targets_per_row=k)
    assert m_pack.pop("targets_dropped", 0.0) == 0.0
    grads = {k: rel(g_pack[k], g_pad[k]) for k in g_pad}
    flat = lambda g: np.concatenate([np.ravel(g[k]) for k in sorted(g)]).astype(np.float64)
    out["cases"].append({
        "case": [aggregation, beta, tis_cap, layout], "loss": rel(m_pack["loss"], m_pad["loss"]),
        "grad": rel(flat(g_pack), flat(g_pad)), "grad_worst_leaf": max(grads.values()),
        "grad_norm": float(np.linalg.norm(flat(g_pad))),
        "metrics": {k: rel(m_pack[k], m_pad[k]) for k in m_pad if k not in ("params_finite", "grad_norm")},
        "clipped": float(m_pad["clipped"]), "tis_capped": float(m_pad.get("tis_capped", 0.0)),
        "tokens": float(m_pad["tokens"])})
  return out


def check(got: dict, devices: int) -> None:
  info, info_k, info_s = got["info"], got["info_k"], got["info_s"]
  assert info["spilled"] >= 1 and info["sequences"] == 14 and info["fill"] > 0.5, info
  uncapped, capped, shared = got["row_targets"]
  assert uncapped > K_PACKED >= capped and info_k["rows"] >= info["rows"], got  # the targets cap binds
  # each group's prompt at most once a row (groups split over rows when they do not fit one): fewer tokens
  assert info_s["sequences"] == 14 and info_s["tokens"] < info["tokens"] - 3 * 4 and shared <= K_SHARED, got
  for case in got["cases"]:
    tis = case["case"][2]
    assert case["tokens"] > 50 and case["grad_norm"] > 1e-3, case  # a real loss: clipped (or TIS-capped) tokens
    assert case["tis_capped" if tis else "clipped"] > 0 and (case["clipped"] == 0 if tis else True), case
    assert case["loss"] <= 1e-6 and case["grad"] <= 1e-6, (devices, case)
    assert case["grad_worst_leaf"] <= 1e-5, (devices, case)
    assert max(case["metrics"].values()) <= 1e-5, (devices, case)


def test_packing_layout():
  from astro_jax.train import rollouts
  rows, info = rollouts.packed_response_rows([[1, 2, 3], [4, 5], [6]], [[7, 8], [9], [10, 11, 12]],
                                             [[-0.5, -1.5], [-2.0], [-1.0, -1.1, -1.2]], [0.25, -1.0, 2.0],
                                             train_tokens=8, rows_per_micro=1, micro_batches=1)
  assert info == {"micro_batches": 2, "spilled": 1, "rows": 2, "sequences": 3, "tokens": 12, "fill": 0.75}
  # longest first: [1 2 3 7 8] then [6 10 11 12] does not fit the 3 slots left: row 2; [4 5 9] fits row 1
  assert rows["tokens"].tolist() == [[1, 2, 3, 7, 8, 4, 5, 9], [6, 10, 11, 12, 0, 0, 0, 0]]
  assert rows["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
  assert rows["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
  assert rows["targets"].tolist() == [[2, 3, 7, 8, 0, 5, 9, 0], [10, 11, 12, 0, 0, 0, 0, 0]]
  assert rows["weights"].tolist() == [[0, 0, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
  np.testing.assert_array_equal(rows["old_logprobs"], np.float32([[0, 0, -0.5, -1.5, 0, 0, -2.0, 0],
                                                                  [-1.0, -1.1, -1.2, 0, 0, 0, 0, 0]]))
  np.testing.assert_array_equal(rows["advantages"], np.float32([[0, 0, 0.25, 0.25, 0, 0, -1.0, 0],
                                                                [2.0, 2.0, 2.0, 0, 0, 0, 0, 0]]))
  # the weights sum to the response tokens; out-of-loss and empty responses take no room
  rows, info = rollouts.packed_response_rows([[1, 2, 3], [4, 5], [6]], [[7, 8], [], [10, 11, 12]],
                                             [[-0.5, -1.5], [], [-1.0, -1.1, -1.2]], [0.25, -1.0, 2.0],
                                             train_tokens=8, rows_per_micro=2, micro_batches=1,
                                             in_loss=[False, True, True])
  assert info["sequences"] == 1 and info["spilled"] == 0 and rows["weights"].sum() == 3
  assert rows["tokens"].shape == (2, 8) and not rows["segment_ids"][1].any()
  with pytest.raises(ValueError, match="do not fit"):
    rollouts.packed_response_rows([[1, 2, 3]], [[7] * 6], [[0.0] * 6], [0.0], train_tokens=8, rows_per_micro=1)
  # a cap on the response tokens a row: [1 2 3 7 8] leaves no target room for [4 5 9], nor that row for [6 10 11]
  three = ([[1, 2, 3], [4, 5], [6]], [[7, 8], [9], [10, 11]], [[0.0] * 2, [0.0], [0.0] * 2], [0.0] * 3)
  for cap, want in ((None, 2), (2, 3)):
    rows, info = rollouts.packed_response_rows(*three, train_tokens=8, rows_per_micro=1, targets_per_row=cap)
    assert info["rows"] == want and rows["weights"].sum(1).max() <= (cap or 8)
  with pytest.raises(ValueError, match="targets_per_row"):
    rollouts.packed_response_rows(*three, train_tokens=8, rows_per_micro=1, targets_per_row=1)


def test_shared_prompt_layout():
  from astro_jax.train import rollouts
  rows, info = rollouts.shared_prompt_rows([[1, 2, 3], [1, 2, 3], [4, 5]], [[7, 8], [9], [10, 11, 12]],
                                           [[-0.5, -1.5], [-2.0], [-1.0, -1.1, -1.2]], [0.25, -1.0, 2.0],
                                           train_tokens=12, rows_per_micro=1, micro_batches=1)
  assert info == {"micro_batches": 1, "spilled": 0, "rows": 1, "sequences": 3, "tokens": 12, "fill": 1.0}
  # prompt [1 2 3] once (its last token starts each response), then [4 5] with its response: one row
  assert rows["tokens"].tolist() == [[1, 2, 3, 7, 8, 3, 9, 4, 5, 10, 11, 12]]
  assert rows["positions"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3, 4]]
  assert rows["segment_ids"].tolist() == [[1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 5, 5]]
  assert rows["prefix_segment"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 4, 4, 4, 4]]
  assert rows["targets"].tolist() == [[0, 0, 7, 8, 0, 9, 0, 0, 10, 11, 12, 0]]
  assert rows["weights"].tolist() == [[0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]]
  np.testing.assert_array_equal(rows["old_logprobs"], np.float32([[0, 0, -0.5, -1.5, 0, -2.0, 0, 0, -1.0, -1.1,
                                                                   -1.2, 0]]))
  np.testing.assert_array_equal(rows["advantages"], np.float32([[0, 0, 0.25, 0.25, 0, -1.0, 0, 0, 2, 2, 2, 0]]))
  # a group that does not fit one row (or its target cap) is cut into chunks, each with the prompt
  for room, cap, want in ((12, None, 1), (8, None, 2), (12, 2, 2)):
    rows, info = rollouts.shared_prompt_rows([[1, 2, 3]] * 3, [[7, 8], [9], [10]], [[0.0] * 2, [0.0], [0.0]],
                                             [0.0] * 3, train_tokens=room, rows_per_micro=1, targets_per_row=cap)
    assert info["rows"] == want and (rows["tokens"] == 1).sum() == want and rows["weights"].sum() == 4, rows
  with pytest.raises(ValueError, match="do not fit"):
    rollouts.shared_prompt_rows([[1, 2, 3]], [[7] * 6], [[0.0] * 6], [0.0], train_tokens=8, rows_per_micro=1)


def test_packed_equals_padded_one_device():
  check(packed_vs_padded(rows_per_micro=2, micro_batches=2), 1)


def test_packed_equals_padded_eight_devices():
  code = ("import json; from tests.test_rl_packing import packed_vs_padded; "
          "print(json.dumps(packed_vs_padded(rows_per_micro=4, micro_batches=1, cases=4)))")  # padded_k: 1 device
  check(json.loads(run_with_devices(code, n_devices=8).strip().splitlines()[-1]), 8)
