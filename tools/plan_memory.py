#!/usr/bin/env python3
r"""AOT memory plan of a training config: the per-device bytes of its train step, without any accelerator.

  python tools/plan_memory.py --config=configs/sft_8b.py[:TARGET] [--devices=N] [--preset=NAME] [--json] \
      [--config.KEY=VALUE ...]            # also configs/rl_8b.py, rl_70b.py (stage rl: the sampler too), and
                                          # configs/pipeline_8b.py: its sft and rl steps, one table each

The config is read as `python -m astro_jax.main` reads it (the same flag, `path.py:arg` targets, overrides and
checks; checkpoint, data, prompts and output_dir may stay empty). The train step the stage would run
(`Trainer.create`, for rl `rl.make_trainer`: the optimizer, the state shardings, the jitted step with its loss,
remat and gradient accumulation) is lowered for an abstract state and batch (ShapeDtypeStructs with their
shardings: nothing is allocated) on N simulated CPU devices and compiled; XLA's buffer assignment then gives the
bytes each device needs:

  params       the trained weights: sum over weights of the shard's bytes (NamedSharding.shard_shape)
  optimizer    the optimizer state (Adam moments, counters), the same way
  temporaries  XLA's temp allocation (memory_analysis().temp_size_in_bytes): activations kept for the backward
               pass, gradients and their accumulator, the update's intermediates; already packed by XLA's reuse
  batch        the step's input rows on this device
  other        outputs that do not alias a donated input (metrics; a state copy if donation failed) and the step
  total        the sum: the live peak as XLA:CPU plans it (the state is donated: outputs reuse its buffers)

Stage rl: one optimizer update is rows_per_update = batch_prompts x group_size / minibatches rows of seq_len =
max_prompt_tokens + sampling.max_new_tokens tokens, or with train_tokens > 0 packed_rows x grad_accum rows of
train_tokens (a step that spills runs more micro-batches of the same size: the peak is the same) (the RL batch
inputs: rollouts.rl_batch_axes). On the same mesh the sampler keeps its own weight copy and, while it samples, a KV cache:

  sampler_weights          its copy in sampler.dtype, per layer, q/k/v fused, with the "sample" rules (split over
                           tensor only): the outputs of its weight-sync program, lowered from the trainer's params
  kv_cache                 the cache of its largest program: layers x 2 x rows x slots x kv_heads x head_dim x bytes
                           of sampler.cache_dtype (rows = sampler.max_batch over data x fsdp, kv heads over tensor;
                           slots = bucket(max_prompt_tokens) + bucket(the larger of the rollout and eval budgets));
                           the shape and shardings of the prefill program's output
  sampling_temporaries     the larger of prefill's (temporaries, logits) and decode's (temporaries, inputs, outputs
                           other than the donated cache). Both are lowered in float32, weights and cache: XLA:CPU has
                           no bfloat16 dots or in-place bfloat16 cache updates, so a bfloat16 program there holds
                           float32 copies of every weight (hoisted out of the decode loop) and of the cache (~30 GiB at
                           8B), which TPU and GPU never allocate; float32 activations are at most twice the bf16 ones
  weight_sync_temporaries  the weight-sync program's (the cast and reshard in update_weights; XLA gathers the
                           float32 params before the cast)
  reference                the frozen start model (loss.beta > 0), in model.dtype, sharded as the params

What is live when: the trainer state and the sampler weights always (resident); then one of three phases: the train
step (+ its temporaries, batch, other), the weight sync (+ its temporaries: the old copy is freed first), sampling
(+ KV cache + sampling temporaries; the cache is dropped when decode returns, before the step). phases gives each
phase's total; total_rl = the largest, and for rl `fits` and `headroom_bytes` are on total_rl; total_rl_upper (and
fits_upper) adds the KV cache to the train step, as if both were live at once. The eval's programs are the same with
the eval budget (counted in slots); an eval prompt longer than max_prompt_tokens needs a larger bucket.

Devices: N = --devices, else the product of the config's mesh axes (an axis of -1 needs --devices). The tool sets
JAX_PLATFORMS=cpu first and XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX's backend starts (the
config file imports jax; XLA reads the flag when the CPU backend is created). LLVM's optimisation is switched off
(`--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true`): it only shapes machine code, never
the buffer assignment, and halves compile times.

Architecture (first that applies): --preset=NAME (astro_jax.model.config.PRESETS); the config's checkpoint, when
it is set and exists (its config.json or model_config.json, no weights read); the config file's module-level
`PLAN_PRESET = "llama3.1_8b"` (big configs keep checkpoint "" because no such checkpoint is on the planning machine).

Capacity: config.accelerator (GiB per device): tpu_v5p 95, tpu_v5e 16, tpu_v4 32, h100 80, h200 141, a100 80;
"" = unknown (fits is null). Verdict: fits when total <= capacity, with the headroom.

What the plan cannot see: it is XLA:CPU's buffer assignment of the same program. On TPU/GPU, XLA fuses, lays out
and schedules differently (e.g. XLA:CPU may keep float32 copies where a TPU computes in bfloat16, or fuse less), so
temporaries there differ, either way; collective buffers and async-collective overlap (all-gather prefetch of the
next layer's weights under FSDP) are not accounted; nor is allocator fragmentation, nor the runtime's reserve (XLA
GPU preallocates XLA_PYTHON_CLIENT_MEM_FRACTION = 75% of the memory by default; TPU keeps some HBM for itself), nor
other programs resident at the same time (the eval step, a checkpoint being written). Keep ~10-20% headroom.

--json prints exactly one JSON object on stdout: {"devices", "accelerator", "bytes_per_device": {"params",
"optimizer", "temporaries", "batch", "other", "total"}, "capacity_bytes", "fits", ...}; for rl also bytes_per_device's
sampler_weights, kv_cache, sampling_temporaries, weight_sync_temporaries, reference, total_rl, total_rl_upper, and
"phases", "sampler" (its shapes and programs' memory analyses), "rl" (the batch), "fits_upper". Bad input (unknown
preset or accelerator, a mesh that does not match the devices, a bad config value) is one `error: ...` line, exit 2.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ["JAX_PLATFORMS"] = "cpu"  # before anything imports jax: the plan never touches an accelerator

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from absl import flags  # noqa: E402

from astro_jax import main as astro_main  # noqa: E402  (defines the --config flag exactly as the entry point does)
from astro_jax.errors import ConfigError, UserError  # noqa: E402
from astro_jax.train.metrics import ACCELERATOR_MEMORY_GIB  # noqa: E402

GIB = 2**30
PLAN_STEPS = 1000  # the schedule's length does not change any buffer
FAST_CODEGEN = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

_DEVICES = flags.DEFINE_integer("devices", 0, "simulated devices (0: the product of the config's mesh axes)")
_PRESET = flags.DEFINE_string("preset", "", "architecture preset (default: the checkpoint's, else PLAN_PRESET)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of the table")


# --- inputs -------------------------------------------------------------------------------------------------------

def device_count(mesh: dict[str, int], devices: int) -> int:
  """The number of devices to simulate: `devices` (checked against the mesh) or the mesh's product."""
  sizes = list(mesh.values())
  shown = " ".join(f"{k}={v}" for k, v in mesh.items())
  fixed = math.prod(s for s in sizes if s != -1)
  if devices < 0:
    raise ConfigError(f"--devices={devices}: must be >= 1 (0: the mesh's product)")
  if -1 in sizes:
    if not devices:
      raise ConfigError(f"mesh {shown} has an axis of -1: pass --devices=N")
    if devices % fixed:
      raise ConfigError(f"mesh {shown} does not divide --devices={devices}")
    return devices
  if devices and devices != fixed:
    raise ConfigError(f"mesh {shown} needs {fixed} devices, --devices={devices}")
  return fixed


