"""The `rl` stage on the toy task (tools/make_toy_task.py: one-token answers to one-digit sums, a tiny random model):

- it learns: accuracy rises from ~1/32 to a clearly higher value within 24 steps for two seeds, and does not when
  the rewards are shuffled across responses (the control);
- one device, 8 simulated devices, and two processes x 4 devices (jax.distributed, gloo) give the same run; a run
  SIGKILLed between checkpoints and resumed gives the uninterrupted run's metrics and weights bit for bit;
- after the first step (and the first eval) no program is compiled again: the sampler takes the trainer's weights
  each step with the same program, and dynamic sampling keeps every shape fixed;
- rewards, advantages, the overlong mask and the padded rows of a short batch, against hand computations;
- a broken model stops the run with one line: NaN sampled log-probs or non-finite weights at once, steps that
  keep no group after max_empty_steps; nothing of the broken state is saved or exported.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from astro_jax.errors import ConfigError, UserError
from astro_jax.train import metrics as metrics_lib
from tests.conftest import REPO, set_values
from tests.test_sft_real import free_port
from tests.test_sft_stage import finalized, in_progress

sys.path.insert(0, os.path.join(REPO, "tools"))
import make_toy_task  # noqa: E402

# Fields that are the same in every run of the same settings (times and compile counts are not).
SAMPLED = ("reward_mean", "accuracy", "zero_signal_fraction", "truncation_rate", "response_length_mean",
           "response_length_max", "groups", "sampling_rounds", "tokens_trained", "finished_row_fraction")
TRAINED = ("loss", "grad_norm", "entropy", "kl", "clip_fraction", "logprob_gap", "lr")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  return make_toy_task.make(tmp_path_factory.mktemp("toy"))


def rl_config(toy, out: Path, **values):
  from astro_jax import main
  model_dir, prompts = toy
  config = main.load_config_file(f"{REPO}/configs/rl_tiny.py")
  config.unlock()
  return set_values(config, {"checkpoint": str(model_dir), "prompts": str(prompts), "output_dir": str(out),
                             **values})


def rows(out: Path) -> list[dict]:
  return metrics_lib.read_rows(out / "metrics.jsonl")


def accuracy(out: Path) -> list[float]:
  return [r["accuracy"] for r in rows(out)]


# --- learning --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """One persistent compilation cache for the in-process runs: the later runs load the first one's programs."""
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.mark.parametrize("seed", [0, 1])
def test_reward_rises_and_the_shuffled_control_does_not(toy, tmp_path, seed, compile_cache):
  from astro_jax.stages import rl
  steps = 24
  common = {"sampling.seed": seed, "save_every": 100, "compile_cache_dir": compile_cache}
  rl.run(rl_config(toy, tmp_path / "rl", steps=steps, seed=seed, **common))
  acc = accuracy(tmp_path / "rl")
  assert len(acc) == steps
  start, end = np.mean(acc[:3]), np.mean(acc[-6:])
  assert start < 0.07, acc  # ~1/32: the random model
  assert end > 0.11 and end > 2.5 * start, acc
  reward = [r["reward_mean"] for r in rows(tmp_path / "rl")]
  assert np.mean(reward[-6:]) > np.mean(reward[:3]) + 0.15, reward
  assert (tmp_path / "rl" / "rl.png").stat().st_size > 10_000

  rl.run(rl_config(toy, tmp_path / "control", steps=steps, seed=seed, **common, **{"reward.shuffle": True}))
  control = accuracy(tmp_path / "control")
  assert np.mean(control[-6:]) < 0.07 and np.mean(control[-6:]) < start + 0.03, control


def test_kl_to_the_reference_with_accumulation(toy, tmp_path, compile_cache):
  """beta > 0 holds the start model as a reference: k3 KL 0 at the first update (the policy is the start model),
  then > 0; two micro-batches per update, GRPO's aggregation without std scaling."""
  from astro_jax.stages import rl
  rl.run(rl_config(toy, tmp_path / "kl", steps=3, grad_accum=2, compile_cache_dir=compile_cache,
                   **{"loss.beta": 0.5, "loss.aggregation": "seq-mean-token-mean", "loss.scale_std": False}))
  got = rows(tmp_path / "kl")
  assert got[0]["kl"] < 1e-6 and all(r["kl"] > 1e-4 for r in got[1:]), [r["kl"] for r in got]
  assert all(r["logprob_gap"] < 1e-5 and np.isfinite(r["loss"]) for r in got)


