"""No run may lose, mix or silently corrupt results (issue 18): the output lock, input fingerprints, an overwrite that
keeps the old run until the new one has a checkpoint, continuing after a NaN stop with a lower learning rate, an
unwritable output and a full disk named in one line before or at the point of failure.

sft runs use configs/sft_tiny.py on the tiny random checkpoint (seconds a run); the file-system cases mount small
tmpfs file systems (root only: skipped elsewhere)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from astro_jax import files, stages
from astro_jax.errors import UserError
from tests.conftest import REPO
from tests.test_sft_stage import DATA, cli, config, curve, finalized, restore_state, rows

SHORT = {"steps": 4, "save_every": 2, "keep": 3, "eval_every": 0, "export_hf": False}


def run_sft(cfg) -> None:
  stages.get("sft").run(cfg)


def snapshot(out: Path) -> dict[str, bytes]:
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), **kwargs)


def one_error_line(stderr: str) -> str:
  """The single `error:` line a refused run prints (progress bars aside), with no traceback."""
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("data") / "sft.jsonl"
  shutil.copy(DATA, path)
  return path


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, data_file, tmp_path_factory) -> Path:
  """A finished 4-step run (checkpoints 2 and 4) on a copy of the data."""
  out = tmp_path_factory.mktemp("finished") / "run"
  run_sft(config(tiny_checkpoint, out, data=str(data_file), **SHORT))
  return out


def mount_tmpfs(path: Path, options: str) -> None:
  path.mkdir(parents=True, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")


@pytest.fixture()
def tmpfs(tmp_path):
  """mount(name, options) -> a fresh tmpfs mounted under tmp_path (unmounted after the test)."""
  mounted = []

  def mount(name: str, options: str) -> Path:
    path = tmp_path / name
    mount_tmpfs(path, options)
    mounted.append(path)
    return path
  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- the lock ----------------------------------------------------------------------------------------------------

def test_the_lock_names_its_holder_and_a_killed_holder_releases_it(tmp_path):
  out = tmp_path / "out"
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from astro_jax import files
      with files.output_lock({str(out)!r}):
        print("held", flush=True)
        time.sleep(60)
      """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(files.OutputInUseError, match=rf"in use by another run \({holder.pid}@"):
      with files.output_lock(out):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with files.output_lock(out) as lock:  # the kernel released the dead holder's lock
    assert lock.read_text().startswith(f"{os.getpid()}@")
  assert not lock.exists() and not out.exists()


