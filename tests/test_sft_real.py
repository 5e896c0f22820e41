"""SFT on real weights and real processes.

- The real SmolLM2-135M-Instruct fine-tuned on a few real mcts traces: its exported HF checkpoint, loaded by
  transformers, has a lower PyTorch loss on those traces than the base model, equal to ours of the trained state.
- The tiny model trained by two processes (jax.distributed, gloo collectives on CPU, 4 simulated devices each),
  by one process with 8 devices on the same fsdp x tensor mesh, and by one device: the same metrics, checkpoints
  and export; only process 0 writes the run directory.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from astro_jax.train import data as train_data
from tests.conftest import REPO, stage_config

DATA = Path(REPO) / "docs" / "smollm2_run" / "sft.jsonl"
RTOL = 1e-5  # metrics of runs on other meshes / process counts


def tokenizer_of(ckpt: Path):
  from astro_jax import checkpoint
  from astro_jax.tokenizer import Tokenizer
  eos = checkpoint.inspect_checkpoint(ckpt).eos_token_ids
  return Tokenizer.load(checkpoint.tokenizer_dir_of(ckpt), extra_eos_ids=eos)


def metric_rows(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(rows: list[dict], reference: list[dict], what: str) -> None:
  assert [r["step"] for r in rows] == [r["step"] for r in reference], what
  assert [r["tokens"] for r in rows] == [r["tokens"] for r in reference], what
  for key in ("loss", "grad_norm", "lr"):
    np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in reference], rtol=RTOL, atol=0,
                               err_msg=f"{what}: {key}")


def assert_same_weights(weights: dict, reference: dict, start: dict, what: str) -> None:
  """Each tensor equal to the reference run's up to 1e-4 of what training moved it (Adam's normalised update
  amplifies float rounding in entries whose gradient is ~0, so an absolute bound on the weights says little)."""
  assert weights.keys() == reference.keys() == start.keys(), what
  for key, ref in reference.items():
    ref, got, moved = np.asarray(ref), np.asarray(weights[key]), np.asarray(ref) - np.asarray(start[key])
    assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(moved), (what, key, np.abs(got - ref).max())
    assert np.abs(got - ref).max() <= 1e-4, (what, key, np.abs(got - ref).max())


def restore_latest(config, run_dir: Path) -> tuple[int, dict, dict]:
  """(step, train state, data state) of a run's newest checkpoint, restored on this process's devices."""
  from astro_jax import checkpoint
  from astro_jax.sharding import Sharder, make_mesh
  from astro_jax.train import checkpoints, loop
  cfg = checkpoint.inspect_checkpoint(config.checkpoint)
  sharder = Sharder.create(make_mesh(1, -1, 1), "train")
  trainer = loop.Trainer.create(config, cfg, sharder, config.steps)
  ckpts = checkpoints.Checkpoints(run_dir / "checkpoints", keep=config.keep, async_save=False)
  try:
    restored = ckpts.restore_latest(trainer.abstract_state())
  finally:
    ckpts.close()
  assert restored is not None, f"no checkpoint restores in {run_dir}"
  return restored


# --- the real SmolLM2 --------------------------------------------------------------------------------------------

def torch_losses(model_dir: Path, examples: list[train_data.Example]) -> list[tuple[float, int]]:
  """(sum of next-token NLL over the loss-mask targets, number of targets) of each example, one at a time, by the
  transformers model of `model_dir` (fp32, eager attention): nothing of ours but the token ids and masks."""
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
  out = []
  with torch.no_grad():
    for ex in examples:
      ids = torch.tensor(ex.tokens, dtype=torch.long)[None]
      logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
      target_logp = logp.gather(-1, ids[0, 1:, None])[:, 0]
      mask = torch.tensor(ex.loss_mask[1:])
      out.append((float(-(target_logp * mask).sum()), int(mask.sum())))
  return out


def our_losses(config, run_dir: Path, examples: list[train_data.Example]) -> list[tuple[float, int]]:
  """The same per-example sums from our model with the params of the run's last checkpoint (one example a row)."""
  import jax
  from astro_jax import checkpoint
  from astro_jax.model.config import Execution
  from astro_jax.train import losses
  step, state, _ = restore_latest(config, run_dir)
  assert step == config.steps
  cfg = checkpoint.inspect_checkpoint(config.checkpoint)
  rows = [train_data.pack([ex], config.seq_len, 0)[0] for ex in examples]
  batch = {k: np.stack([r[k] for r in rows]) for k in train_data.ROW_KEYS}
  logp_BT, _ = jax.jit(lambda p, b: losses.sequence_logprobs(cfg, Execution(), None, p, b, chunk=config.loss_chunk))(
      state["params"], batch)
  sums = -(np.asarray(logp_BT, np.float64) * batch["weights"]).sum(axis=1)
  return [(float(s), int(w)) for s, w in zip(sums, batch["weights"].sum(axis=1))]


