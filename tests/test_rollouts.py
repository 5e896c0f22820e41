"""RL batches from sampled responses: the trainer's log-probs of the sampler's own tokens equal the sampler's
(importance ratio 1 on the first update), on one device and on 8 simulated ones with the two rule sets."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from tests.conftest import run_with_devices

ON_POLICY = textwrap.dedent("""
  import json, sys, jax, jax.numpy as jnp, numpy as np
  from astro_jax import assets
  from astro_jax.model import Execution, init_model, preset
  from astro_jax.sampler import Sampler, SamplingParams
  from astro_jax.sharding import Sharder, make_mesh
  from astro_jax.tokenizer import Tokenizer
  from astro_jax.train import losses, optim, rollouts, step as step_lib
  sharded = len(jax.devices()) > 1
  cfg = preset("tiny")
  model = init_model(cfg, seed=3)
  model.embed[...] = model.embed[...] * 3.0  # peaked logits: varied, confident samples
  mesh = make_mesh(1, 4, 2) if sharded else None
  sample_rules = Sharder.create(mesh, "sample") if sharded else None
  train_rules = Sharder.create(mesh, "train") if sharded else None
  sampler = Sampler(model, Tokenizer.load(assets.smollm2_hf_dir()), sharder=sample_rules, max_batch=16)
  prompts = [[1, 5, 9, 11], [1, 7, 3], [1, 40, 41, 42, 43]]
  T = 0.8
  outs = sampler.generate(prompts, SamplingParams(temperature=T, max_new_tokens=10, n=4, ignore_eos=True))
  rows = rollouts.response_rows([p for p in prompts for _ in range(4)], [c.token_ids for o in outs for c in o],
                                [c.logprobs for o in outs for c in o], np.linspace(-1, 1, 12), seq_len=16)
  run = Execution()
  params = model.weights()
  put = (lambda k, v: jnp.asarray(v)) if not sharded else (
      lambda k, v: jax.device_put(v, train_rules.named(rollouts.RL_BATCH_AXES[k])))
  batch = {k: put(k, v) for k, v in rows.items()}
  logp, _ = jax.jit(lambda p, b: losses.sequence_logprobs(cfg, run, train_rules, p, b, chunk=4, temperature=T))(
      params, batch)
  mask = rows["weights"] > 0
  gap = np.abs(np.asarray(logp) - rows["old_logprobs"])[mask]
  loss_fn = lambda p, b: rollouts.rl_loss(cfg, run, train_rules, p, b, chunk=4, temperature=T)
  tx = optim.adamw(optim.learning_rate(1e-3, 4, 0, "constant"), params)
  shardings = step_lib.state_shardings(tx, cfg, params, train_rules) if sharded else None
  state = step_lib.init_state(params, tx, shardings)
  fn = step_lib.jit_train_step(loss_fn, tx, accum=2, sharder=train_rules, shardings=shardings,
                               batch_axes=rollouts.RL_BATCH_AXES)
  state, m = fn(state, batch)
  m = jax.device_get(m)
  print(json.dumps({"max_gap": float(gap.max()), "tokens": int(mask.sum()), "ratio": float(m["ratio"] / m["tokens"]),
                    "clipped": float(m["clipped"]), "gap": float(m["logprob_gap"] / m["tokens"]),
                    "entropy": float(m["entropy"] / m["tokens"]), "loss": float(m["loss"])}))
""")


@pytest.mark.parametrize("devices", [1, 8])
def test_trainer_scores_the_samplers_tokens_as_the_sampler_did(devices):
  got = json.loads(run_with_devices(ON_POLICY, n_devices=devices).strip().splitlines()[-1])
  assert got["tokens"] == 12 * 10
  assert got["max_gap"] < 1e-4, got
  assert abs(got["ratio"] - 1.0) < 1e-5 and got["clipped"] == 0 and abs(got["gap"]) < 1e-5, got
  assert got["entropy"] > 0.1 and np.isfinite(got["loss"])


def test_response_rows_layout():
  from astro_jax.train.rollouts import response_rows
  rows = response_rows([[1, 2, 3]], [[7, 8]], [[-0.5, -1.5]], [0.25], seq_len=6)
  assert rows["tokens"].tolist() == [[1, 2, 3, 7, 8, 0]]
  assert rows["targets"].tolist() == [[2, 3, 7, 8, 0, 0]]
  assert rows["weights"].tolist() == [[0, 0, 1, 1, 0, 0]]  # positions 2 and 3 predict the response tokens 7, 8
  assert rows["old_logprobs"].tolist() == [[0, 0, -0.5, -1.5, 0, 0]]
  assert rows["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0]] and rows["advantages"].tolist() == [0.25]
  with pytest.raises(ValueError, match="do not fit"):
    response_rows([[1, 2, 3]], [[7, 8, 9, 10]], [[0.0] * 4], [0.0], seq_len=6)
