"""The rl stage's update layouts wired end to end (config keys -> `rl.make_trainer` + `LearnerConfig.from_config` ->
`RLLearner.update` on a real tiny trainer): packed updates (`train_tokens`, `packed_rows`) move the weights as
padded ones do, spills included; TIS with several minibatches (`loss.tis_cap`) takes its proximal log-probs at
the step-start weights; the mismatch metrics read the sampler against the trainer; bad values are refused.
The loss-level equalities (every aggregation, 1 and 8 devices) are tests/test_rl_packing.py's and
tests/test_rl_mismatch.py's."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from astro_jax import stages
from astro_jax.errors import ConfigError
from astro_jax.rl.learner import LearnerConfig, Proximal
from tests.conftest import set_values
from tests.test_rl_learner import make_learner

IDS = ["mixed0", "mixed1", "mixed2"]


def rl_config(**values):
  """2 prompts x 2 responses a step, 2 minibatch updates; prompts of 2 tokens, responses of 3 (the script's)."""
  return set_values(stages.defaults("rl"), {
      "batch_prompts": 2, "group_size": 2, "minibatches": 2, "max_prompt_tokens": 4, "sampling.max_new_tokens": 4,
      "loss_chunk": 8, "steps": 3, "optimizer.lr": 1e-2, "async_checkpoint": False, "save_every": 1,
      "checkpoint": "x", "prompts": "x", "output_dir": "x", **values})


def trainer_and_config(**values):
  from astro_jax.model import preset
  from astro_jax.sharding import Sharder, make_mesh
  from astro_jax.stages import rl
  config = rl_config(**values)
  rl.check(config)
  sharder = Sharder.create(make_mesh(1, -1, 1, devices=jax.devices()[:1]), "train")
  trainer = rl.make_trainer(config, preset("tiny", vocab_size=64, n_layers=1), sharder)
  return trainer, LearnerConfig.from_config(config)


@pytest.fixture(scope="module")
def start_weights():
  from astro_jax.model import init_model, preset
  return init_model(preset("tiny", vocab_size=64, n_layers=1), seed=0).weights()


def host(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in jax.device_get(params).items()}


def assert_same_weights(a: dict, b: dict, rtol: float = 1e-5) -> None:
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_packed_updates_move_the_weights_as_padded_ones_and_count_spills(start_weights, share_prompts):
  padded, padded_lc = trainer_and_config()
  # 2 sequences of 5 tokens need 2 rows; shared, a group's 2 responses need 1 + 2 x 4 = 9 tokens: 2 rows too
  packed, packed_lc = trainer_and_config(train_tokens=8, packed_rows=1, share_prompts=share_prompts)
  targets = 8 - 4 // 2 if share_prompts else 4  # the row less half the prompt budget / a response budget a row
  assert (packed.batch_size, packed.seq_len, packed_lc.targets_per_row) == (1, 8, targets)
  assert packed_lc.shared_prompts == share_prompts and ("prefix_segment" in packed.batch_axes) == share_prompts
  sums = {}
  for name, trainer, lc in (("padded", padded, padded_lc), ("packed", packed, packed_lc)):
    trainer.load_params(start_weights)
    learner = make_learner(IDS, lc, trainer=trainer)
    batch = learner.collect(step=1)
    sums[name] = learner.update(batch)
    sums[name]["params"] = host(trainer.params)
  a, b = sums["padded"], sums["packed"]
  assert a["tokens"] == b["tokens"] == 12
  for key in ("loss", "grad_norm", "entropy", "logprob_gap_first", "mismatch_abs_first"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
  assert_same_weights(b["params"], a["params"])
  assert a["spilled_micro_batches"] == 0 and b["spilled_micro_batches"] == 2  # one extra micro-batch per update
  assert b["packed_fill"] == pytest.approx(10 / 16)  # 10 real tokens in 2 rows of 8
  assert set(packed.spill_step_fns) == {2}  # the spilled count compiled once, beside grad_accum's


def test_tis_with_minibatches_takes_the_step_start_log_probs(start_weights):
  """With the sampler's log-probs equal to the trainer's at the step-start weights, TIS (weights exp(prox - old)
  = 1) must update exactly as plain PPO does, on the second minibatch too: there PPO's ratio is against the
  sampler, and TIS's against the Proximal's step-start log-probs (the current weights' would give ratio 1)."""
  from astro_jax.train import losses
  plain, plain_lc = trainer_and_config()
  tis, tis_lc = trainer_and_config(**{"loss.tis_cap": 2.0})
  assert "prox_logprobs" in tis.batch_axes and tis_lc.tis
  results = {}
  for name, trainer, lc in (("plain", plain, plain_lc), ("tis", tis, tis_lc)):
    trainer.load_params(start_weights)
    proximal = Proximal(trainer, chunk=8, temperature=1.0) if lc.tis else None
    learner = make_learner(IDS, lc, trainer=trainer, proximal=proximal)
    batch = learner.collect(step=1)
    placed = trainer.put_rows(batch.rows)  # the sampler's log-probs := the start weights' own
    logp = jax.jit(lambda p, b: losses.sequence_logprobs(trainer.cfg, trainer.run, trainer.sharder, p, b,
                                                         chunk=8)[0])(trainer.params, placed)
    batch.rows["old_logprobs"] = np.asarray(logp) * batch.rows["weights"]
    results[name] = learner.update(batch)
    results[name]["params"] = host(trainer.params)
  a, b = results["plain"], results["tis"]
  assert b["tis_weight"] == pytest.approx(b["tokens"], rel=1e-5) and b["tis_capped"] == 0
  assert b["mismatch_abs_first"] / b["tokens_first"] < 1e-5  # the sampler is the trainer here
  np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
  assert_same_weights(b["params"], a["params"])


def test_the_scripted_sampler_shows_as_mismatch(start_weights):
  trainer, lc = trainer_and_config()
  trainer.load_params(start_weights)
  learner = make_learner(IDS, lc, trainer=trainer)  # log-prob -0.5 for every sampled token: not the model's
  row = learner.step(1)
  assert row["mismatch_logprob_mean"] == pytest.approx(row["logprob_gap"]) and row["mismatch_logprob_mean"] > 0.1
  assert row["mismatch_logprob_max"] >= row["mismatch_logprob_mean"] and row["mismatch_kl_k3"] > 0
  assert 0 <= row["mismatch_ratio_out_fraction"] <= 1
  assert row["spilled_micro_batches"] == 0 and 0 < row["packed_fill"] <= 1 and "tis_weight_mean" not in row


@pytest.mark.parametrize("values, message", [
    ({"train_tokens": 7}, r"^config key 'train_tokens' = 7: must be 0 \(padded rows\) or >= max_prompt_tokens \+ "
                          r"sampling.max_new_tokens = 8"),
    ({"packed_rows": -1}, r"^config key 'packed_rows' = -1: must be >= 0"),
    ({"loss.tis_cap": 0.5}, r"^config key 'loss.tis_cap' = 0.5: must be 0 \(off\) or a finite number >= 1"),
])
def test_bad_layout_values_are_refused(values, message):
  from astro_jax.stages import rl
  with pytest.raises(ConfigError, match=message):
    rl.check(rl_config(**values))
