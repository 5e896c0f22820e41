"""tools/plan_memory.py: the AOT memory plan of a train step (and the RL sampler) on simulated CPU devices, and the
big SFT and RL configs."""
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
    # rl: 16 prompts x G 8 = 128 rows of 8 + 20 tokens; a bf16 sampler of 128 rows, eval budget 40 > 20; a KL term
    "rl": ("--config=configs/rl_tiny.py", "--config.sampler.dtype=bfloat16", "--config.sampling.max_new_tokens=20",
           "--config.eval.every=5", "--config.eval.benchmarks=math500", "--config.eval.max_new_tokens=40",
           "--config.loss.beta=0.1", "--config.model.dtype=bfloat16"),
    # a pipeline: its sft and rl steps, composed as the pipeline runs them
    "pipeline": ("--config=configs/pipeline_tiny.py", "--config.sft.batch_size=8", "--config.sft.seq_len=128"),
}


def _args(name: str) -> list[str]:
  """The tiny flags, a flag of the run replacing the tiny one of the same name (--config first: its overrides follow
  it)."""
  own = {a.split("=")[0] for a in RUNS[name]}
  args = [*(a for a in TINY if a.split("=")[0] not in own), *RUNS[name]]
  return [sys.executable, TOOL, *sorted(args, key=lambda a: not a.startswith("--config="))]


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


def test_a_pipeline_config_plans_its_sft_and_rl_steps(runs):
  r = _plan(runs, "pipeline")
  assert r["stage"] == "pipeline" and [p["stage"] for p in r["plans"]] == ["sft", "rl"]
  sft, rl = r["plans"]
  base = _plan(runs, "base")  # sft_tiny with the same rows, length, preset and mesh: the same step
  assert sft["bytes_per_device"]["params"] == base["bytes_per_device"]["params"] == _tiny_param_bytes(4, 2)
  assert sft["batch"] == base["batch"]
  assert rl["batch"]["seq_len"] == 8 + 1 and "sampler" in rl  # pipeline_tiny's rl: 8 prompt + 1 new token


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


