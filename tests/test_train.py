"""The training pieces against independent references: packed vs one-by-one, chunked vs full logits, NumPy token
means under accumulation, the schedule and decay mask by hand, XLA's memory analysis, memorisation, and the
sharded step against the single-device step."""
from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astro_jax.model import Execution, init_model, preset
from astro_jax.model.llama import forward
from astro_jax.train import losses, optim
from astro_jax.train import step as step_lib
from tests.conftest import run_with_devices

CFG = preset("tiny_llama31")
RUN = Execution()


@pytest.fixture(scope="module")
def params():
  return init_model(CFG, seed=3).weights()


def random_examples(n: int, seed: int = 0, lo: int = 5, hi: int = 20) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(3, CFG.vocab_size, rng.integers(lo, hi)).astype(np.int32) for _ in range(n)]


def packed_row(examples: list[np.ndarray], T: int) -> dict[str, np.ndarray]:
  """One row holding `examples` back to back (built here, independently of train.data.pack)."""
  row = {k: np.zeros(T, np.int32) for k in ("tokens", "positions", "segment_ids", "targets")}
  row["weights"] = np.zeros(T, np.float32)
  at = 0
  for s, ex in enumerate(examples, start=1):
    n = len(ex)
    row["tokens"][at:at + n], row["positions"][at:at + n], row["segment_ids"][at:at + n] = ex, np.arange(n), s
    row["targets"][at:at + n - 1], row["weights"][at:at + n - 1] = ex[1:], 1.0
    at += n
  assert at <= T
  return row