def set_xla_device_count(n: int) -> None:
  """XLA_FLAGS with exactly one host device count (= n) and the fast-codegen flags, the user's other flags kept."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  extra = [f for f in FAST_CODEGEN if f.split("=")[0] not in {k.split("=")[0] for k in kept}]
  os.environ["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={n}", *extra])


def module_constant(spec: str, name: str) -> Any:
  """A module-level constant of a config file (`path.py[:arg]`), None when it has none."""
  path = spec.partition(":")[0]
  module_spec = importlib.util.spec_from_file_location("_astro_plan_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return getattr(module, name, None)


def architecture(config, spec: str, preset_name: str):
  """(ModelConfig, where it came from): --preset, else the checkpoint's config, else the file's PLAN_PRESET."""
  from astro_jax.model import config as model_config
  name = preset_name
  if not name and config.get("checkpoint") and Path(config.checkpoint).exists():
    from astro_jax.stages import common
    _, cfg = common.inspect_checkpoint(config)
    return cfg, f"checkpoint {config.checkpoint}"
  source = "--preset"
  if not name:
    name, source = module_constant(spec, "PLAN_PRESET"), "PLAN_PRESET"
    if config.get("checkpoint"):
      source += f"; checkpoint {config.checkpoint} is not on this machine"
  if not name:
    raise ConfigError(f"{spec}: no architecture: pass --preset=NAME (one of {', '.join(model_config.PRESETS)}), "
                      f"set --config.checkpoint to an existing checkpoint, or give the config file a module-level "
                      f"PLAN_PRESET")
  if name not in model_config.PRESETS:
    raise ConfigError(f"{source}: unknown preset {name!r}; known: {', '.join(model_config.PRESETS)}")
  return model_config.PRESETS[name], f"preset {name} ({source})"


def check_config(config) -> None:
  """The stage's own checks, with the keys only a real run needs (checkpoint, data / prompts, output_dir) filled
  in."""
  from astro_jax import stages
  if "optimizer" not in config or "loss_chunk" not in config:
    raise ConfigError(f"stage {config.stage!r} has no train step to plan (no optimizer / loss_chunk keys)")
  probe = config.copy_and_resolve_references()
  for key in ("checkpoint", "data", "prompts", "output_dir"):
    if key in probe and not probe[key]:
      probe[key] = "<not needed by the plan>"
  stages.get(probe.stage).check(probe)


def capacity(accelerator: str) -> int | None:
  if not accelerator:
    return None
  if accelerator not in ACCELERATOR_MEMORY_GIB:
    raise ConfigError(f"config key 'accelerator' = {accelerator!r}: unknown; known: "
                      f"{', '.join(ACCELERATOR_MEMORY_GIB)} "
                      f"(\"\": no capacity, no verdict)")
  return int(ACCELERATOR_MEMORY_GIB[accelerator] * GIB)


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or platform.machine()


# --- the plan -----------------------------------------------------------------------------------------------------

def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, as XLA allocates it)."""
  import jax
  import numpy as np
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