# --- the same run on other meshes, other processes, and across a kill ------------------------------------------

def cli(toy, out: Path, *extra: str) -> list[str]:
  model_dir, prompts = toy
  return [sys.executable, "-m", "astro_jax.main", f"--config={REPO}/configs/rl_tiny.py",
          f"--config.checkpoint={model_dir}", f"--config.prompts={prompts}", f"--config.output_dir={out}",
          "--config.steps=8", "--config.save_every=2", "--config.export_hf=true", "--config.eval.every=4",
          f"--config.eval.benchmarks={prompts}", "--config.eval.limit=6", "--config.eval.samples=2",
          "--config.minibatches=2", *extra]


def past_a_checkpoint(out: Path) -> bool:
  """Kill here: checkpoint 4 complete, step 5's row written, no save under way."""
  steps = [r["step"] for r in rows(out)]
  return bool(steps) and max(steps) >= 5 and max(finalized(out), default=0) >= 4 and not in_progress(out)


@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
  """{name: run directory}: one device (the reference), 8 devices, two processes x 4 devices, and a run killed
  after checkpoint 4 then resumed. Launched together so the compiles overlap."""
  root = tmp_path_factory.mktemp("rl_runs")
  port = free_port()
  env = lambda n: dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
  jobs = {"one": (cli(toy, root / "one"), 1), "eight": (cli(toy, root / "eight"), 8)}
  for i in range(2):
    jobs[f"two_{i}"] = (cli(toy, root / "two", "--config.distributed.enabled=true",
                            "--config.distributed.num_processes=2",
                            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                            f"--config.distributed.process_id={i}"), 4)
  procs = {name: subprocess.Popen(args, cwd=REPO, env=env(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for name, (args, n) in jobs.items()}
  killed = root / "killed"
  for attempt in range(3):  # a real SIGKILL once checkpoint 4 is written and step 5 done
    proc = subprocess.Popen(cli(toy, killed, *(["--config.overwrite=true"] if attempt else [])), cwd=REPO,
                            env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not past_a_checkpoint(killed):
      time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == -signal.SIGKILL and max(r["step"] for r in rows(killed)) < 8:
      break
  else:
    pytest.fail("the kill missed its moment 3 times")
  killed_at = max(r["step"] for r in rows(killed))
  resumed = subprocess.run(cli(toy, killed, "--config.resume=true"), cwd=REPO, env=env(1), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert "resumed from step" in resumed.stdout, resumed.stdout
  for name, p in procs.items():
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{err[-4000:]}"
  return {"one": root / "one", "eight": root / "eight", "two": root / "two", "killed": killed,
          "killed_at": killed_at}


def assert_same_rows(got: list[dict], want: list[dict], what: str, rtol: float) -> None:
  assert [r["step"] for r in got] == [r["step"] for r in want], what
  for a, b in zip(got, want):
    for key in SAMPLED + tuple(k for k in b if k.startswith("eval_")):
      assert a[key] == b[key], f"{what}: step {b['step']} {key}: {a[key]} vs {b[key]}"
    for key in TRAINED:
      # logprob_gap is float32 rounding (~1e-7): compared at that scale, not relatively.
      tiny = 1e-6 if key == "logprob_gap" else 1e-7
      assert a[key] == pytest.approx(b[key], rel=rtol, abs=tiny), f"{what}: step {b['step']} {key}"


def hf_weights(out: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(str(out / "hf" / "model.safetensors"))


def test_a_run_writes_its_outputs_and_compiles_only_at_first(runs):
  one = runs["one"]
  got = rows(one)
  assert [r["step"] for r in got] == list(range(1, 9))
  required = {"step", "reward_mean", "accuracy", "zero_signal_fraction", "truncation_rate", "response_length_mean",
              "response_length_max", "backtracks_per_response", "reflections_per_response", "entropy", "kl",
              "clip_fraction", "grad_norm", "logprob_gap", "tokens_per_s", "time_sampling", "time_scoring",
              "time_training"}
  assert all(required <= set(r) for r in got)
  assert all("eval_pass@1" in r and "eval_maj@2" in r for r in got if r["step"] % 4 == 0)
  assert sorted(p.name for p in (one / "eval").iterdir()) == ["step_4_prompts.json", "step_8_prompts.json"]
  # The sampler is on policy: the first update of each step scores the sampler's own tokens as the sampler did.
  assert all(r["logprob_gap"] < 1e-5 for r in got)
  assert all(0 < r["groups"] <= 16 and 1 <= r["sampling_rounds"] <= 3 for r in got)
  # Programs: the first step compiles them all, the first eval its own; later steps compile nothing.
  compiles = {r["step"]: r["compiles"] for r in got}
  assert compiles[1] > 0 and compiles[4] > 0, compiles
  assert all(n == 0 for s, n in compiles.items() if s not in (1, 4)), compiles
  assert finalized(one) == [4, 6, 8] and not in_progress(one)  # saved at 2, 4, 6, 8; the newest 3 kept
  assert (one / "rl.png").exists() and (one / "hf" / "config.json").exists()
  assert len(list((one / "tensorboard").iterdir())) == 1


def test_eight_devices_and_two_processes_train_like_one_device(runs):
  reference = rows(runs["one"])
  assert_same_rows(rows(runs["eight"]), reference, "8 devices vs 1", rtol=1e-4)
  assert_same_rows(rows(runs["two"]), reference, "2 processes vs 1 device", rtol=1e-4)
  assert_same_rows(rows(runs["two"]), rows(runs["eight"]), "2 processes x 4 vs 8 devices", rtol=1e-5)
  want = hf_weights(runs["one"])
  for name in ("eight", "two"):
    got = hf_weights(runs[name])
    for key in want:
      # 16 Adam steps of lr 3e-3: a near-zero gradient's update direction can flip on the last bits; 1e-4 is 3% of
      # one step
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4, err_msg=f"{name}: {key}")


def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(runs):
  killed, one = runs["killed"], runs["one"]
  assert 5 <= runs["killed_at"] < 8
  got, want = rows(killed), rows(one)
  assert [r["step"] for r in got] == list(range(1, 9))
  assert_same_rows(got, want, "resumed vs uninterrupted", rtol=0.0)
  a, b = hf_weights(killed), hf_weights(one)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- the pieces, by hand ---------------------------------------------------------------------------------------

Completion = namedtuple("Completion", "token_ids logprobs finish_reason text")
Problem = namedtuple("Problem", "id problem answer")


def test_rewards_with_the_overlong_penalty():
  from astro_jax.train.rollouts import rewards
  correct, lengths = np.array([1, 0, 1, 1]), np.array([10, 95, 97, 100])
  np.testing.assert_allclose(rewards(correct, lengths, max_new_tokens=100), [1, -1, 1, 1])
  # Budget 100, buffer 10: responses past 90 tokens lose (L - 90) / 10 of the penalty 0.5.
  got = rewards(correct, lengths, max_new_tokens=100, overlong="penalty", buffer=10, penalty=0.5)
  np.testing.assert_allclose(got, [1, -1 - 0.25, 1 - 0.35, 1 - 0.5], rtol=1e-6)


def test_batch_rows_advantages_mask_and_padding():
  from astro_jax.rl.learner import Group, batch_rows
  g1 = Group(Problem("a", "", ""), 0, [Completion([5, 6], [-0.1, -0.2], "eos", ""),
                                       Completion([7, 8, 9], [-1.0, -2.0, -3.0], "length", "")],
             np.array([True, False]), np.array([1.0, -1.0], np.float32))
  rows = batch_rows([g1], {"a": [1, 2, 3]}, n_rows=4, seq_len=8, scale_std=True, mask_truncated=True, pad_id=0)
  # Group mean 0, std sqrt(2) (unbiased): advantages +-1/sqrt(2)
  np.testing.assert_allclose(rows["advantages"], [2 ** -0.5, -(2 ** -0.5), 0, 0], rtol=1e-5)
  assert rows["weights"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
  assert rows["weights"][1:].sum() == 0  # the truncated response is masked; the two padding rows weigh nothing
  assert rows["tokens"][1].tolist() == [1, 2, 3, 7, 8, 9, 0, 0]
  np.testing.assert_allclose(rows["old_logprobs"][1][2:5], [-1, -2, -3])
  unscaled = batch_rows([g1], {"a": [1, 2, 3]}, n_rows=2, seq_len=8, scale_std=False)
  np.testing.assert_allclose(unscaled["advantages"], [1, -1])
  assert unscaled["weights"][1].sum() == 3
  with pytest.raises(ValueError, match="3 tokens but 2 log-probs"):
    bad = Group(Problem("a", "", ""), 0, [Completion([7, 8, 9], [-1.0, -2.0], "eos", "")] * 2,
                np.array([True, False]), np.array([1.0, -1.0]))
    batch_rows([bad], {"a": [1]}, n_rows=2, seq_len=8)


def test_no_signal_is_decided_on_correctness_not_on_the_overlong_penalty():
  """Four wrong answers whose lengths differ inside the overlong buffer get different rewards (std scaling would
  turn the gap into +-0.87 advantages): no signal all the same, so dynamic sampling drops the group and
  zero_signal_fraction counts it. In the shuffled-reward control, signal is on the permuted rewards."""
  from astro_jax.rl.learner import Group, has_signal
  from astro_jax.rl.learner import sample_metrics as _sample_metrics
  from astro_jax.train.rollouts import rewards
  lengths = np.array([91, 93, 95, 97])
  comps = [Completion([1] * n, [-0.1] * n, "eos", "") for n in lengths]

  def group(pid, correct):
    correct = np.asarray(correct, bool)
    return Group(Problem(pid, "", ""), 0, comps, correct,
                 rewards(correct, lengths, max_new_tokens=100, overlong="penalty", buffer=10))
  all_wrong, all_right, mixed = group("w", [0, 0, 0, 0]), group("r", [1, 1, 1, 1]), group("m", [0, 1, 0, 0])
  assert np.ptp(all_wrong.rewards) > 0 and np.ptp(all_right.rewards) > 0  # the shaped rewards do differ
  assert _sample_metrics([all_wrong, all_right, mixed], writer=False)["zero_signal_fraction"] == pytest.approx(2 / 3)
  assert [has_signal(g) for g in (all_wrong, all_right, mixed)] == [False, False, True]
  # The control: rewards permuted across the round no longer belong to the responses; any difference is signal.
  shuffled = Group(Problem("s", "", ""), 0, comps, np.zeros(4, bool), np.array([1.0, -1.0, -1.0, -1.0]))
  assert has_signal(shuffled, shuffled=True) and not has_signal(shuffled)
  flat = Group(Problem("f", "", ""), 0, comps, np.array([1, 0, 0, 0], bool), np.full(4, -1.0))
  assert not has_signal(flat, shuffled=True)
  assert _sample_metrics([shuffled, flat], writer=False, shuffled=True)["zero_signal_fraction"] == 0.5


def test_prompt_stream_order_depends_on_seed_and_epoch_only():
  from astro_jax.train.rollouts import PromptStream
  ids = [f"p{i}" for i in range(7)]
  a = PromptStream(ids, seed=3)
  taken = a.take(5) + a.take(5) + a.take(4)
  b = PromptStream(ids, seed=3)
  assert [b.take(1)[0] for _ in range(14)] == taken
  assert sorted(pid for e, pid in taken if e == 0) == sorted(ids) and [e for e, _ in taken].count(1) == 7
  c = PromptStream(ids, seed=3)
  c.take(9)
  d = PromptStream(ids, seed=3)
  d.set_state(json.loads(json.dumps(c.get_state())))
  assert d.take(5) == taken[9:]
  with pytest.raises(ValueError, match="had 7 prompts"):
    PromptStream(ids[:3], seed=3).set_state(c.get_state())


def test_bad_settings_and_inputs_stop_with_one_line(toy, tmp_path):
  from astro_jax.stages import rl
  for values, match in [({"group_size": 1}, "'group_size' = 1"), ({"minibatches": 3}, "'minibatches' = 3"),
                        ({"sampling.temperature": 0.0}, "'sampling.temperature'"),
                        ({"loss.aggregation": "mean"}, "'loss.aggregation'"),
                        ({"reward.overlong": "penalty"}, "'reward.overlong_buffer'"),
                        ({"reward.correct": -2.0}, "'reward.correct'"),
                        ({"eval.every": 2}, "'eval.benchmarks'")]:
    with pytest.raises(ConfigError, match=match):
      rl.check(rl_config(toy, tmp_path / "x", **values))
  with pytest.raises(UserError, match=r"problem 'sum_0_0': its prompt is 5 tokens > max_prompt_tokens 4"):
    rl.run(rl_config(toy, tmp_path / "short", max_prompt_tokens=4))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "a", "problem": "1 + 1", "answer": "2"}\n{"id": "b", "problem": \n')
  with pytest.raises(UserError, match="bad.jsonl"):
    rl.run(rl_config(toy, tmp_path / "bad", prompts=str(bad)))
  assert not (tmp_path / "short").exists() and not (tmp_path / "bad").exists()  # nothing written


@pytest.mark.parametrize("path", ["configs/rl_tiny.py", "configs/rl_smollm2.py"])
def test_shipped_small_configs_pass_the_stage_checks(path):
  from astro_jax import main
  from astro_jax.stages import rl
  config = main.load_config_file(f"{REPO}/{path}")
  config.unlock()
  set_values(config, {"checkpoint": config.checkpoint or "ckpt", "prompts": config.prompts or "p.jsonl",
                      "output_dir": config.output_dir or "out"})
  rl.check(config)


@pytest.mark.parametrize("lr, match", [
    # lr 1e12: step 1's update leaves finite weights ~1e12 whose logits overflow: step 2 samples NaN log-probs
    # (all its groups all wrong, so without the check every later step trained on nothing and the run exported);
    # checkpoint 1 holds those weights: it goes, so that resume=true cannot replay them
    (1e12, r"step 2: the sampler's log-probs are not finite \(128 of 128 sampled tokens.*; checkpoint 1 holds the "
           r"weights that gave it and was deleted; training stopped, no checkpoint is left in "),
    # lr 1e39 is inf in float32: step 1's loss and gradients are finite, its updated weights are not
    (1e39, r"step 1: the updated weights are not finite \(loss .*; training stopped, no checkpoint was written")],
    ids=["nan_logprobs", "inf_weights"])
def test_a_broken_model_stops_the_run_naming_the_step_and_the_last_good_checkpoint(toy, tmp_path, compile_cache,
                                                                                   capsys, lr, match):
  """Non-finite log-probs or weights stop the run as a NaN loss does (one line; no checkpoint or HF export of
  the broken state); a broken model's sampled log-probs are NaN before any loss is."""
  from astro_jax import main
  from astro_jax.stages import rl
  from astro_jax.train.loop import NonFiniteLoss
  out = tmp_path / "broken"
  with pytest.raises(NonFiniteLoss, match=match) as error:
    rl.run(rl_config(toy, out, steps=6, save_every=1, export_hf=True, compile_cache_dir=compile_cache,
                     **{"optimizer.lr": lr}))
  step = int(str(error.value).split(":")[0].removeprefix("step "))
  assert [r["step"] for r in rows(out)] == list(range(1, step)) and finalized(out) == []
  assert not (out / "hf").exists()
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:  # what main does with it
    main.fail(error.value)
  assert exit_.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: step {step}: "), lines


def test_steps_without_a_reward_signal_stop_the_run_after_max_empty_steps(toy, tmp_path, compile_cache):
  """A healthy model on problems it cannot solve (no answer token boxes "42"): every group is all wrong, dynamic
  sampling drops them all, and the run stops after max_empty_steps such steps, their rows written."""
  from astro_jax.stages import rl
  _, prompts = toy
  unsolvable = tmp_path / "unsolvable.jsonl"
  unsolvable.write_text("".join(json.dumps({**json.loads(line), "answer": "42"}) + "\n"
                                for line in prompts.read_text().splitlines()))
  out = tmp_path / "empty"
  with pytest.raises(UserError, match=r"^step 2: no group with a reward signal for 2 steps in a row \(all right or "
                                      r"all wrong\); the model may be broken; training stopped, the last good "
                                      r"checkpoint is step 1 in "):
    rl.run(rl_config(toy, out, prompts=str(unsolvable), steps=6, save_every=1, max_empty_steps=2, export_hf=True,
                     compile_cache_dir=compile_cache))
  got = rows(out)
  assert [r["step"] for r in got] == [1, 2] and all(r["groups"] == 0 and r["accuracy"] == 0 for r in got)
  assert all(r["zero_signal_fraction"] == 1.0 and r["sampling_rounds"] == 3 for r in got)
  assert finalized(out) == [1] and not (out / "hf").exists()
  with pytest.raises(ConfigError, match="'max_empty_steps' = 0"):
    rl.check(rl_config(toy, tmp_path / "x", max_empty_steps=0))