def stack(rows: list[dict]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def logits_of(params, batch):
  return forward(CFG, None, params, batch["tokens"], batch["positions"], segment_ids_BT=batch["segment_ids"])[0]


def test_packed_row_equals_examples_one_by_one(params):
  """Per-example losses and gradients of a packed row equal those of each example alone (unpacked, unpadded)."""
  examples = random_examples(3, seed=1)
  T = sum(map(len, examples)) + 5
  packed = stack([packed_row(examples, T)])
  logits = np.asarray(logits_of(params, packed))[0]
  at = 0
  for ex in examples:
    alone = stack([packed_row([ex], len(ex))])
    np.testing.assert_allclose(logits[at:at + len(ex)], np.asarray(logits_of(params, alone))[0], atol=2e-5, rtol=0)
    at += len(ex)

  def loss_of_segment(p, batch, s):  # the token-sum loss of segment s only
    masked = dict(batch, weights=batch["weights"] * (batch["segment_ids"] == s))
    return losses.nll_loss(CFG, RUN, None, p, masked, chunk=8)[0]
  for s, ex in enumerate(examples, start=1):
    g_packed = jax.grad(loss_of_segment)(params, packed, s)
    g_alone = jax.grad(loss_of_segment)(params, stack([packed_row([ex], len(ex))]), 1)
    for name in g_packed:
      scale = float(jnp.abs(g_alone[name]).max()) + 1e-12
      np.testing.assert_allclose(g_packed[name], g_alone[name], atol=2e-5 * scale, rtol=0, err_msg=name)


def test_segments_never_see_each_other(params):
  """Changing one segment's tokens moves its own logits only."""
  examples = random_examples(3, seed=2)
  T = sum(map(len, examples))
  base = packed_row(examples, T)
  changed = [examples[0], np.roll(examples[1], 1) + 1, examples[2]]
  other = packed_row(changed, T)
  a, b = np.asarray(logits_of(params, stack([base])))[0], np.asarray(logits_of(params, stack([other])))[0]
  seg = base["segment_ids"]
  np.testing.assert_array_equal(a[seg != 2], b[seg != 2])
  assert np.abs(a[seg == 2] - b[seg == 2]).max() > 1e-3


@pytest.mark.parametrize("chunk", [3, 16, 64])
def test_chunked_loss_equals_full_logits_loss(params, chunk):
  batch = stack([packed_row(random_examples(2, seed=s), 40) for s in (3, 4)])
  ours = lambda p: losses.nll_loss(CFG, RUN, None, p, batch, chunk=chunk)[0]
  full = lambda p: losses.full_logits_nll(CFG, RUN, p, batch)[0]
  np.testing.assert_allclose(float(ours(params)), float(full(params)), rtol=1e-6)
  g_ours, g_full = jax.grad(ours)(params), jax.grad(full)(params)
  for name in g_full:
    scale = float(jnp.abs(g_full[name]).max())
    np.testing.assert_allclose(g_ours[name], g_full[name], atol=1e-5 * scale, rtol=0, err_msg=name)
  # and against NumPy: log-softmax of the float64 logits at the targets
  logits = np.asarray(losses.forward(CFG, None, params, batch["tokens"], batch["positions"],
                                     segment_ids_BT=batch["segment_ids"])[0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1,
                                                                                                           keepdims=True)
  picked = np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(ours(params)), -(picked * np.asarray(batch["weights"])).sum(), rtol=1e-5)


def test_chunked_loss_never_holds_the_whole_logits():
  """XLA's memory analysis of the loss's gradient (w.r.t. the hidden states and the head): chunked, the
  temporaries stay far below the [B, T, V] float32 logits that the plain loss holds."""
  cfg = preset("tiny", vocab_size=32768)
  B, T, D = 2, 1024, cfg.d_model
  p = jax.eval_shape(lambda: init_model(cfg).weights())
  hidden = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
  targets = jax.ShapeDtypeStruct((B, T), jnp.int32)
  logits_bytes = B * T * cfg.vocab_size * 4

  def chunked(p, h, y):
    return -jnp.sum(losses.target_logprobs(cfg, p, h, y, dt=jnp.float32, chunk=64)[0])

  def full(p, h, y):
    logits = losses.head_logits(cfg, p, h, jnp.float32)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))

  def temp_bytes(loss):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(p, hidden, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  got_chunked, got_full = temp_bytes(chunked), temp_bytes(full)
  print(f"temporaries: chunked {got_chunked / 2**20:.1f} MiB, full {got_full / 2**20:.1f} MiB, logits "
        f"{logits_bytes / 2**20:.1f} MiB")
  assert got_full >= logits_bytes  # the reference does hold them
  assert got_chunked < logits_bytes / 4


def test_accumulation_is_an_exact_token_mean(params):
  """Micro-batches with very different token counts: the step's loss is the NumPy mean over ALL target tokens
  (not a mean of micro-batch means), and its update equals the one-micro-batch update."""
  rows = [packed_row(random_examples(1, seed=10 + i, lo=4 if i % 2 else 30, hi=6 if i % 2 else 36), 40)
          for i in range(4)]
  batch = stack(rows)
  loss_fn = lambda p, b: losses.nll_loss(CFG, RUN, None, p, b, chunk=16)
  tx = optim.adamw(optim.learning_rate(1e-3, 10, 0, "constant"), params, weight_decay=0.1)
  results = {}
  for accum in (1, 2, 4):
    state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx)
    state, m = step_lib.jit_train_step(loss_fn, tx, accum=accum)(state, batch)
    results[accum] = (float(m["loss"]), float(m["weight"]), state["params"])
  logits = np.asarray(logits_of(params, batch), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = lse - np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  w = np.asarray(batch["weights"])
  want = (nll * w).sum() / w.sum()
  per_row_means = [(nll[i] * w[i]).sum() / w[i].sum() for i in range(4)]
  assert abs(np.mean(per_row_means) - want) > 1e-3  # a mean of means would be visibly different
  for accum, (loss, weight, new_params) in results.items():
    assert weight == w.sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=f"accum={accum}")
    for name in new_params:
      # Adam's first step is ~lr * sign(g): a near-zero gradient's last bits can move a weight by a few 1e-6
      np.testing.assert_allclose(new_params[name], results[1][2][name], atol=2e-5, rtol=0, err_msg=name)