FLOAT_INPUTS = ("weights", "old_logprobs", "advantages", "ref_logprobs")  # float32 batch inputs; the others int32


def abstract_batch(batch_axes: dict[str, tuple[str, ...]], sharder, rows: int, length: int) -> dict:
  """The step's inputs as sharded ShapeDtypeStructs: [rows, length] for ("batch", "seq") inputs, [rows] for
  per-row ones (RL's advantages)."""
  import jax
  import jax.numpy as jnp
  dims = {"batch": rows, "seq": length}
  return {k: jax.ShapeDtypeStruct(tuple(dims[a] for a in axes), jnp.float32 if k in FLOAT_INPUTS else jnp.int32,
                                  sharding=sharder.named(axes)) for k, axes in batch_axes.items()}


def _with_shardings(out_info: Any, shardings: Any) -> Any:
  """A lowered program's outputs as ShapeDtypeStructs with the shardings its compiled version gave them."""
  import jax
  return jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), out_info, shardings)


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
          "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}


class _PlanTokenizer:
  """What the sampler's programs need of a tokenizer (its EOS ids and pad id)."""

  def __init__(self, cfg):
    self.eos_ids, self.pad_id = tuple(cfg.eos_token_ids or ()), 0


def sampler_plan(config, trainer, state: dict, mesh) -> dict:
  """The RL sampler on the trainer's mesh: its weight copy (the weight-sync program, lowered from the trainer's
  abstract params), and the prefill and decode programs of its largest batch (sampler.max_batch rows, the bucketed
  prompt + response budget in slots), lowered in float32 (see the module doc); the cache's bytes in its dtype."""
  import jax
  import jax.numpy as jnp

  from astro_jax import sampler as sampler_lib
  from astro_jax.sharding import Sharder

  sharder = Sharder.create(mesh, "sample")
  S, E = config.sampler, config.eval
  cache_dtype = S.cache_dtype or S.dtype
  make = lambda dtype, cache: sampler_lib.Sampler(trainer.cfg, _PlanTokenizer(trainer.cfg), sharder=sharder,
                                                  max_batch=S.max_batch, dtype=dtype, cache_dtype=cache)
  sampler, probe = make(S.dtype, cache_dtype), make("float32", "float32")
  t0 = time.perf_counter()
  lowered = sampler._prepare_weights.lower(state["params"])
  compiled = lowered.compile()
  weights = _with_shardings(lowered.out_info, compiled.output_shardings)
  sync = _memory(compiled)

  budget = config.sampling.max_new_tokens
  eval_budget = (E.max_new_tokens or budget) if E.every else 0
  R, shards = sampler.max_batch, sampler.batch_shards
  P, N = sampler_lib.bucket(config.max_prompt_tokens), sampler_lib.bucket(max(budget, eval_budget))
  B = sampler_lib._round_up(sampler_lib.bucket(max(1, S.max_batch // config.group_size), 1), shards)

  def arg(shape: tuple[int, ...], dtype, whole: bool = False):
    """An input as the sampler puts it: rows over the batch axes, or replicated."""
    axes = (None,) * len(shape) if whole else ("batch",) + (None,) * (len(shape) - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharder.named(axes, shape))

  weights32 = jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, jnp.float32, sharding=w.sharding), weights)
  lowered = probe._prefill.lower(weights32, arg((B, P), jnp.int32), arg((B, P), jnp.bool_), arg((R,), jnp.int32),
                                 new_slots=N, cache_dtype=probe.cache_dtype)
  compiled = lowered.compile()
  cache, logits = _with_shardings(lowered.out_info, compiled.output_shardings)
  prefill = _memory(compiled)
  as_cache = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(cache_dtype), sharding=x.sharding)
  kv, cache_b = shard_bytes(jax.tree.map(as_cache, (cache.k, cache.v))), shard_bytes(cache)

  stop = tuple(s for s in config.sampling.stop if s)
  longest = max((len(s) for s in stop), default=0)
  table = arg((sampler_lib.bucket(len(stop), 4), sampler_lib.bucket(longest + 1, 4), trainer.cfg.vocab_size),
              jnp.uint8, whole=True)
  stop_len = arg((table.shape[0],), jnp.int32, whole=True)
  rows = sampler_lib.RowParams(arg((R, 2), jnp.uint32), arg((R,), jnp.bool_), arg((R,), jnp.float32),
                               arg((R,), jnp.float32), arg((R,), jnp.int32), arg((R,), jnp.int32))
  lowered = probe._decode.lower(weights32, cache, logits, arg((R, P + N), jnp.bool_), arg((R,), jnp.int32), rows,
                                table, stop_len, budget=N, eos_ids=probe.eos_ids, pad_id=probe.pad_id)
  decode = _memory(lowered.compile())
  # Beyond the weights and the cache: prefill's temporaries and logits; decode's temporaries, its inputs (logits,
  # masks, row settings, stop tables) and its outputs that are not the donated cache (tokens, log-probs).
  prefill_extra = prefill["temp"] + prefill["output"] - cache_b
  decode_extra = (decode["temp"] + decode["argument"] - shard_bytes(weights32) - cache_b + decode["output"]
                  - decode["alias"])
  return {
      "sampler": {"dtype": S.dtype, "cache_dtype": cache_dtype, "max_batch": R, "rows_per_batch_shard": R / shards,
                  "prefill_prompts": B, "prompt_slots": P, "new_slots": N, "slots": P + N,
                  "compile_s": round(time.perf_counter() - t0, 2),
                  "xla_memory_analysis": {"weight_sync": sync, "prefill": prefill, "decode": decode}},
      "bytes": {"sampler_weights": shard_bytes(weights), "kv_cache": kv,
                "sampling_temporaries": max(prefill_extra, decode_extra), "weight_sync_temporaries": sync["temp"]},
  }


