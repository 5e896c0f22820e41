"""The `sft` stage end to end on a tiny random Llama with SmolLM2's tokenizer (CPU, seconds per run): a run's outputs,
kill-and-resume with a real SIGKILL (between saves and in the middle of one), corrupted checkpoints, the NaN stop,
refusals before any work, and gradient accumulation.

Every run has the settings of `RUN` (on configs/sft_tiny.py): 8 steps of 4 rows x 128 tokens, a checkpoint every 2
steps (the last 2 kept), a held-out loss every 4. The killed runs start at once, in the background, while the
uninterrupted reference run and the other tests go on in this process.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from astro_jax import main, stages
from astro_jax.errors import UserError
from astro_jax.train import metrics as metrics_lib
from tests.conftest import REPO, set_values

DATA = Path(REPO) / "docs" / "smollm2_run" / "sft.jsonl"  # 12 real examples: 10 train, 2 held out (eval_fraction)
TMP = ".orbax-checkpoint-tmp"  # Orbax 0.12.8 writes step N to N.orbax-checkpoint-tmp, renamed to N when complete
RUN = {"steps": 8, "save_every": 2, "keep": 2, "eval_every": 4, "eval_fraction": 0.2, "export_hf": False,
       "optimizer.lr": 3e-3, "optimizer.schedule": "cosine", "optimizer.warmup_fraction": 0.25}
ROW_FIELDS = {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "tokens", "time_s"}


def config(checkpoint: Path, out: Path, **values):
  """configs/sft_tiny.py with RUN and `values` (dotted keys), as `python -m astro_jax.main` would build it."""
  base = main.load_config_file(os.path.join(REPO, "configs", "sft_tiny.py"))
  return set_values(base, {"checkpoint": str(checkpoint), "data": str(DATA), "output_dir": str(out), **RUN, **values})


def cli(checkpoint: Path, out: Path, **values) -> list[str]:
  """The same settings as command-line overrides."""
  text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)
  items = {"checkpoint": checkpoint, "data": DATA, "output_dir": out, **RUN, **values}
  return [sys.executable, "-m", "astro_jax.main", "--config=configs/sft_tiny.py",
          *(f"--config.{k}={text(v)}" for k, v in items.items())]


def run_sft(cfg) -> None:
  stages.get("sft").run(cfg)


def rows(out: Path) -> list[dict]:
  return metrics_lib.read_rows(out / "metrics.jsonl")


def curve(out: Path) -> list[tuple]:
  return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"], r.get("eval_loss")) for r in rows(out)]


def listing(out: Path) -> list[str]:
  try:
    return sorted(os.listdir(out / "checkpoints"))
  except FileNotFoundError:
    return []


def finalized(out: Path) -> list[int]:
  return sorted(int(n) for n in listing(out) if n.isdigit())


def in_progress(out: Path) -> list[str]:
  return [n for n in listing(out) if TMP in n]


def restore_state(step_dir: Path) -> dict:
  """A train checkpoint's state (params, optimizer state, step) as NumPy, read without a target."""
  import jax
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(step_dir / "state")
  return jax.tree.map(np.asarray, state)


def assert_same_run(out: Path, reference: Path) -> None:
  """The same metrics (losses, grad norms, lr, held-out losses) and the same final train state, bit for bit."""
  import jax
  assert curve(out) == curve(reference)
  assert finalized(out) == finalized(reference) == [6, 8] and not in_progress(out)
  got, want = (jax.tree_util.tree_leaves_with_path(restore_state(d / "checkpoints" / "8")) for d in (out, reference))
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)


# --- the killed runs (background subprocesses, a real SIGKILL) ----------------------------------------------------

class Background:
  """`python -m astro_jax.main` runs that are SIGKILLed when their run directory reaches a given state."""

  def __init__(self):
    self.pool = concurrent.futures.ThreadPoolExecutor(2)
    self.stop = threading.Event()
    self.procs: list[subprocess.Popen] = []

  def start(self, args: list[str], out: Path, ready: Callable[[Path], bool], caught: Callable[[Path], bool],
            attempts: int = 6) -> concurrent.futures.Future:
    return self.pool.submit(self._kill_when, args, out, ready, caught, attempts)

  def _kill_when(self, args, out, ready, caught, attempts) -> Path:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for attempt in range(attempts):
      log = open(out.parent / f"{out.name}.{attempt}.log", "w")
      proc = subprocess.Popen(args + ["--config.overwrite=true"] * (attempt > 0), cwd=REPO, env=env,
                              stdout=log, stderr=log)
      self.procs.append(proc)
      while proc.poll() is None and not self.stop.is_set():
        if ready(out):
          proc.send_signal(signal.SIGKILL)
          break
        time.sleep(0.005)
      proc.wait()
      log.close()
      if self.stop.is_set():
        raise RuntimeError("stopped")
      if proc.returncode == -signal.SIGKILL and caught(out):
        return out
    raise AssertionError(f"{out}: the kill missed its moment {attempts} times (logs beside it)")

  def close(self) -> None:
    self.stop.set()
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
    self.pool.shutdown(wait=True)