def mean(sums: list[tuple[float, int]]) -> float:
  return sum(s for s, _ in sums) / sum(n for _, n in sums)


def test_sft_of_smollm2_exports_a_model_transformers_scores_lower(tmp_path, smollm2_dir):
  """Two full fine-tuning steps of SmolLM2-135M on its four shortest real traces (two packed rows of 512
  tokens: every step sees all four; two steps already take the loss from ~2.07 to ~1.4). The HF export, scored by transformers one trace at a time, has a clearly
  lower loss than the base model and equals our loss of the last checkpoint's params; the first step's packed
  training loss equals transformers' unpacked loss of the base model."""
  from astro_jax import stages
  tok = tokenizer_of(smollm2_dir)
  everything, _ = train_data.read_examples(DATA, tok, max_length=4096)
  chosen = {ex.id for ex in sorted(everything, key=lambda ex: len(ex.tokens))[:4]}
  lines = [line for line in DATA.read_text().splitlines() if json.loads(line)["id"] in chosen]
  subset = tmp_path / "four.jsonl"
  subset.write_text("\n".join(lines) + "\n")
  examples, counts = train_data.read_examples(subset, tok, max_length=512)
  assert len(examples) == 4 and counts.truncated == 0
  assert len(train_data.pack(examples, 512, 0)) == 2  # any three of them exceed 512 tokens

  out = tmp_path / "run"
  config = stage_config("sft", checkpoint=str(smollm2_dir), data=str(subset), output_dir=str(out), seq_len=512,
                        batch_size=2, steps=2, save_every=2, keep=1, async_checkpoint=False, compile_cache_dir="",
                        **{"optimizer.lr": 3e-5, "optimizer.schedule": "constant", "optimizer.warmup_fraction": 0.0})
  stages.get("sft").run(config)
  rows = metric_rows(out)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(r["tokens"] == counts.target_tokens for r in rows)  # all four traces in every step
  assert rows[-1]["loss"] < rows[0]["loss"]

  base = torch_losses(smollm2_dir, examples)
  trained = torch_losses(out / "hf", examples)
  ours = our_losses(config, out, examples)
  print(f"loss on the 4 traces: base {mean(base):.4f} (first train step {rows[0]['loss']:.4f}), "
        f"trained: transformers {mean(trained):.4f}, ours {mean(ours):.4f}")
  assert [n for _, n in base] == [n for _, n in trained] == [n for _, n in ours] == [int(e.loss_mask.sum())
                                                                                      for e in examples]
  assert mean(trained) < 0.9 * mean(base)
  for (t, n), (o, _) in zip(trained, ours):  # each trace, not only the mean
    assert abs(t - o) <= 1e-3 * o, (t / n, o / n)
  assert mean(trained) == pytest.approx(mean(ours), rel=1e-3)
  assert rows[0]["loss"] == pytest.approx(mean(base), rel=1e-3)  # packed, in the train step vs unpacked torch


