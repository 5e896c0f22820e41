"""tools/plan_memory.py: the AOT memory plan of a train step on simulated CPU devices, and the big SFT configs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from astro_jax import main, stages
from tests.conftest import REPO

TOOL = os.path.join(REPO, "tools", "plan_memory.py")
# The tiny preset on 8 simulated devices, mesh fsdp=4 x tensor=2: rows over the 4 fsdp devices.
TINY = ("--config=configs/sft_tiny.py", "--preset=tiny", "--devices=8", "--config.mesh.fsdp=4",
        "--config.mesh.tensor=2", "--json")
RUNS = {
    "base": ("--config.batch_size=8",),
    "double": ("--config.batch_size=16",),
    "full": ("--config.batch_size=16", "--config.model.remat=full", "--config.accelerator=tpu_v5e"),
    "bad_devices": ("--config.batch_size=8", "--devices=6"),
    "bad_accelerator": ("--config.accelerator=tpu_v9",),
}


def _args(name: str) -> list[str]:
  """The tiny flags, a flag of the run replacing the tiny one of the same name."""
  own = {a.split("=")[0] for a in RUNS[name]}
  return [sys.executable, TOOL, *(a for a in TINY if a.split("=")[0] not in own), *RUNS[name]]


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
  """All runs at once (each is a process: the device count is fixed when JAX's backend starts)."""
  env = {**os.environ, "XLA_FLAGS": ""}
  procs = {name: subprocess.Popen(_args(name), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for name in RUNS}
  out = {}
  for name, p in procs.items():
    stdout, stderr = p.communicate(timeout=240)
    out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
  return out


def _plan(runs, name: str) -> dict:
  proc = runs[name]
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout  # exactly one JSON object
  return json.loads(lines[0])


def _tiny_param_bytes(fsdp: int, tensor: int) -> int:
  """By hand: each weight of the tiny preset (V=512 D=64 L=2 N=4 K=2 H=16 F=128, tied head) with TRAIN_RULES
  (embed dim over fsdp; vocab, heads and mlp over tensor; norms and layers whole), float32."""
  V, D, L, N, K, H, F = 512, 64, 2, 4, 2, 16, 128
  split = lambda size, ways: size // ways if size % ways == 0 else size
  d, v = split(D, fsdp), split(V, tensor)
  shards = {"embed": (v, d), "attn_norm": (L, D), "wq": (L, d, split(N, tensor), H),
            "wk": (L, d, split(K, tensor), H), "wv": (L, d, split(K, tensor), H), "wo": (L, split(N, tensor), H, d),
            "mlp_norm": (L, D), "w_gate": (L, d, split(F, tensor)), "w_up": (L, d, split(F, tensor)),
            "w_down": (L, split(F, tensor), d), "final_norm": (D,)}
  return 4 * sum(math.prod(s) for s in shards.values())


def test_json_fields_and_state_bytes_match_a_hand_computation(runs):
  r = _plan(runs, "base")
  from astro_jax.model.config import PRESETS
  tiny = PRESETS["tiny"]
  assert (tiny.vocab_size, tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.n_kv_heads, tiny.head_dim,
          tiny.d_ff, tiny.tie_embeddings) == (512, 64, 2, 4, 2, 16, 128, True)  # the shapes the hand count assumes
  assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert r["accelerator"] == "" and r["capacity_bytes"] is None and r["fits"] is None
  b = r["bytes_per_device"]
  assert all(isinstance(b[k], int) for k in ("params", "optimizer", "temporaries", "total"))
  assert b["params"] == _tiny_param_bytes(4, 2) == 54528
  # Adam's mu and nu are sharded like the params (float32); the rest are int32 step counters.
  assert 0 <= b["optimizer"] - 2 * b["params"] <= 16
  assert b["batch"] == 5 * (8 // 4) * 128 * 4  # 5 [B, T] inputs of 4 bytes, 2 rows per device
  assert b["total"] == b["params"] + b["optimizer"] + b["temporaries"] + b["batch"] + b["other"]
  assert b["temporaries"] > 0 and 0 <= b["other"] < 4096
  assert r["compile_s"] > 0 and r["batch"]["rows_per_device_per_micro_batch"] == 2


def test_more_rows_need_more_temporaries_and_remat_needs_fewer(runs):
  base, double, full = (_plan(runs, k)["bytes_per_device"] for k in ("base", "double", "full"))
  assert double["params"] == base["params"] and double["optimizer"] == base["optimizer"]
  assert double["temporaries"] > base["temporaries"]
  assert double["temporaries"] > double["params"] + double["optimizer"]  # activations dominate here
  assert full["temporaries"] < double["temporaries"]


def test_capacity_and_verdict(runs):
  r = _plan(runs, "full")
  assert r["accelerator"] == "tpu_v5e" and r["capacity_bytes"] == 16 * 2**30 and r["fits"] is True
  assert r["headroom_bytes"] == r["capacity_bytes"] - r["bytes_per_device"]["total"]


@pytest.mark.parametrize("name,needle", [("bad_devices", "needs 8 devices"),
                                         ("bad_accelerator", "'accelerator'")])
def test_bad_input_is_one_error_line_and_exit_2(runs, name, needle):
  proc = runs[name]
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert proc.stdout == ""


@pytest.mark.parametrize("spec", ["configs/sft_8b.py", "configs/sft_8b.py:tpu_v5p", "configs/sft_8b.py:h100",
                                  "configs/sft_70b.py", "configs/sft_70b.py:tpu_v5p", "configs/sft_70b.py:h100",
                                  "configs/sft_70b.py:h100_64"])
def test_big_sft_configs_are_valid_apart_from_their_inputs(spec):
  config = main.load_config_file(os.path.join(REPO, spec))
  main.validate(config)
  assert config.checkpoint == "" and config.data == "" and config.seq_len == 8192 and config.steps == 0
  target = spec.partition(":")[2] or "tpu_v5p"
  assert config.accelerator == ("h100" if target.startswith("h100") else target)
  mesh = config.mesh
  assert -1 not in (mesh.data, mesh.fsdp, mesh.tensor)  # the device count follows from the config
  rows_per_shard = config.batch_size // config.grad_accum // (mesh.data * mesh.fsdp)
  assert config.batch_size // config.grad_accum % (mesh.data * mesh.fsdp) == 0 and rows_per_shard in (1, 2)
  probe = config.copy_and_resolve_references()
  probe.checkpoint, probe.data, probe.output_dir = "CKPT", "sft.jsonl", "RUN"
  stages.get("sft").check(probe)
  with pytest.raises(main.ConfigError, match="unknown target"):
    main.load_config_file(os.path.join(REPO, spec.partition(":")[0] + ":tpu_v9"))