def between_saves(out: Path) -> bool:
  """Two checkpoints written (2 and 4), step 5's row written, no save under way: kill here."""
  steps = [r["step"] for r in rows(out)]
  return bool(steps) and max(steps) >= 5 and max(finalized(out), default=0) >= 4 and not in_progress(out)


def partial_data(out: Path) -> int:
  """Bytes of array data in the checkpoint being written after the newest complete one (0: none under way)."""
  done = max(finalized(out), default=None)
  total = 0
  for name in in_progress(out):
    if done is not None and int(name.split(".")[0]) > done:
      for path in (out / "checkpoints" / name).glob("state*/ocdbt.process_*/d/*"):
        try:
          total += path.stat().st_size
        except FileNotFoundError:
          pass
  return total


def during_save(out: Path) -> bool:
  """A checkpoint written, and the next one's arrays being written (over 1 MB of its ~47 MB so far): kill here."""
  return partial_data(out) > 2**20


@pytest.fixture(scope="module")
def killed(tiny_checkpoint, tmp_path_factory):
  """{"training": run killed between two saves, "save": run killed while a save was under way}: futures of their
  run directories, as the kills left them."""
  root = tmp_path_factory.mktemp("killed")
  bg = Background()
  futures = {
      "training": bg.start(cli(tiny_checkpoint, root / "training"), root / "training", between_saves,
                           lambda out: max(r["step"] for r in rows(out)) < 8 and len(finalized(out)) == 2
                           and not in_progress(out)),
      "save": bg.start(cli(tiny_checkpoint, root / "save"), root / "save", during_save,
                       lambda out: partial_data(out) > 0),
  }
  yield {k: (lambda f=f: f.result(timeout=900)) for k, f in futures.items()}
  bg.close()


@pytest.fixture(scope="module")
def reference(killed, tiny_checkpoint, tmp_path_factory):
  """The uninterrupted run (in this process, with the HF export)."""
  out = tmp_path_factory.mktemp("reference") / "run"
  run_sft(config(tiny_checkpoint, out, export_hf=True))
  return out