def plan(config, spec: str, devices: int, preset_name: str) -> dict:
  """Compile the config's train step (and for rl its sampler's programs) for simulated devices and account its
  per-device bytes."""
  check_config(config)
  mesh_axes = {a: int(config.mesh[a]) for a in ("data", "fsdp", "tensor")}
  n = device_count(mesh_axes, devices)
  accelerator = config.get("accelerator", "")
  cap = capacity(accelerator)
  set_xla_device_count(n)

  import jax

  from astro_jax.sharding import Sharder, make_mesh
  from astro_jax.train import loop

  if len(jax.devices()) != n:
    raise RuntimeError(f"JAX's CPU backend has {len(jax.devices())} devices, not {n}: it started before "
                       f"XLA_FLAGS was set")
  model_cfg, source = architecture(config, spec, preset_name)
  rl = config.stage == "rl"
  if rl:
    from astro_jax.stages import rl as rl_stage
    from astro_jax.rl.learner import LearnerConfig
    lc = LearnerConfig.from_config(config)  # packed (train_tokens > 0): packed_rows x grad_accum rows of train_tokens
    rows, length, context = lc.update_rows, lc.update_seq_len, rl_stage.seq_len(config)
    rows_key = "packed_rows x grad_accum" if lc.packed else "batch_prompts x group_size / minibatches"
    length_key = "max_prompt_tokens + sampling.max_new_tokens"
  else:
    rows, length = config.batch_size, config.seq_len
    rows_key, length_key, context = "batch_size", "seq_len", config.seq_len
  if context > model_cfg.max_position_embeddings:
    raise ConfigError(f"config key '{length_key}' = {context}: longer than the model's context of "
                      f"{model_cfg.max_position_embeddings} positions")
  try:
    mesh = make_mesh(mesh_axes["data"], mesh_axes["fsdp"], mesh_axes["tensor"])
  except ValueError as e:
    raise ConfigError(f"config key 'mesh': {e}") from None
  sharder = Sharder.create(mesh, "train")
  rows_axes = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = rows // config.grad_accum
  if rows % rows_axes:
    raise ConfigError(f"config key '{rows_key}' = {rows}: rows are split over data x fsdp = "
                      f"{rows_axes} devices and must divide by it")
  notes = []
  if micro % rows_axes:
    notes.append(f"a micro-batch of {micro} rows does not divide over data x fsdp = {rows_axes}: it is replicated "
                 f"(every device computes all of its rows)")

  trainer = (rl_stage.make_trainer(config, model_cfg, sharder) if rl else
             loop.Trainer.create(config, model_cfg, sharder, PLAN_STEPS))
  state = trainer.abstract_state()
  batch = abstract_batch(trainer.batch_axes, sharder, rows, length)
  t0 = time.perf_counter()
  lowered = trainer.step_fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()

  params, optimizer = shard_bytes(state["params"]), shard_bytes(state["opt_state"])
  batch_b = shard_bytes(batch)
  temp = int(mem.temp_size_in_bytes)
  other = int(mem.argument_size_in_bytes) - params - optimizer - batch_b + int(mem.output_size_in_bytes) \
      - int(mem.alias_size_in_bytes)
  total = params + optimizer + temp + batch_b + other
  n_params = model_cfg.num_params()
  result = {
      "config": spec, "stage": config.stage, "devices": n, "accelerator": accelerator,
      "mesh": dict(mesh.shape),
      "model": {"source": source, "params": n_params, "layers": model_cfg.n_layers, "d_model": model_cfg.d_model,
                "param_dtype": config.model.param_dtype, "dtype": config.model.dtype, "remat": config.model.remat,
                "scan_layers": config.model.scan_layers, "mu_dtype": config.optimizer.mu_dtype or "(params')"},
      "batch": {"batch_size": rows, "grad_accum": config.grad_accum, "seq_len": length,
                "micro_batch_rows": micro, "rows_per_device_per_micro_batch": micro / rows_axes,
                "tokens_per_step": rows * length, "loss_chunk": config.loss_chunk},
      "bytes_per_device": {"params": params, "optimizer": optimizer, "temporaries": temp, "batch": batch_b,
                           "other": other, "total": total},
      "state_bytes_per_param": round((params + optimizer) * n / n_params, 3),
      "xla_memory_analysis": {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
                              "alias": int(mem.alias_size_in_bytes), "temp": temp,
                              "generated_code": int(mem.generated_code_size_in_bytes)},
      "capacity_bytes": cap, "fits": None if cap is None else total <= cap,
      "headroom_bytes": None if cap is None else cap - total,
      "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), "cpu": cpu_model(),
      "jax": jax.__version__, "notes": notes,
  }
  if rl:
    samp = sampler_plan(config, trainer, state, mesh)
    b = result["bytes_per_device"]
    reference = 0
    if config.loss.beta:  # the frozen start model in the compute dtype, sharded as the params
      dtype = trainer.run.jnp_dtype
      reference = shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding),
                                           state["params"]))
      notes.append("loss.beta > 0: the reference's log-prob program (a forward pass over each update's rows, "
                   "before the step) is not planned")
    b.update(samp["bytes"], reference=reference)
    resident = params + optimizer + b["sampler_weights"] + reference
    phases = {"train_step": resident + temp + batch_b + other,
              "weight_sync": resident + b["weight_sync_temporaries"],
              "sampling": resident + b["kv_cache"] + b["sampling_temporaries"]}
    b["total_rl"] = max(phases.values())
    b["total_rl_upper"] = resident + temp + batch_b + other + b["kv_cache"]
    result["phases"] = phases
    result["sampler"] = samp["sampler"]
    result["rl"] = {"batch_prompts": config.batch_prompts, "group_size": config.group_size,
                    "minibatches": config.minibatches, "rows_per_step": config.batch_prompts * config.group_size,
                    "rows_per_update": rows, "max_prompt_tokens": config.max_prompt_tokens,
                    "max_new_tokens": config.sampling.max_new_tokens,
                    "eval_max_new_tokens": (config.eval.max_new_tokens or config.sampling.max_new_tokens)
                    if config.eval.every else 0, "loss_beta": config.loss.beta,
                    "tokens_per_rl_step": config.batch_prompts * config.group_size * context,
                    "train_tokens": config.train_tokens}
    result["fits"] = None if cap is None else b["total_rl"] <= cap
    result["headroom_bytes"] = None if cap is None else cap - b["total_rl"]
    result["fits_upper"] = None if cap is None else b["total_rl_upper"] <= cap
  return result