def test_rl_plan_counts_the_sampler_and_its_kv_cache_by_hand(runs):
  r = _plan(runs, "rl")
  b, p, s = r["bytes_per_device"], r["phases"], r["sampler"]
  L, K, H, V, D, F, N = 2, 2, 16, 512, 64, 128, 4  # the tiny preset (checked above)
  # the cache: 128 rows over fsdp 4, kv heads over tensor 2; slots = bucket(8) + bucket(max(20, 40)) = 16 + 64; bf16
  assert (s["max_batch"], s["rows_per_batch_shard"], s["prompt_slots"], s["new_slots"]) == (128, 32, 16, 64)
  assert b["kv_cache"] == L * 2 * (128 // 4) * (K // 2) * H * (16 + 64) * 2 == 327680
  # the sampler's copy: bf16, split over tensor only (vocab, heads, mlp), per layer with q/k/v fused
  per_layer = D + D * (K // 2) * (N // K + 2) * H + (N // 2) * H * D + D + 3 * D * (F // 2)
  assert b["sampler_weights"] == 2 * (V // 2 * D + L * per_layer + D)
  assert b["reference"] == b["params"] // 2  # the start model in bf16, sharded as the float32 params
  assert b["batch"] == 4 * (7 * 32 * 28 + 32)  # 7 [rows, T] inputs (with ref_logprobs) + advantages, 32 rows a device
  resident = b["params"] + b["optimizer"] + b["sampler_weights"] + b["reference"]
  assert p == {"train_step": resident + b["temporaries"] + b["batch"] + b["other"],
               "weight_sync": resident + b["weight_sync_temporaries"],
               "sampling": resident + b["kv_cache"] + b["sampling_temporaries"]}
  assert b["total_rl"] == max(p.values()) and b["total_rl_upper"] == p["train_step"] + b["kv_cache"]
  assert b["total"] == b["params"] + b["optimizer"] + b["temporaries"] + b["batch"] + b["other"]  # as for sft
  assert b["sampling_temporaries"] > 0 and b["weight_sync_temporaries"] > 0
  assert r["batch"]["batch_size"] == 128 and r["batch"]["seq_len"] == 28 and r["rl"]["eval_max_new_tokens"] == 40
  assert r["fits"] is None and r["fits_upper"] is None


RL_SPECS = ["configs/rl_8b.py", "configs/rl_8b.py:tpu_v5p", "configs/rl_8b.py:h100", "configs/rl_70b.py",
            "configs/rl_70b.py:tpu_v5p", "configs/rl_70b.py:h100", "configs/rl_70b.py:h100_128"]


@pytest.mark.parametrize("spec", RL_SPECS)
def test_big_rl_configs_are_valid_apart_from_their_inputs(spec):
  from astro_jax.model.config import PRESETS
  from astro_jax.stages import rl
  config = main.load_config_file(os.path.join(REPO, spec))
  main.validate(config)
  assert config.checkpoint == "" and config.prompts == "" and config.output_dir
  assert config.group_size == 4 and config.loss.beta == 0 and config.sampler.dtype == "bfloat16"
  target = spec.partition(":")[2] or "tpu_v5p"
  assert config.accelerator == ("h100" if target.startswith("h100") else target)
  mesh = config.mesh
  assert -1 not in (mesh.data, mesh.fsdp, mesh.tensor)
  shards = mesh.data * mesh.fsdp
  micro = rl.rows_per_update(config) // config.grad_accum
  assert micro % shards == 0 and micro // shards == 1  # one row per batch shard per micro-batch
  assert config.sampler.max_batch % shards == 0 and config.sampler.max_batch % config.group_size == 0
  T = rl.seq_len(config)
  assert T % config.model.attention_block == 0  # else blocked attention falls back to whole attention
  assert T <= PRESETS[_plan_preset(spec)].max_position_embeddings
  probe = config.copy_and_resolve_references()
  probe.checkpoint, probe.prompts = "CKPT", "prompts.jsonl"
  rl.check(probe)
  with pytest.raises(main.ConfigError, match="unknown target"):
    main.load_config_file(os.path.join(REPO, spec.partition(":")[0] + ":tpu_v9"))


def _plan_preset(spec: str) -> str:
  import importlib.util
  module_spec = importlib.util.spec_from_file_location("_plan_preset", os.path.join(REPO, spec.partition(":")[0]))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.PLAN_PRESET


@pytest.mark.parametrize("spec", RL_SPECS)
def test_recorded_rl_plans_match_the_configs_and_fit(spec):
  """benchmarks/results/plan_memory.json holds the plan of each shipped RL target, measured with its current
  settings, fitting with >= 10% headroom (re-measure with tools/plan_memory.py after changing a config)."""
  from astro_jax.stages import rl
  config = main.load_config_file(os.path.join(REPO, spec))
  name = spec if spec.partition(":")[2] not in ("", "tpu_v5p") else spec.partition(":")[0]
  with open(os.path.join(REPO, "benchmarks", "results", "plan_memory.json")) as f:
    rows = [r for r in json.load(f) if r["config"] == name and not r.get("overrides")]
  assert len(rows) == 1, name
  r = rows[0]
  assert r["mesh"] == {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
  assert (r["batch"]["batch_size"], r["batch"]["grad_accum"], r["batch"]["seq_len"]) == (
      rl.rows_per_update(config), config.grad_accum, rl.seq_len(config))
  assert r["sampler"]["max_batch"] == config.sampler.max_batch and r["accelerator"] == config.accelerator
  assert r["model"]["remat"] == config.model.remat and r["rl"]["batch_prompts"] == config.batch_prompts
  assert r["fits"] is True and r["headroom_bytes"] >= 0.1 * r["capacity_bytes"]