def copy_run(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.log"))
  return dst


# --- 1. an uninterrupted run -------------------------------------------------------------------------------------

def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
  """tag -> {step: value} of the TensorBoard event files (TFRecords of Event protos) under `directory`."""
  from tensorboardX.proto import event_pb2
  out: dict[str, dict[int, float]] = {}
  for path in directory.glob("events.out.tfevents.*"):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def expected_lr(s: int, peak: float = 3e-3, total: int = 8, warmup: int = 2, final: float = 0.1) -> float:
  if s <= warmup:
    return peak * s / warmup
  progress = (s - warmup - 1) / (total - warmup - 1)
  return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_a_run_writes_every_output(reference, tiny_checkpoint):
  import torch
  import transformers

  from astro_jax import checkpoint
  from astro_jax.model.llama import forward
  got = rows(reference)
  assert [r["step"] for r in got] == list(range(1, 9))
  for r in got:
    assert set(r) == ROW_FIELDS | ({"eval_loss"} if r["step"] % 4 == 0 else set()), r
    assert all(math.isfinite(v) for v in r.values()), r
    assert r["tokens"] == 4 * 127 and r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["time_s"] > 0
    assert r["lr"] == pytest.approx(expected_lr(r["step"]), rel=1e-6)
  assert got[-1]["loss"] < got[0]["loss"] and got[-1]["eval_loss"] < got[3]["eval_loss"]

  assert listing(reference) == ["6", "8"]  # keep=2, nothing left in progress
  png = (reference / "loss.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
  from PIL import Image
  with Image.open(reference / "loss.png") as image:
    image.verify()
  scalars = tensorboard_scalars(reference / "tensorboard")
  assert scalars["train/loss"] == {r["step"]: pytest.approx(r["loss"]) for r in got}
  assert sorted(scalars["eval/loss"]) == [4, 8]
  counts = json.loads((reference / "data_counts.json").read_text())
  assert counts == {"rows": 12, "kept": 12, "truncated": 12, "dropped": 0, "skipped": 0, "duplicates": 0,
                    "tokens": 12 * 128, "target_tokens": 12 * 127, "train_examples": 10, "held_out_examples": 2,
                    "packed_rows": 10, "steps": 8, "steps_per_epoch": 2}
  assert json.loads((reference / "run_config.json").read_text())["optimizer"]["lr"] == 3e-3

  # hf/ loads with transformers, and gives the logits of the last checkpoint's params.
  hf = transformers.AutoModelForCausalLM.from_pretrained(reference / "hf", local_files_only=True,
                                                         torch_dtype=torch.float32).eval()
  tokens = np.array([1, 3200, 17, 905, 44, 12, 9, 4000, 31, 2, 77, 501], np.int32)
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
  cfg = checkpoint.inspect_checkpoint(tiny_checkpoint)
  params = restore_state(reference / "checkpoints" / "8")["params"]
  ours, _ = forward(cfg, None, params, tokens[None], np.arange(len(tokens), dtype=np.int32)[None])
  np.testing.assert_allclose(np.asarray(ours[0]), theirs, rtol=1e-4, atol=1e-4)
  start = checkpoint.load_model(tiny_checkpoint).weights()
  assert not np.allclose(np.asarray(start["embed"]), params["embed"])  # trained, not the start weights


# --- 2. kill and resume --------------------------------------------------------------------------------------------

def test_killed_between_saves_resumes_to_the_same_run(killed, reference, tiny_checkpoint, tmp_path, capsys):
  out = copy_run(killed["training"](), tmp_path / "run")
  done = finalized(out)
  assert len(done) == 2 and not in_progress(out) and max(done) < max(r["step"] for r in rows(out)) < 8
  run_sft(config(tiny_checkpoint, out, resume=True))
  assert f"resumed from step {max(done)}" in capsys.readouterr().out
  assert_same_run(out, reference)


def test_killed_during_a_save_resumes_from_the_checkpoint_before(killed, reference, tiny_checkpoint, tmp_path,
                                                                 capsys):
  out = copy_run(killed["save"](), tmp_path / "run")
  done, partial = finalized(out), in_progress(out)
  assert len(partial) == 1 and partial_data(out) > 2**20  # killed while the arrays of a save were being written
  run_sft(config(tiny_checkpoint, out, resume=True))
  assert f"resumed from step {max(done)}" in capsys.readouterr().out
  assert_same_run(out, reference)  # no partial step used, none left


# --- 3. a corrupted newest checkpoint ----------------------------------------------------------------------------

def truncate_data(step_dir: Path) -> None:
  files = list((step_dir / "state").rglob("d/*"))
  biggest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)


def garble_metadata(step_dir: Path) -> None:
  (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {"oops')


@pytest.mark.parametrize("corrupt", [truncate_data, garble_metadata], ids=["data", "metadata"])
def test_a_corrupted_newest_checkpoint_is_skipped(corrupt, killed, reference, tiny_checkpoint, tmp_path, capsys):
  out = copy_run(killed["training"](), tmp_path / "run")
  previous, newest = finalized(out)
  corrupt(out / "checkpoints" / str(newest))
  run_sft(config(tiny_checkpoint, out, resume=True))
  printed = capsys.readouterr().out
  warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and f"checkpoint step {newest} " in warnings[0], printed
  assert f"resumed from step {previous}" in printed
  assert_same_run(out, reference)


# --- 4. a NaN loss ----------------------------------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_at_its_step(tiny_checkpoint, tmp_path, capsys):
  from astro_jax.train.loop import NonFiniteLoss
  out = tmp_path / "run"
  # lr 1e30: step 1's loss is that of the start weights, its update blows every weight up: step 2's loss is NaN.
  cfg = config(tiny_checkpoint, out, steps=4, save_every=1, keep=5, eval_every=0, **{"optimizer.lr": 1e30})
  with pytest.raises(NonFiniteLoss) as error:
    run_sft(cfg)
  assert [r["step"] for r in rows(out)] == [1] and math.isfinite(rows(out)[0]["loss"])
  assert listing(out) == []  # checkpoint 1 held the weights that gave step 2's NaN loss: deleted
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:  # what main does with it
    main.fail(error.value)
  assert exit_.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: step 2: loss is nan"), lines
  assert f"checkpoint 1 holds the weights that gave it and was deleted; training stopped, no checkpoint is left " \
         f"in {out / 'checkpoints'}" in lines[0]


# --- 5. refusals before any work ---------------------------------------------------------------------------------

@pytest.fixture()
def no_model(monkeypatch):
  from astro_jax import checkpoint

  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the error was found")
  monkeypatch.setattr(checkpoint, "load_model", refuse)


def held_run(reference: Path, out: Path) -> Path:
  """A run directory like the reference's (its settings and metrics; a stand-in checkpoints/)."""
  out.mkdir()
  for name in ("run_config.json", "metrics.jsonl"):
    shutil.copy2(reference / name, out / name)
  (out / "checkpoints" / "8").mkdir(parents=True)
  (out / "checkpoints" / "8" / "junk").write_text("not a checkpoint")
  return out


def snapshot(out: Path) -> dict[str, bytes]:
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_run_directory_is_refused_without_resume_or_overwrite(reference, tiny_checkpoint, tmp_path, no_model):
  out = held_run(reference, tmp_path / "run")
  before = snapshot(out)
  with pytest.raises(UserError, match="holds a run; pass --config.resume=true .* --config.overwrite=true"):
    run_sft(config(tiny_checkpoint, out))
  with pytest.raises(UserError, match=r"optimizer\.b1: 0\.9 -> now 0\.8"):  # (the lr may change: test_run_safety)
    run_sft(config(tiny_checkpoint, out, resume=True, **{"optimizer.b1": 0.8}))
  with pytest.raises(UserError, match=r"grad_accum: 1 -> now 2"):
    run_sft(config(tiny_checkpoint, out, resume=True, grad_accum=2))
  assert snapshot(out) == before


@pytest.mark.parametrize("values,key", [
    ({"grad_accum": 3}, "grad_accum"), ({"grad_accum": 0}, "grad_accum"), ({"loss_on": "tokens"}, "loss_on"),
    ({"seq_len": 512}, "seq_len"), ({"max_length": 300, "seq_len": 300}, "max_length"),
    ({"overlong": "cut"}, "overlong"), ({"eval_fraction": 0.0}, "eval_every"), ({"save_every": 0}, "save_every"),
    ({"resume": True, "overwrite": True}, "resume"), ({"optimizer.lr": float("nan")}, "optimizer.lr"),
])
def test_bad_values_are_named_before_any_work(values, key, tiny_checkpoint, tmp_path, no_model):
  out = tmp_path / "run"
  with pytest.raises(UserError, match=f"config key '{key}'") as error:
    run_sft(config(tiny_checkpoint, out, **values))
  assert len(str(error.value).splitlines()) == 1 and not out.exists()


BAD_ROWS = {
    "json": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"', "JSON"),
    "no_assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    "role": ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
             "role 'robot'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_data_is_named_by_file_and_line(kind, tiny_checkpoint, tmp_path, no_model):
  good = DATA.read_text().splitlines()
  bad, why = BAD_ROWS[kind]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(good[:2] + [bad] + good[2:]) + "\n")
  out = tmp_path / "run"
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:3: .*{why}"):
    run_sft(config(tiny_checkpoint, out, data=str(path)))
  assert not out.exists()


def test_an_empty_data_file_is_refused(tiny_checkpoint, tmp_path, no_model):
  empty, out = tmp_path / "empty.jsonl", tmp_path / "run"
  empty.write_text("")
  with pytest.raises(UserError, match=f"config key 'data' = '{re.escape(str(empty))}': the file is empty"):
    run_sft(config(tiny_checkpoint, out, data=str(empty)))
  empty.write_text("\n  \n")
  with pytest.raises(UserError, match=f"^{re.escape(str(empty))}: no examples"):
    run_sft(config(tiny_checkpoint, out, data=str(empty)))
  assert not out.exists()


def test_cli_refusal_is_one_line_with_status_2(tiny_checkpoint, tmp_path):
  """Through main: a bad row is named by file:line, exit status 2, nothing written."""
  out, bad = tmp_path / "run", tmp_path / "bad.jsonl"
  bad.write_text(DATA.read_text().splitlines()[0] + "\n\n" + BAD_ROWS["role"][0] + "\n")
  proc = subprocess.run(cli(tiny_checkpoint, out, data=bad), cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"error: {bad}:3: message 0 has role 'robot'"), proc.stderr
  assert not out.exists()


# --- 5 (overwrite) and 6. gradient accumulation -----------------------------------------------------------------

def test_grad_accum_gives_the_same_losses_and_overwrite_replaces_a_run(reference, tiny_checkpoint, tmp_path):
  out = held_run(reference, tmp_path / "run")  # another run's settings, metrics and a junk checkpoint
  run_sft(config(tiny_checkpoint, out, grad_accum=2, overwrite=True))
  assert json.loads((out / "run_config.json").read_text())["grad_accum"] == 2
  assert listing(out) == ["6", "8"] and not (out / "checkpoints" / "8" / "junk").exists()
  got, want = curve(out), curve(reference)
  assert [r[0] for r in got] == list(range(1, 9))
  for g, w in zip(got, want):
    assert g[0] == w[0] and g[3:5] == w[3:5]  # step, lr, tokens
    assert g[1] == pytest.approx(w[1], rel=1e-5) and g[2] == pytest.approx(w[2], rel=1e-5)
    assert (g[5] is None) == (w[5] is None) and (g[5] is None or g[5] == pytest.approx(w[5], rel=1e-5))