def table(r: dict) -> str:
  """The plan as a readable table (GiB, or MiB for small plans)."""
  b, m, bt = r["bytes_per_device"], r["model"], r["batch"]
  rl = "total_rl" in b
  peak = b["total_rl"] if rl else b["total"]
  unit, scale = ("GiB", GIB) if peak >= GIB else ("MiB", 2**20)
  g = lambda x: f"{x / scale:10.2f}"
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  rows = bt["rows_per_device_per_micro_batch"]
  what = "update" if rl else "step"
  lines = [
      f"memory plan  {r['config']}  (stage {r['stage']}; {m['source']}; {m['params'] / 1e9:.3g}B params)",
      f"  mesh {mesh} = {r['devices']} simulated devices; batch {bt['batch_size']} x {bt['seq_len']} tokens per "
      f"{what}, grad_accum {bt['grad_accum']} ({rows:g} row{'' if rows == 1 else 's'} per device per micro-batch), "
      f"loss_chunk {bt['loss_chunk']}",
      f"  params {m['param_dtype']}, compute {m['dtype']}, remat {m['remat']}, Adam mu {m['mu_dtype']}; "
      f"state {r['state_bytes_per_param']:g} bytes/param",
  ]
  if rl:
    q, s = r["rl"], r["sampler"]
    lines.append(f"  rl: {q['batch_prompts']} prompts x G {q['group_size']} = {q['rows_per_step']} rows a step in "
                 f"{q['minibatches']} update{'s' if q['minibatches'] > 1 else ''}; sampler {s['dtype']} weights, "
                 f"{s['cache_dtype']} cache, {s['max_batch']} rows a program ({s['rows_per_batch_shard']:g} per batch "
                 f"shard) x {s['slots']} slots ({s['prompt_slots']} prompt + {s['new_slots']} new)")
  lines += [
      "",
      f"  {'per device':<44}{unit:>10}",
      f"  {'params':<44}{g(b['params'])}",
      f"  {'optimizer state':<44}{g(b['optimizer'])}",
      f"  {'temporaries (activations, gradients, ...)':<44}{g(b['temporaries'])}",
      f"  {'batch':<44}{g(b['batch'])}",
      f"  {'other (non-aliased outputs, step counter)':<44}{g(b['other'])}",
      f"  {'total (the train step)' if rl else 'total':<44}{g(b['total'])}",
  ]
  if rl:
    p = r["phases"]
    lines += [
        f"  {'sampler weights (its own copy)':<44}{g(b['sampler_weights'])}",
        *([f"  {'reference model (loss.beta > 0)':<44}{g(b['reference'])}"] if b["reference"] else []),
        f"  {'KV cache (largest sampler program)':<44}{g(b['kv_cache'])}",
        f"  {'sampling temporaries (prefill / decode)':<44}{g(b['sampling_temporaries'])}",
        f"  {'weight-sync temporaries':<44}{g(b['weight_sync_temporaries'])}",
        f"  {'peak: train step (+ sampler weights)':<44}{g(p['train_step'])}",
        f"  {'peak: weight sync':<44}{g(p['weight_sync'])}",
        f"  {'peak: sampling (+ KV cache)':<44}{g(p['sampling'])}",
        f"  {'total_rl (the largest peak)':<44}{g(b['total_rl'])}",
        f"  {'upper bound (KV cache kept through the step)':<44}{g(b['total_rl_upper'])}",
    ]
  if r["capacity_bytes"] is None:
    lines.append(f"  {'capacity':<44}{'unknown':>10}   (set config.accelerator for a verdict)")
  else:
    cap, head = r["capacity_bytes"], r["headroom_bytes"]
    lines.append(f"  {'capacity (' + r['accelerator'] + ')':<44}{g(cap)}")
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines.append(f"  verdict{' (total_rl)' if rl else ''}: {verdict}, headroom {head / scale:.2f} {unit} "
                 f"({100 * head / cap:.0f}% of capacity)"
                 + (f"; the upper bound {'fits' if r['fits_upper'] else 'does not fit'}" if rl else ""))
  lines.append(f"  compile {r['compile_s']:.1f} s (lower {r['lower_s']:.1f} s)"
               + (f", sampler programs {r['sampler']['compile_s']:.1f} s" if rl else "")
               + f" on {r['cpu']}, jax {r['jax']}")
  lines += [f"  note: {n}" for n in r["notes"]]
  lines.append("  XLA:CPU's buffer assignment of this step: TPU/GPU fusion and layouts, collective buffers, "
               "fragmentation and the runtime's reserve are not in it (--help)")
  return "\n".join(lines)