def test_two_runs_into_one_place_one_runs_the_other_is_refused(tiny_checkpoint, data_file, tmp_path):
  out = tmp_path / "run"
  first = subprocess.Popen(cli(tiny_checkpoint, out, data=data_file, **SHORT), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lock = files.lock_path(out)
  deadline = time.time() + 300
  while not lock.exists() and first.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert lock.exists(), "the first run never took its lock"
  # The second run (other settings: a different learning rate) starts while the first holds the location.
  second = run_cli(cli(tiny_checkpoint, out, data=data_file, **SHORT, **{"optimizer.lr": 1e-3}))
  first_out, first_err = first.communicate(timeout=600)
  assert first.returncode == 0, first_err[-3000:]
  assert second.returncode == 2
  line = one_error_line(second.stderr)
  assert f"{out} is in use by another run ({first.pid}@" in line
  # The first run is what it would have been alone.
  solo = tmp_path / "solo"
  run_sft(config(tiny_checkpoint, solo, data=str(data_file), **SHORT))
  assert curve(out) == curve(solo) and finalized(out) == finalized(solo) == [2, 4]
  assert not lock.exists()


# --- overwrite keeps the old run until the new one has a checkpoint ----------------------------------------------

def test_an_overwrite_that_fails_before_its_first_checkpoint_leaves_the_old_run_as_it_was(finished, tiny_checkpoint,
                                                                                            data_file, tmp_path):
  from astro_jax.train.loop import NonFiniteLoss
  out = shutil.copytree(finished, tmp_path / "run")
  (out / "notes.txt").write_text("the user's own file")
  before = snapshot(out)
  # lr 1e30: step 2's loss is NaN, before the first checkpoint (save_every 3).
  with pytest.raises(NonFiniteLoss, match="step 2: loss is nan"):
    run_sft(config(tiny_checkpoint, out, data=str(data_file), **{**SHORT, "save_every": 3}, overwrite=True,
                   **{"optimizer.lr": 1e30}))
  assert snapshot(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing set aside is left behind

  # An overwrite that reaches its first checkpoint replaces the run's entries (and only those).
  run_sft(config(tiny_checkpoint, out, data=str(data_file), **SHORT, overwrite=True, **{"optimizer.lr": 1e-3}))
  assert json.loads((out / "run_config.json").read_text())["optimizer"]["lr"] == 1e-3
  assert curve(out) != curve(finished) and finalized(out) == [2, 4]
  assert (out / "notes.txt").read_text() == "the user's own file"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_killed_overwrite_is_undone_by_the_next_run(finished, tiny_checkpoint, data_file, tmp_path):
  out = shutil.copytree(finished, tmp_path / "run")
  before = snapshot(out)
  proc = subprocess.Popen(cli(tiny_checkpoint, out, data=data_file, **{**SHORT, "save_every": 4}, overwrite=True,
                              **{"optimizer.lr": 1e-3}), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 300
  def recorded() -> bool:  # the old run is set aside and the new one's settings are written in its place
    config_path = out / "run_config.json"
    try:
      return config_path.read_bytes() != before["run_config.json"]
    except FileNotFoundError:
      return False

  while not recorded():
    assert proc.poll() is None and time.time() < deadline, "the overwrite ended before it could be killed"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)  # the new run has recorded its settings, but has no checkpoint
  proc.wait()
  assert snapshot(out) != before
  # The next run of this location (here: resuming the old run) first puts the old run back.
  run_sft(config(tiny_checkpoint, out, data=str(data_file), **SHORT, resume=True))
  assert curve(out) == curve(finished) and finalized(out) == [2, 4]
  assert json.loads((out / "run_config.json").read_text()) == json.loads(before["run_config.json"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- fingerprints and paths ----------------------------------------------------------------------------------------

def test_resume_refuses_changed_data_and_accepts_another_spelling_of_the_path(finished, tiny_checkpoint, data_file,
                                                                               tmp_path, monkeypatch):
  out = shutil.copytree(finished, tmp_path / "run")
  monkeypatch.chdir(data_file.parent)
  run_sft(config(tiny_checkpoint, out, data=f"./{data_file.name}", **SHORT, resume=True))  # the same file
  assert curve(out) == curve(finished)

  edited = tmp_path / "sft.jsonl"
  shutil.copy(data_file, edited)
  lines = edited.read_text().splitlines(keepends=True)
  edited.write_text("".join(lines[1:] + lines[:1]))  # same rows, another order: other content
  with pytest.raises(UserError, match=r"holds results of other settings \(data\.path: .*data\.sha256: ") as error:
    run_sft(config(tiny_checkpoint, out, data=str(edited), **SHORT, resume=True))
  assert "\n" not in str(error.value)
  shutil.copy(data_file, edited)  # the same content at another path: still another input
  with pytest.raises(UserError, match=r"data\.path: "):
    run_sft(config(tiny_checkpoint, out, data=str(edited), **SHORT, resume=True))


def test_every_stage_records_its_inputs_fingerprints(tmp_path):
  from astro_jax.stages import common
  problems = tmp_path / "p.jsonl"
  problems.write_text('{"id": "a", "problem": "1 + 1?", "answer": "2"}\n')
  cfg = stages.defaults("mcts")
  cfg.input = str(problems)
  settings = stages.get("mcts").settings(cfg)
  import hashlib
  assert settings["input"] == {"path": str(problems), "bytes": problems.stat().st_size,
                               "sha256": hashlib.sha256(problems.read_bytes()).hexdigest()}
  eval_cfg = stages.defaults("eval")
  described = common.describe_input("amc23," + str(problems), "benchmarks")
  assert [d.get("benchmark") for d in described] == ["amc23", None] and described[1]["path"] == str(problems)
  assert common.to_settings(eval_cfg, ("samples",), ("benchmarks",))["benchmarks"][0]["benchmark"] == "math500"


# --- continuing after a NaN stop ----------------------------------------------------------------------------------

def test_continue_after_a_nan_stop_with_a_lower_learning_rate(tiny_checkpoint, data_file, tmp_path):
  from astro_jax.train.loop import NonFiniteLoss
  six = {**SHORT, "steps": 6, "save_every": 1, "keep": 10}
  reference = tmp_path / "reference"
  run_sft(config(tiny_checkpoint, reference, data=str(data_file), **six))
  # A run killed after its third checkpoint (what a SIGKILL leaves: checkpoints 1-3, the rows up to 3).
  out = shutil.copytree(reference, tmp_path / "run")
  for step in (4, 5, 6):
    shutil.rmtree(out / "checkpoints" / str(step))
  (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(reference)[:3]))
  # Resumed with lr 1e30: step 4's update ruins the weights (checkpoint 4), step 5's loss is NaN. Checkpoint 4 holds
  # the weights that gave it: it is deleted, and the last good one is named.
  with pytest.raises(NonFiniteLoss, match=r"step 5: loss is .*nan\).*checkpoint 4 .*deleted.*last good checkpoint is "
                                          r"step 3"):
    run_sft(config(tiny_checkpoint, out, data=str(data_file), **six, resume=True, **{"optimizer.lr": 1e30}))
  assert finalized(out) == [1, 2, 3]
  # Resumed again with the original rate: it continues from checkpoint 3 exactly as the uninterrupted run did.
  run_sft(config(tiny_checkpoint, out, data=str(data_file), **six, resume=True))
  assert curve(out) == curve(reference)
  got, want = (restore_state(d / "checkpoints" / "6") for d in (out, reference))
  import jax
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  changes = json.loads((out / "run_config.json").read_text())["changes"]
  assert changes == [{"at_step": 3, "changed": {"optimizer.lr": [3e-3, 1e30]}},
                     {"at_step": 3, "changed": {"optimizer.lr": [1e30, 3e-3]}}]
  # Other keys still may not change on resume.
  with pytest.raises(UserError, match=r"other settings \(batch_size: 4 -> now 8"):
    run_sft(config(tiny_checkpoint, out, data=str(data_file), **six, resume=True, batch_size=8))


# --- unwritable output, full disk ----------------------------------------------------------------------------------

def test_an_unwritable_output_is_one_line_before_any_work(tiny_checkpoint, data_file, tmp_path, tmpfs):
  read_only = tmpfs("ro", "size=1m,ro")
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "Count: one, two,"}\n')
  cases = [
      (cli(tiny_checkpoint, a_file, data=data_file, **SHORT), "config key 'output_dir' = '{}': is a file"),
      (cli(tiny_checkpoint, a_file / "run", data=data_file, **SHORT), f"{a_file} is a file, not a directory"),
      (cli(tiny_checkpoint, read_only / "run", data=data_file, **SHORT), "Read-only file system"),
      ([sys.executable, "-m", "astro_jax.main", "--config=configs/generate.py", f"--config.checkpoint={tiny_checkpoint}",
        f"--config.input={prompts}", "--config.sampling.max_new_tokens=4", f"--config.output={read_only / 'o.jsonl'}"],
       "Read-only file system"),
      ([sys.executable, "tools/convert_hf_to_orbax.py", "--hf_dir", str(tiny_checkpoint), "--out",
        str(read_only / "orbax")], "Read-only file system"),
  ]
  for args, expected in cases:
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected.format(a_file) in one_error_line(proc.stderr)


def test_a_full_disk_stops_at_the_first_failed_save(tiny_checkpoint, data_file, tmpfs):
  disk = tmpfs("small", "size=70m")  # room for one checkpoint of the tiny model (~45 MB), not two
  out = disk / "run"
  proc = run_cli(cli(tiny_checkpoint, out, data=data_file, **{**SHORT, "steps": 6, "save_every": 1}))
  assert proc.returncode == 2
  line = one_error_line(proc.stderr)
  assert "checkpoint step 2 could not be saved" in line and "No space left on device" in line
  assert "MiB free" in line
  # Step 2's save fails in the background; the run stops when it next looks (step 3's start), 3 steps early.
  assert finalized(out) == [1] and max(r["step"] for r in rows(out)) <= 3
  import jax
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restore_state(out / "checkpoints" / "1")))
