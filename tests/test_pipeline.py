"""The `pipeline` stage on the toy task (configs/pipeline_tiny.py: a tiny random Llama, one-digit sums, both arms):

- one run makes every stage's directory, pipeline.json with every stage done, eval rows, the report;
- a rerun skips every finished stage without loading a model; changed settings of a finished stage are refused,
  naming the stage and the key; overwrite redoes that stage and the stages it feeds, and no other;
- a pipeline SIGKILLed during sft, rerun, SIGKILLed again during rl and rerun ends with the uninterrupted run's eval
  rows and weights, bit for bit;
- a bad sub-config key or value, a missing problems file, a test set sharing problems with the train set, a key the
  pipeline sets, a budget past the model's context: one line before any work;
- two processes x 4 devices run the pipeline as one process x 8 devices does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from astro_jax import data, main
from astro_jax.errors import ConfigError, UserError
from astro_jax.stages import common
from astro_jax.stages import pipeline
from tests.conftest import COMPILE_CACHE, REPO, set_values
from tests.test_sft_real import free_port
from tests.test_sft_stage import finalized

sys.path.insert(0, os.path.join(REPO, "tools"))
import make_toy_task  # noqa: E402

STEPS = ("mcts", "base/eval", "astro/sft", "astro/eval_sft", "astro/difficulty", "astro/rl", "astro/eval_rl",
         "direct/sft", "direct/eval_sft", "direct/difficulty", "direct/rl", "direct/eval_rl")
EVALS = ("base/eval", "astro/eval_sft", "astro/eval_rl", "direct/eval_sft", "direct/eval_rl")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("toy")
  model_dir, _ = make_toy_task.make(root)
  return {"checkpoint": model_dir, "problems": root / "train.jsonl", "test": root / "test.jsonl",
          "cache": COMPILE_CACHE}  # the test run's cache: the killed CLI runs load what the in-process run compiled


def pipeline_config(toy, out: Path, **values):
  config = main.load_config_file(f"{REPO}/configs/pipeline_tiny.py")
  return set_values(config, {"checkpoint": str(toy["checkpoint"]), "problems": str(toy["problems"]),
                             "test": str(toy["test"]), "output_dir": str(out), "compile_cache_dir": str(toy["cache"]),
                             **values})


def cli(toy, out: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "astro_jax.main", f"--config={REPO}/configs/pipeline_tiny.py",
          f"--config.checkpoint={toy['checkpoint']}", f"--config.problems={toy['problems']}",
          f"--config.test={toy['test']}", f"--config.output_dir={out}", f"--config.compile_cache_dir={toy['cache']}",
          *extra]


def env(devices: int = 1) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def record(out: Path) -> dict:
  return json.loads((out / "pipeline.json").read_text())


def eval_rows(out: Path, step: str) -> list[dict]:
  return data.read_jsonl_rows(out / step / "test.jsonl")


def weights(hf_dir: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(str(hf_dir / "model.safetensors"))


def stamps(out: Path) -> dict[str, tuple]:
  """Per step: its run_config.json's mtime and pipeline.json's start time (what a redo changes)."""
  started = {s["name"]: s["started"] for s in record(out)["stages"]}
  return {name: ((out / name / "run_config.json").stat().st_mtime_ns, started[name]) for name in STEPS}


@pytest.fixture()
def no_model(monkeypatch):
  """Loading a model fails the test."""
  from astro_jax import checkpoint

  def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")
  monkeypatch.setattr(common, "load_model", refuse)
  monkeypatch.setattr(checkpoint, "load_model", refuse)


@pytest.fixture(scope="module")
def full_run(toy, tmp_path_factory):
  """(run directory, what the astro arm ended with): both arms, uninterrupted, in this process."""
  out = tmp_path_factory.mktemp("pipeline") / "run"
  pipeline.run(pipeline_config(toy, out))
  final = {"eval_rl": eval_rows(out, "astro/eval_rl"), "rl": weights(out / "astro" / "rl" / "hf"),
           "sft": weights(out / "astro" / "sft" / "hf")}
  return out, final


# --- one run, reruns ---------------------------------------------------------------------------------------------

def test_a_run_makes_every_stage_its_layout_and_a_report(full_run):
  out, _ = full_run
  doc = record(out)
  assert [s["name"] for s in doc["stages"]] == list(STEPS)
  assert all(s["status"] == "done" and s["dir"] == s["name"] for s in doc["stages"])
  assert all(s["wall_s"] > 0 and s["compile_s"] >= 0 and s["started"] <= s["ended"] for s in doc["stages"])
  assert sum(s["compile_s"] for s in doc["stages"]) > 0
  assert doc["config"]["sft"]["optimizer"]["lr"] == 3e-3 and doc["config"]["arms"] == "astro,direct"
  for name in EVALS:
    rows = eval_rows(out, name)
    assert len(rows) == 15 and all(len(r["samples"]) == 8 for r in rows)
    assert all({"text", "answer", "correct"} <= set(s) for r in rows for s in r["samples"])
  # Each stage reads its predecessor's output.
  settings = lambda name: json.loads((out / name / "run_config.json").read_text())
  assert settings("astro/sft")["data"]["path"] == str(out / "mcts" / "sft.jsonl")
  assert settings("direct/sft")["data"]["path"] == str(out / "mcts" / "direct.jsonl")
  assert settings("astro/rl")["prompts"]["path"] == str(out / "astro" / "difficulty" / "prompts.jsonl")
  for arm in ("astro", "direct"):
    assert settings(f"{arm}/difficulty")["checkpoint"]["path"] == str(out / arm / "sft" / "hf")
    assert settings(f"{arm}/rl")["checkpoint"]["path"] == str(out / arm / "sft" / "hf")
    assert settings(f"{arm}/eval_sft")["checkpoint"]["path"] == str(out / arm / "sft" / "hf")
    assert settings(f"{arm}/eval_rl")["checkpoint"]["path"] == str(out / arm / "rl" / "hf")
  assert (out / "report.md").exists() and (out / "report.html").exists()


def test_a_rerun_skips_finished_stages_without_loading_a_model(full_run, toy, no_model, capsys):
  out, _ = full_run
  before = stamps(out)
  # keys that change no output are no reason to redo anything
  pipeline.run(pipeline_config(toy, out, **{"eval.batch_size": 32, "sft.save_every": 4, "mesh.fsdp": 1}))
  assert all(s["status"] == "skipped" for s in record(out)["stages"])
  assert stamps(out) == before
  printed = capsys.readouterr().out
  assert all(f"pipeline: {name}: skipped" in printed for name in STEPS)


def test_changed_settings_of_a_finished_stage_are_refused_naming_stage_and_key(full_run, toy, no_model):
  out, _ = full_run
  before = stamps(out)
  with pytest.raises(UserError, match=r"^pipeline stage astro/sft: settings changed \(optimizer\.lr: 0\.003 -> now "
                                      r"0\.006\); pass --config\.overwrite=true"):
    pipeline.run(pipeline_config(toy, out, **{"sft.optimizer.lr": 6e-3}))
  with pytest.raises(UserError, match=r"pipeline stage base/eval: settings changed \(samples: 8 -> now 2\)"):
    pipeline.run(pipeline_config(toy, out, **{"eval.samples": 2}))
  assert stamps(out) == before


# --- killed and rerun ---------------------------------------------------------------------------------------------

def kill_when(args: list[str], ready) -> None:
  """Start the pipeline, SIGKILL it once `ready()`; it must not have finished by then."""
  proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while proc.poll() is None and not ready():
    time.sleep(0.003)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, f"the pipeline ended ({proc.returncode}) before the kill"


def test_a_pipeline_killed_in_sft_and_in_rl_ends_as_the_uninterrupted_one(full_run, toy, tmp_path, capsys,
                                                                          monkeypatch):
  _, want = full_run
  out = tmp_path / "run"
  args = cli(toy, out, "--config.arms=astro")
  sft, rl = out / "astro" / "sft", out / "astro" / "rl"
  kill_when(args, lambda: bool(finalized(sft)) and not (sft / "hf").exists())
  assert record(out)["stages"][-1]["name"] == "astro/sft" and record(out)["stages"][-1]["status"] == "running"
  kill_when(args, lambda: bool(finalized(rl)) and not (rl / "hf").exists())
  assert record(out)["stages"][-1]["name"] == "astro/rl"
  monkeypatch.setattr(pipeline, "report", lambda run_dir: None)
  pipeline.run(pipeline_config(toy, out, arms="astro"))  # the same command, in this process
  printed = capsys.readouterr().out
  assert "pipeline: astro/sft: skipped" in printed and "pipeline: astro/rl: running" in printed
  assert "resumed from step" in printed
  assert all(s["status"] in ("done", "skipped") for s in record(out)["stages"])
  assert eval_rows(out, "astro/eval_rl") == want["eval_rl"]
  for name, hf in (("sft", sft / "hf"), ("rl", rl / "hf")):
    got = weights(hf)
    assert got.keys() == want[name].keys() and all(np.array_equal(got[k], want[name][k]) for k in got), name


# --- overwrite (changes the full run: after the tests that read it) ----------------------------------------------

def test_overwrite_redoes_the_changed_stage_and_the_stages_it_feeds_only(full_run, toy, monkeypatch):
  out, _ = full_run
  before = stamps(out)
  reports = []
  monkeypatch.setattr(pipeline, "report", reports.append)
  pipeline.run(pipeline_config(toy, out, overwrite=True, **{"rl.seed": 1}))
  assert reports == [out] * 5  # after each stage run and at the end
  after = stamps(out)
  redone = {name for name in STEPS if after[name] != before[name]}
  assert redone == {"astro/rl", "astro/eval_rl", "direct/rl", "direct/eval_rl"}
  assert json.loads((out / "astro" / "rl" / "run_config.json").read_text())["seed"] == 1
  statuses = {s["name"]: s["status"] for s in record(out)["stages"]}
  assert all(statuses[n] == ("done" if n in redone else "skipped") for n in STEPS)


def test_a_replicate_runs_the_arms_under_seed_n_with_its_seeds_and_shares_the_search(full_run, toy):
  out, _ = full_run
  before = stamps(out)
  pipeline.run(pipeline_config(toy, out, seed=1, arms="astro"))
  doc = {s["name"]: s for s in record(out)["stages"]}
  replicate = [f"astro/seed1/{name}" for name in ("sft", "eval_sft", "difficulty", "rl", "eval_rl")]
  assert doc["mcts"]["status"] == doc["base/eval"]["status"] == "skipped"  # shared: run once
  assert all(doc[name]["status"] == "done" and doc[name]["dir"] == name for name in replicate)
  assert set(STEPS) <= set(doc) and stamps(out) == before  # the first run's stages untouched, their entries kept
  settings = lambda name: json.loads((out / name / "run_config.json").read_text())
  assert settings("astro/seed1/sft")["seed"] == settings("astro/seed1/rl")["seed"] == 1
  assert settings("astro/seed1/rl")["sampling"]["seed"] == settings("astro/seed1/difficulty")["sampling"]["seed"] == 1
  assert settings("astro/seed1/eval_rl")["sampling"]["seed"] == settings("astro/eval_rl")["sampling"]["seed"]
  assert settings("astro/seed1/sft")["data"]["path"] == str(out / "mcts" / "sft.jsonl")
  assert settings("astro/seed1/rl")["prompts"]["path"] == str(out / "astro" / "seed1" / "difficulty" / "prompts.jsonl")
  assert settings("astro/seed1/eval_rl")["checkpoint"]["path"] == str(out / "astro" / "seed1" / "rl" / "hf")
  table = json.loads((out / "report.json").read_text())["table"]
  assert {r["model"]: r["dir"] for r in table["rows"]} == {"base": "base/eval", "ASTRO-SFT": "astro/seed1/eval_sft",
                                                           "ASTRO-RL": "astro/seed1/eval_rl"}
  assert [r["status"] for r in table["rows"]] == ["skipped", "done", "done"]


# --- refused before any work -------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, error", [
    ({"sft.optimizer.lr": -1.0}, r"config key 'sft\.optimizer\.lr' = -1\.0: must be a positive number"),
    ({"sft.data": "x.jsonl"}, r"config key 'sft\.data' = 'x\.jsonl': the pipeline sets it"),
    ({"rl.mesh.fsdp": 2}, r"config key 'rl\.mesh' = .*: the pipeline sets it"),
    ({"arms": "astro,sft"}, r"config key 'arms' = 'astro,sft': must be astro, direct or astro,direct"),
    ({"problems": "/nonexistent/train.jsonl"}, r"config key 'problems': '/nonexistent/train\.jsonl' is neither"),
    ({"test": "math500,/nonexistent/test.jsonl"}, r"config key 'test': '/nonexistent/test\.jsonl' is neither"),
    ({"rl.max_prompt_tokens": 64}, r"config key 'rl\.max_prompt_tokens' = 64: \+ rl\.sampling\.max_new_tokens = 65 "
                                   r"> the model's context of 64 positions"),
    ({"eval.sampling.max_new_tokens": 62}, r"test test, problem 'sum_0_0' \(eval\): prompt of 5 tokens"),
    ({"seed": 0, "rl.sampling.seed": 3}, r"config key 'rl\.sampling\.seed' = 3: with seed = 0 the pipeline sets it"),
    ({"seed": -2}, r"config key 'seed' = -2: must be an integer >= -1"),
])
def test_bad_settings_are_one_line_before_any_work(values, error, toy, tmp_path, no_model):
  out = tmp_path / "run"
  with pytest.raises(UserError, match=error):
    pipeline.run(pipeline_config(toy, out, **values))
  assert not out.exists()


def test_a_test_set_sharing_problems_with_the_train_set_is_refused(toy, tmp_path, no_model):
  test = tmp_path / "test.jsonl"
  train = data.read_jsonl_rows(toy["problems"])
  data.write_jsonl_atomic(test, [{"id": "t1", "problem": "9 + 0", "answer": "9"},
                                 {"id": "t2", "problem": "  1   +  2 ", "answer": "3"}])
  assert any(r["problem"] == "1 + 2" for r in train)
  with pytest.raises(UserError, match=r"1 test problem\(s\) have the text of a train problem .* \(a leak\), e.g. test "
                                      r"'t2' \(test\) = train 'sum_1_2'"):
    pipeline.run(pipeline_config(toy, tmp_path / "run", test=str(test)))
  assert not (tmp_path / "run").exists()


def test_a_second_pipeline_on_the_same_run_directory_is_refused(toy, tmp_path, no_model):
  from astro_jax import files
  out = tmp_path / "run"
  with files.output_lock(out):
    with pytest.raises(UserError, match=r"is in use by another run"):
      pipeline.run(pipeline_config(toy, out))
  assert not out.exists()


def test_cli_refuses_an_unknown_sub_config_key_with_one_line_and_status_2(toy, tmp_path):
  proc = subprocess.run(cli(toy, tmp_path / "run", "--config.sft.optimizer.learning_rate=1e-3"), cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "unknown config key 'sft.optimizer.learning_rate'" in lines[0] and "lr" in lines[0]
  assert not (tmp_path / "run").exists()


def test_eval_prompt_defaults_render_the_old_zero_shot_prompt_and_record_as_before():
  from astro_jax import prompts, stages
  from astro_jax.search.policy import PromptConfig
  from astro_jax.stages import eval as eval_stage
  config = stages.defaults("eval")
  for system in ("", "Be brief."):
    config.prompt.system = system
    assert PromptConfig(**config.prompt.to_dict()).messages(" 2 + 3? ") == prompts.math_messages(" 2 + 3? ",
                                                                                                   system or None)
    recorded = eval_stage.settings(config)
    assert recorded["system_prompt"] == system and "prompt" not in recorded
  config.prompt.example_problem, config.prompt.example_solution = "1 + 1?", "\\boxed{2}"
  assert "system_prompt" not in eval_stage.settings(config)
  assert main._renamed_hint("pipeline", "eval.system_prompt") == " (this stage calls it 'prompt.system')"


def test_the_shipped_configs_pass_every_check_before_work(toy, tmp_path, no_model):
  for name in ("pipeline_tiny", "demo"):
    config = main.load_config_file(f"{REPO}/configs/{name}.py")
    main.validate(config)
  config.output_dir = str(tmp_path / "demo")
  steps = pipeline.validate(config)  # the real SmolLM2's context and tokenizer, its prompts
  assert [s.name for s in steps] == list(STEPS[:7])
  assert not (tmp_path / "demo").exists()
  experiment = main.load_config_file(f"{REPO}/experiments/astro_vs_direct/config.py")
  experiment.output_dir, experiment.seed = str(tmp_path / "experiment"), 2
  steps = pipeline.validate(experiment)
  assert [s.name for s in steps][:4] == ["mcts", "base/eval", "astro/seed2/sft", "astro/seed2/eval_sft"]
  assert not (tmp_path / "experiment").exists()


# --- multi-host ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("ASTRO_JAX_LONG_TESTS") != "1",
                    reason="~150 s of CPU (three pipelines compile for 8 devices); ASTRO_JAX_LONG_TESTS=1 runs it")
def test_two_processes_run_the_pipeline_as_one_process_with_eight_devices(toy, tmp_path):
  port = free_port()
  one = ["--config.arms=astro"]
  jobs = {"eight": (cli(toy, tmp_path / "eight", *one), 8)}
  for i in range(2):
    jobs[f"two_{i}"] = (cli(toy, tmp_path / "two", *one, "--config.distributed.enabled=true",
                            "--config.distributed.num_processes=2",
                            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                            f"--config.distributed.process_id={i}"), 4)
  procs = {name: subprocess.Popen(args, cwd=REPO, env=env(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for name, (args, n) in jobs.items()}
  for name, p in procs.items():
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{err[-4000:]}"
  eight, two = tmp_path / "eight", tmp_path / "two"
  assert [s["status"] for s in record(two)["stages"]] == ["done"] * 7
  for name in ("mcts/sft.jsonl", "astro/difficulty/pass_rates.jsonl", "astro/difficulty/prompts.jsonl"):
    assert (two / name).read_text() == (eight / name).read_text(), name
  for name in ("base/eval", "astro/eval_sft", "astro/eval_rl"):
    assert eval_rows(two, name) == eval_rows(eight, name), name
  for stage in ("sft", "rl"):
    a, b = weights(two / "astro" / stage / "hf"), weights(eight / "astro" / stage / "hf")
    for key in b:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=f"{stage}: {key}")