# --- the tiny model: processes, devices, meshes ------------------------------------------------------------------

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tree_of(run_dir: Path) -> set[str]:
  """Relative paths of the files a run wrote, but inside the Orbax step directories (each process writes its own
  shards there by design) and the TensorBoard event file (its name holds the time)."""
  out = set()
  for p in run_dir.rglob("*"):
    rel = p.relative_to(run_dir)
    if p.is_file() and rel.parts[0] not in ("checkpoints", "tensorboard"):
      out.add(str(rel))
  return out


def test_two_processes_eight_devices_and_one_device_train_alike(tmp_path, tiny_checkpoint):
  """configs/sft_tiny.py on the real traces: two processes (4 CPU devices each, gloo) and one process (8 CPU
  devices) on a fsdp=4 x tensor=2 mesh, and one device: the same losses, gradient norms, checkpoints and HF export.
  Process 0 alone writes the run directory; the two-process checkpoint restores on one device."""
  from safetensors.numpy import load_file

  from astro_jax import checkpoint, main
  base = [sys.executable, "-m", "astro_jax.main", f"--config={REPO}/configs/sft_tiny.py",
          f"--config.checkpoint={tiny_checkpoint}", f"--config.data={DATA}"]
  mesh = ["--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
  port = free_port()
  jobs = {"one_device": ([], 1, ["--config.mesh.fsdp=-1"]), "eight_devices": ([], 8, mesh)}
  jobs.update({f"process_{i}": (["--config.distributed.enabled=true", "--config.distributed.num_processes=2",
                                 f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                 f"--config.distributed.process_id={i}"], 4, mesh) for i in range(2)})
  runs = {"one_device": tmp_path / "one", "eight_devices": tmp_path / "eight", "process_0": tmp_path / "two",
          "process_1": tmp_path / "two"}
  procs = {}
  for name, (extra, devices, mesh_args) in jobs.items():  # all at once: the compiles overlap
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    procs[name] = subprocess.Popen(base + mesh_args + extra + [f"--config.output_dir={runs[name]}"], cwd=REPO,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  outs = {name: p.communicate(timeout=600) for name, p in procs.items()}
  for name, p in procs.items():
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{outs[name][1][-4000:]}"

  one, eight, two = (tmp_path / n for n in ("one", "eight", "two"))
  reference = metric_rows(one)
  assert [r["step"] for r in reference] == list(range(1, 9)) and reference[-1]["loss"] < reference[0]["loss"]
  assert_same_metrics(metric_rows(eight), reference, "8 devices vs 1")
  assert_same_metrics(metric_rows(two), reference, "2 processes vs 1 device")
  assert_same_metrics(metric_rows(two), metric_rows(eight), "2 processes vs 1 process, 8 devices")

  # Process 0 wrote the run directory once: the files of the one-process run, no second event file, no leftovers.
  assert tree_of(two) == tree_of(eight) == tree_of(one)
  assert {"metrics.jsonl", "run_config.json", "data_counts.json", "loss.png", "hf/model.safetensors"} <= tree_of(two)
  assert len(list((two / "tensorboard").iterdir())) == 1
  for name in ("run_config.json", "data_counts.json"):
    assert (two / name).read_text() == (one / name).read_text()
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["4", "8"]
  start = load_file(str(Path(tiny_checkpoint) / "model.safetensors"))
  weights = {n: load_file(str(d / "hf" / "model.safetensors"))
             for n, d in (("one", one), ("eight", eight), ("two", two))}
  for name in ("eight", "two"):
    assert_same_weights(weights[name], weights["one"], start, f"hf export, {name} vs one device")

  # The two-process checkpoint (each process wrote its shards) restores on one device: the state of the run.
  config = main.load_config_file(f"{REPO}/configs/sft_tiny.py")
  config.checkpoint, config.data = str(tiny_checkpoint), str(DATA)
  (step_two, state_two, data_two), (step_one, state_one, data_one) = (restore_latest(config, d) for d in (two, one))
  assert step_two == step_one == 8 and data_two == data_one
  start = checkpoint.load_model(tiny_checkpoint).weights()
  assert_same_weights(state_two["params"], state_one["params"], start, "checkpoint 8, two processes vs one device")