def test_schedule_and_decay_mask_by_hand(params):
  f = optim.learning_rate(2.0, total_steps=10, warmup_steps=4, decay="cosine", final_fraction=0.25)
  for s in range(1, 11):  # the rate of step s (optax's count is s - 1)
    want = 2.0 * s / 4 if s <= 4 else 2.0 * (0.25 + 0.75 * 0.5 * (1 + np.cos(np.pi * (s - 5) / 5)))
    assert abs(float(f(s - 1)) - want) < 1e-6, s
  lin = optim.learning_rate(1.0, 5, 0, "linear", 0.0)
  assert [round(float(lin(c)), 6) for c in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
  mask = optim.decay_mask(params)
  assert not any(mask[n] for n in ("embed", "lm_head", "attn_norm", "mlp_norm", "final_norm"))
  assert all(mask[n] for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
  # one AdamW step with weight decay moves a zero-gradient matmul weight by -lr*wd*w and leaves the norms alone
  tx = optim.adamw(optim.learning_rate(0.1, 10, 0, "constant"), params, weight_decay=0.5, clip_norm=0)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  np.testing.assert_allclose(updates["wq"], -0.1 * 0.5 * params["wq"], rtol=1e-6)
  assert float(jnp.abs(updates["attn_norm"]).max()) == 0.0 and float(jnp.abs(updates["embed"]).max()) == 0.0


def test_tiny_model_memorises_four_examples():
  """The tiny model memorises 4 examples (loss < 0.05) within 150 steps."""
  cfg = preset("tiny")
  p = init_model(cfg, seed=0).weights()
  rows = [packed_row(random_examples(1, seed=20 + i, lo=12, hi=16), 16) for i in range(4)]
  for r in rows:
    r["tokens"] = np.minimum(r["tokens"], cfg.vocab_size - 1)
    r["targets"] = np.minimum(r["targets"], cfg.vocab_size - 1)
  batch = stack(rows)
  tx = optim.adamw(optim.learning_rate(1e-2, 150, 10, "cosine", 0.1), p)
  state = step_lib.init_state(p, tx)
  step = step_lib.jit_train_step(lambda q, b: losses.nll_loss(cfg, RUN, None, q, b, chunk=16), tx)
  history = []
  for _ in range(150):
    state, m = step(state, batch)
    history.append(float(m["loss"]))
    assert bool(m["params_finite"])
    if history[-1] < 0.05:
      break
  print(f"memorised in {len(history)} steps: {history[0]:.3f} -> {history[-1]:.4f}")
  assert history[0] > 5.0 and history[-1] < 0.05


def test_sharded_step_equals_single_device_step():
  """Three steps on 8 simulated devices (fsdp 4 x tensor 2, train rules, donated sharded state) equal the
  single-device steps; optimizer moments are sharded like their params."""
  out = run_with_devices(textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from astro_jax.model import Execution, init_model, preset
    from astro_jax.sharding import Sharder, make_mesh
    from astro_jax.train import losses, optim, step as step_lib
    cfg = preset("tiny_llama31")
    run = Execution(remat="full")
    params = init_model(cfg, seed=1).weights()
    rng = np.random.default_rng(0)
    tok = rng.integers(3, cfg.vocab_size, (8, 32)).astype(np.int32)
    seg = np.ones_like(tok); seg[:, 20:] = 2
    batch = dict(tokens=tok, positions=np.where(seg == 2, np.arange(32) - 20, np.arange(32)).astype(np.int32),
                 segment_ids=seg, targets=np.roll(tok, -1, 1), weights=(np.roll(seg, -1, 1) == seg).astype(np.float32))
    tx = optim.adamw(optim.learning_rate(1e-2, 10, 2), params, weight_decay=0.1)
    def losses_of(sharder):
      shardings = None if sharder is None else step_lib.state_shardings(tx, cfg, params, sharder)
      state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx, shardings)
      fn = step_lib.jit_train_step(lambda p, b: losses.nll_loss(cfg, run, sharder, p, b, chunk=8), tx, accum=2,
                                   sharder=sharder, shardings=shardings)
      b = {k: jnp.asarray(v) if sharder is None else jax.device_put(v, step_lib.batch_sharding(sharder))
           for k, v in batch.items()}
      out = []
      for _ in range(3):
        state, m = fn(state, b)
        out.append([float(m["loss"]), float(m["grad_norm"])])
      return out, state
    single, s1 = losses_of(None)
    sharder = Sharder.create(make_mesh(1, 4, 2), "train")
    sharded, s8 = losses_of(sharder)
    mu = s8["opt_state"][1][0].mu
    print(json.dumps({"single": single, "sharded": sharded,
                      "wq_spec": str(s8["params"]["wq"].sharding.spec), "mu_spec": str(mu["wq"].sharding.spec),
                      "max_param_diff": max(float(jnp.abs(s1["params"][k] - s8["params"][k]).max()) for k in s1["params"])}))
  """), n_devices=8)
  import json
  got = json.loads(out.strip().splitlines()[-1])
  np.testing.assert_allclose(got["sharded"], got["single"], rtol=2e-5)
  assert got["mu_spec"] == got["wq_spec"] and "fsdp" in got["wq_spec"] and "tensor" in got["wq_spec"]
  assert got["max_param_diff"] < 1e-4  # after three Adam steps of ~1e-2 each


def test_blocked_attention_equals_whole_attention(params):
  """Queries in blocks (each rematerialised): the same logits and gradients as all queries at once."""
  batch = stack([packed_row(random_examples(2, seed=s), 32) for s in (5, 6)])
  def loss(p, run):
    return losses.nll_loss(CFG, run, None, p, batch, chunk=16)[0]
  whole, g_whole = jax.value_and_grad(loss)(params, RUN)
  for block in (8, 16):
    blocked, g_blocked = jax.value_and_grad(loss)(params, Execution(attention_block=block, remat="full"))
    np.testing.assert_allclose(float(blocked), float(whole), rtol=1e-6)
    for name in g_whole:
      scale = float(jnp.abs(g_whole[name]).max())
      np.testing.assert_allclose(g_blocked[name], g_whole[name], atol=1e-5 * scale, rtol=0, err_msg=name)