# --- entry point --------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> None:
  """Parse the flags as absl would (absl's own errors also become one line and exit 2), plan, print."""
  # As astro_jax.main: unknown override keys and unparseable values fail as one line before absl sees them.
  args = argv[1:]
  if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in args):
    print(__doc__.strip() + "\n\nflags:")
    for flag in (flags.FLAGS["config"], _DEVICES, _PRESET, _JSON):
      print(f"  --{flag.name}: {flags.FLAGS[flag.name].help}")
    return
  try:
    if not any(re.match(r"-?-config(=|$)", a) for a in args):
      raise ConfigError("pass --config=configs/<name>.py[:target]")
    base = astro_main.load_config_file(astro_main.config_spec(args))
    for key in astro_main.override_keys(args):
      astro_main.check_key(base, key)
    for key, raw in astro_main.override_values(args):
      astro_main.check_value(base, key, raw)
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      raise ConfigError(str(e)) from None
    if len(rest) > 1:
      raise ConfigError(f"unexpected arguments: {' '.join(rest[1:])}")
    config = astro_main.validate(flags.FLAGS.config)
    spec = astro_main.config_spec(args)
    results = [plan(c, spec, _DEVICES.value, _PRESET.value) for c in train_configs(config)]
  except UserError as e:
    astro_main.fail(e)
  for note in (n for r in results for n in r["notes"]):
    print(f"warning: {note}", file=sys.stderr)
  if _JSON.value:
    print(json.dumps(results[0] if len(results) == 1 else {"config": spec, "stage": "pipeline", "plans": results}))
  else:
    print("\n\n".join(table(r) for r in results))


def train_configs(config) -> list:
  """The configs whose train steps to plan: the config itself, or a pipeline's sft and rl steps (composed as the
  pipeline runs them; the sampling-only stages' weights and KV cache are bounded by rl's sampler plan when they
  share its budgets)."""
  if config.stage != "pipeline":
    return [config]
  from astro_jax.stages import pipeline
  arm = pipeline.arms(config)[0]
  return [pipeline.compose(config, "sft", f"{arm}/sft", checkpoint="", data=""),
          pipeline.compose(config, "rl", f"{arm}/rl", checkpoint="", prompts="")]


if __name__ == "__main__":
  main(sys.argv)
