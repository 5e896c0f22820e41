"""SFT training-step throughput: astro_jax vs a plain PyTorch/HF step on the real SmolLM2-135M, side by side.

  python benchmarks/train_step.py [--shapes 4x512 2x1024] [--reps 3] [--variants scan/none/512 ...]
  python benchmarks/train_step.py --breakdown      # also time forward / forward+backward / optimizer apart
  python benchmarks/train_step.py --gpu-only       # GPU: Llama-3.2-1B shape, random weights, bf16, MFU
  python benchmarks/train_step.py --gpu-shape-smoke  # the GPU path on a tiny preset (runs on a CPU)

CPU (fp32): ours is `train.step.jit_train_step` over `losses.nll_loss` on the weights from `load_hf_model`; the
reference is `transformers.LlamaForCausalLM` from the same directory (fp32, eager autograd, `attn_implementation`
as --attn says, sdpa by default), loss = HF's next-token CE (`labels=input_ids`), `clip_grad_norm_(1.0)`,
`torch.optim.AdamW`. Both use AdamW lr 1e-5 (constant), b1 0.9, b2 0.95, eps 1e-8, no weight decay, global-norm
clip 1.0, and train on the SAME batch of real text (stdlib `argparse` source, tokenized): ours as an unpacked
batch (segment_ids 1, positions 0..T-1, weight 1 on every position but the last), so both compute T positions of
logits and average the CE of T - 1 targets. The first-step losses and gradient norms (before clipping) of the two
are printed and must agree (same weights, same batch); so must the loss drop of step 2 (the optimizers agree).

Timing: a step is one call, from the inputs on device to its results ready (ours: the updated state and the
metrics; torch: loss.item() after optimizer.step()). Per shape: each side's first step (compilation for ours)
and one more warm-up step are excluded; then `reps` rounds, each one step of torch and of every variant of
ours, in rotating and alternating order; medians are reported. All variants of ours train one state (same
pytree). The first shape runs every --variants entry; later shapes only the default and the fastest of the first
shape. torch uses os.cpu_count() threads; XLA:CPU uses all cores by default.

A shared machine: other processes' CPU use wrecks the comparison (with one of two cores busy elsewhere a torch step
took 5x as long, ours 1.8x). Before every measured step the benchmark waits (up to --wait-idle seconds) for other
processes to keep < 0.25 cores busy over 3 s, and records the cores they used during the step (`others` in the
log, `others_cores_max` in the JSON; a row with > 0.25 is not a clean measurement).

Variants of ours: `<scan|unroll>/<remat policy>/<loss chunk>[/ab<attention block>]` (chunk 0:
`losses.full_logits_nll`, the whole [B, T, V] logits at once instead of the chunked, rematerialised `nll_loss`;
ab<n>: `Execution.attention_block` n). The default (`scan/none/512`) is what the SFT stage runs by default
(model.scan_layers True, model.remat none, loss_chunk 512, no attention blocks).

MFU: tokens/s x `metrics.train_flops_per_token` / `metrics.peak_flops` -- on a CPU that peak is NOMINAL (AVX-512,
2 FMA units, at the reported clock: 64 FLOP/cycle/core); an AMD Zen 4 core does 32 fp32 FLOP/cycle (two 256-bit
FMA pipes), so there the sustainable peak is half of it.

GPU (whenever jax's first device is a GPU; the CPU comparison is then skipped; --gpu-only insists):
Llama-3.2-1B (random weights from `init_model`), fp32 master weights and optimizer state, bf16 compute, seq 2048;
each --gpu-configs entry `remat:batch[:attention block]` is tried, halving the batch on out-of-memory; MFU
against the chip's bf16 peak.

Results: a table, and rows merged into benchmarks/results/train_step.json (rows of other devices are kept, rows
of this device replaced; `cpu` names the host CPU of every row).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from astro_jax.model.config import Execution, ModelConfig
from astro_jax.train import losses, metrics, optim
from astro_jax.train import step as step_lib
from sampler import code_version, device_name, write_rows  # benchmarks/sampler.py (this script's directory)

LR, B1, B2, EPS, WEIGHT_DECAY, CLIP = 1e-5, 0.9, 0.95, 1e-8, 0.0, 1.0
DEFAULT_VARIANT = "scan/none/512"
MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclasses.dataclass(frozen=True)
class Variant:
  """How ours runs: layer loop, remat policy, loss chunk (positions whose logits exist at once), and optionally
  `Execution.attention_block` (queries attended to in blocks of this many)."""
  scan: bool
  remat: str
  chunk: int
  attention_block: int = 0

  @classmethod
  def parse(cls, s: str) -> "Variant":
    loop, remat, chunk, *block = s.split("/")
    if loop not in ("scan", "unroll") or len(block) > 1 or (block and not block[0].startswith("ab")):
      raise ValueError(f"variant {s!r}: expected <scan|unroll>/<remat>/<loss chunk>[/ab<attention block>]")
    return cls(loop == "scan", remat, int(chunk), int(block[0][2:]) if block else 0)

  @property
  def name(self) -> str:
    block = f"/ab{self.attention_block}" if self.attention_block else ""
    return f"{'scan' if self.scan else 'unroll'}/{self.remat}/{self.chunk}{block}"

  def run(self, dtype: str = "float32") -> Execution:
    block = {"attention_block": self.attention_block} if self.attention_block else {}
    return Execution(dtype=dtype, remat=self.remat, scan_layers=self.scan, **block)


def host_cpu() -> str:
  try:
    return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown"


def load_average() -> str:
  return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def text_tokens(tokenizer, n: int) -> np.ndarray:
  """n token ids of real text (the stdlib argparse source, repeated if short): the same on every machine with
  this Python version and tokenizer."""
  import argparse as text_source
  ids = tokenizer.encode(inspect.getsource(text_source))
  reps = -(-n // len(ids))
  return np.asarray((ids * reps)[:n], np.int32)


def unpacked_batch(tokens_BT: np.ndarray) -> dict[str, np.ndarray]:
  """Our batch for plain rows: one segment per row, positions 0..T-1, target = next token, the last position
  weighted 0 (it has no next token): the same T - 1 targets HF's `labels=input_ids` loss averages."""
  B, T = tokens_BT.shape
  targets = np.concatenate([tokens_BT[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
  weights = np.ones((B, T), np.float32)
  weights[:, -1] = 0.0
  return {"tokens": tokens_BT, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          "segment_ids": np.ones((B, T), np.int32), "targets": targets, "weights": weights}


def make_tx(params: dict):
  return optim.adamw(optim.learning_rate(LR, 1, 0, "constant"), params, b1=B1, b2=B2, eps=EPS,
                     weight_decay=WEIGHT_DECAY, clip_norm=CLIP)


def ours_loss(cfg: ModelConfig, run: Execution, chunk: int) -> step_lib.LossFn:
  """`losses.nll_loss` projecting `chunk` positions at a time; chunk 0: `losses.full_logits_nll` (all [B, T, V]
  logits at once, nothing recomputed in the backward pass)."""
  if chunk == 0:
    return lambda p, b: (*losses.full_logits_nll(cfg, run, p, b), {})
  return lambda p, b: losses.nll_loss(cfg, run, None, p, b, chunk=chunk)


def ours_step_fn(cfg: ModelConfig, run: Execution, chunk: int, tx) -> Callable:
  return step_lib.jit_train_step(ours_loss(cfg, run, chunk), tx)


def fresh_state(params: dict, tx) -> dict:
  """A step-0 train state on copies of `params` (the step donates its state; `params` must survive)."""
  return step_lib.init_state(jax.tree.map(jnp.copy, params), tx)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def _cpu_ticks() -> tuple[int, int, int]:
  """(busy ticks of all cores, all ticks of all cores, ticks this process used), from /proc (0s elsewhere)."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:9]]
    with open("/proc/self/stat") as f:
      mine = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0, 0, 0
  busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
  return busy, busy + v[3] + v[4], int(mine[11]) + int(mine[12])


class ForeignLoad:
  """Cores other processes kept busy while this one ran: what makes a measurement on a shared machine unfair."""

  def __init__(self):
    self.start = _cpu_ticks()

  def cores(self) -> float:
    busy, total, mine = (b - a for a, b in zip(self.start, _cpu_ticks()))
    return max(0.0, (busy - mine) / total * (os.cpu_count() or 1)) if total > 0 else 0.0


def wait_idle(max_s: float, threshold: float = 0.25, window: float = 3.0) -> float:
  """Wait (up to max_s) until other processes keep fewer than `threshold` cores busy over `window` seconds;
  returns the seconds waited."""
  t0 = time.perf_counter()
  while True:
    probe = ForeignLoad()
    time.sleep(window)
    if probe.cores() < threshold or time.perf_counter() - t0 >= max_s:
      return time.perf_counter() - t0


class Ours:
  """Every variant's jitted step over one shared train state."""

  def __init__(self, cfg: ModelConfig, params: dict, variants: list[Variant]):
    self.cfg, self.params, self.tx = cfg, params, make_tx(params)
    self.fns = {v.name: ours_step_fn(cfg, v.run(), v.chunk, self.tx) for v in variants}
    self.state = None

  def first_steps(self, name: str, batch: dict) -> tuple[float, list[dict]]:
    """Compile `name` and run two steps from the step-0 state: (seconds of the first, both steps' metrics).
    The resulting state becomes the shared one."""
    self.state = None
    gc.collect()
    state = fresh_state(self.params, self.tx)
    seconds, (state, m1) = timed(lambda: jax.block_until_ready(self.fns[name](state, batch)))
    state, m2 = jax.block_until_ready(self.fns[name](state, batch))
    self.state = state
    return seconds, [{k: float(v) for k, v in m.items()} for m in (m1, m2)]

  def step(self, name: str, batch: dict) -> float:
    def call():
      self.state, m = self.fns[name](self.state, batch)
      return jax.block_until_ready((self.state, m))
    return timed(call)[0]


class Torch:
  """The plain PyTorch/HF reference step (eager, fp32)."""

  def __init__(self, hf_dir: Path, attn: str):
    import torch
    from transformers import LlamaForCausalLM
    torch.set_num_threads(os.cpu_count() or 1)
    self.torch = torch
    self.model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WEIGHT_DECAY)
    self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

  def reset(self) -> None:
    """Back to the loaded weights and a fresh optimizer (so every shape's first step starts from step 0)."""
    self.model.load_state_dict(self.initial)
    self.opt = self.torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(B1, B2), eps=EPS,
                                      weight_decay=WEIGHT_DECAY)

  def step(self, input_ids) -> tuple[float, float]:
    """One step: (loss, gradient norm before clipping)."""
    loss = self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    grad_norm = self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item(), grad_norm.item()


def breakdown(cfg: ModelConfig, params: dict, variant: Variant, batch: dict, th: Torch, input_ids,
              reps: int) -> dict[str, dict[str, float]]:
  """Median seconds of forward (loss only), forward + backward, and the optimizer update alone, each side."""
  import torch
  loss = lambda p, b: ours_loss(cfg, variant.run(), variant.chunk)(p, b)[0]
  fwd = jax.jit(loss)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  tx = make_tx(params)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  jax.block_until_ready((fwd(params, batch), fwd_bwd(params, batch), update(grads, opt_state, params)))
  model = th.model

  def t_fwd():
    with torch.no_grad():
      return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()

  def t_fwd_bwd():
    model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=False)

  def t_opt():
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    th.opt.step()

  t_fwd(), t_fwd_bwd(), t_opt()
  times: dict[str, list[float]] = {k: [] for k in ("ours_fwd", "ours_fwd_bwd", "ours_opt", "torch_fwd",
                                                   "torch_fwd_bwd", "torch_opt")}
  for _ in range(reps):
    times["ours_fwd"].append(timed(lambda: jax.block_until_ready(fwd(params, batch)))[0])
    times["torch_fwd"].append(timed(t_fwd)[0])
    times["ours_fwd_bwd"].append(timed(lambda: jax.block_until_ready(fwd_bwd(params, batch)))[0])
    times["torch_fwd_bwd"].append(timed(t_fwd_bwd)[0])
    times["ours_opt"].append(timed(lambda: jax.block_until_ready(update(grads, opt_state, params)))[0])
    times["torch_opt"].append(timed(t_opt)[0])
  th.reset()
  med = {k: statistics.median(v) for k, v in times.items()}
  return {side: {"forward": med[f"{side}_fwd"], "backward": med[f"{side}_fwd_bwd"] - med[f"{side}_fwd"],
                 "optimizer": med[f"{side}_opt"]} for side in ("ours", "torch")}


def cpu_benchmark(args) -> list[dict]:
  import torch
  import transformers
  from astro_jax import assets
  from astro_jax.checkpoint import load_hf_model
  from astro_jax.tokenizer import Tokenizer

  hf_dir = Path(args.hf_dir) if args.hf_dir else assets.smollm2_hf_dir()
  shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
  variants = [Variant.parse(v) for v in args.variants]
  first_variant = variants[0]
  dev = jax.devices()[0]
  peak = metrics.peak_flops(dev.device_kind, dev.platform)
  model = load_hf_model(hf_dir, param_dtype="float32")
  cfg, params = model.cfg, model.weights()
  del model
  th = Torch(hf_dir, args.attn)
  tokenizer = Tokenizer.load(hf_dir)
  ours = Ours(cfg, params, variants)
  print(f"torch: attn_implementation={args.attn}, {torch.get_num_threads()} threads; variants "
        f"{[v.name for v in variants]}; nominal peak {peak / 1e9:.0f} GFLOP/s", flush=True)

  rows = []
  for B, T in shapes:
    ids = text_tokens(tokenizer, B * T).reshape(B, T)
    batch = {k: jnp.asarray(v) for k, v in unpacked_batch(ids).items()}
    input_ids = torch.from_numpy(ids.astype(np.int64))
    flops = metrics.train_flops_per_token(cfg, T)
    print(f"\n== batch {B} x seq {T} ({B * T} tokens; {flops / 1e9:.2f} GFLOP/token); load average "
          f"{load_average()}", flush=True)
    th.reset()
    t_first, torch_first = timed(lambda: th.step(input_ids))
    torch_second = th.step(input_ids)
    print(f"torch: first step {t_first:.1f}s; loss {torch_first[0]:.6f} -> {torch_second[0]:.6f}, grad norm "
          f"{torch_first[1]:.4f}", flush=True)
    checks = {}
    for v in variants:
      t_first, (m1, m2) = ours.first_steps(v.name, batch)
      rel = abs(m1["loss"] - torch_first[0]) / abs(torch_first[0])
      drop_ours, drop_torch = m1["loss"] - m2["loss"], torch_first[0] - torch_second[0]
      checks[v.name] = dict(loss=m1["loss"], rel=rel, grad_norm=m1["grad_norm"], drop=drop_ours)
      ok = "OK" if rel < 1e-4 else "MISMATCH"
      print(f"ours {v.name}: compile + first step {t_first:.1f}s; loss {m1['loss']:.6f} -> {m2['loss']:.6f}, "
            f"grad norm {m1['grad_norm']:.4f}; vs torch: loss rel diff {rel:.1e} {ok}, grad norm rel diff "
            f"{abs(m1['grad_norm'] - torch_first[1]) / torch_first[1]:.1e}, step-2 loss drop {drop_ours:.3e} vs "
            f"{drop_torch:.3e}", flush=True)
    times: dict[str, list[float]] = {"torch": [], **{v.name: [] for v in variants}}
    foreign: dict[str, list[float]] = {k: [] for k in times}
    for r in range(args.reps):
      order = ["torch"] + [v.name for v in variants]
      order = order[r % len(order):] + order[:r % len(order)]
      if r % 2:
        order.reverse()
      waited = []
      for side in order:
        waited.append(wait_idle(args.wait_idle) if args.wait_idle > 0 else 0.0)
        probe = ForeignLoad()
        times[side].append(timed(lambda: th.step(input_ids))[0] if side == "torch" else ours.step(side, batch))
        foreign[side].append(probe.cores())
      print(f"round {r + 1} (waited {sum(waited):.0f}s for idle): " +
            ", ".join(f"{s} {times[s][-1]:.2f}s [others {foreign[s][-1]:.2f}]" for s in order), flush=True)
    torch_s = statistics.median(times["torch"])
    if (B, T) == shapes[0] and len(shapes) > 1:  # later shapes: the default and the fastest variant only
      best = min(variants, key=lambda v: statistics.median(times[v.name]))
      later = [v for v in variants if v.name == DEFAULT_VARIANT or v == best] or [best]
    for v in variants:
      s = statistics.median(times[v.name])
      rows.append(dict(
          device=device_name(), cpu=host_cpu(), model=MODEL_NAME, batch=B, seq=T, dtype="float32", variant=v.name,
          default=v.name == DEFAULT_VARIANT, torch_attn=args.attn, ours_step_s=round(s, 3),
          torch_step_s=round(torch_s, 3), ours_tok_s=round(B * T / s, 1), torch_tok_s=round(B * T / torch_s, 1),
          ratio=round(torch_s / s, 3), mfu=round(metrics.mfu(B * T / s, flops, 1, peak), 4),
          torch_mfu=round(metrics.mfu(B * T / torch_s, flops, 1, peak), 4), peak_flops=peak, peak_nominal=True,
          ours_first_loss=checks[v.name]["loss"], torch_first_loss=torch_first[0],
          loss_rel_diff=float(f"{checks[v.name]['rel']:.2e}"), ours_first_grad_norm=checks[v.name]["grad_norm"],
          torch_first_grad_norm=torch_first[1], ours_step_times=[round(t, 3) for t in times[v.name]],
          torch_step_times=[round(t, 3) for t in times["torch"]],
          others_cores_max=round(max(foreign[v.name] + foreign["torch"]), 2), jax=jax.__version__,
          torch=torch.__version__, transformers=transformers.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
          code_version=code_version(), date=datetime.now(timezone.utc).strftime("%Y-%m-%d")))
    if (B, T) == shapes[0] and len(shapes) > 1:
      variants = later
      print(f"later shapes: {[v.name for v in variants]}", flush=True)
  if args.breakdown:
    B, T = shapes[0]
    ids = text_tokens(tokenizer, B * T).reshape(B, T)
    batch = {k: jnp.asarray(v) for k, v in unpacked_batch(ids).items()}
    ours.state = None
    gc.collect()
    parts = breakdown(cfg, params, first_variant, batch, th, torch.from_numpy(ids.astype(np.int64)), args.reps)
    print(f"\nbreakdown at batch {B} x seq {T}, ours {first_variant.name} (median seconds; backward = "
          f"forward+backward - forward):")
    for side, p in parts.items():
      print(f"  {side:>5}: " + ", ".join(f"{k} {v:.2f}s" for k, v in p.items()))
    rows[0]["breakdown_s"] = {side: {k: round(v, 3) for k, v in p.items()} for side, p in parts.items()}
  return rows


def gpu_benchmark(args, smoke: bool) -> list[dict]:
  """Llama-3.2-1B shape, random weights, fp32 master weights, bf16 compute: tokens/s and MFU of each config
  (smoke: the tiny preset at a tiny shape, to exercise this path anywhere)."""
  from astro_jax.model.config import preset
  from astro_jax.model.llama import init_model
  name, T = ("tiny", 64) if smoke else ("llama3.2_1b", args.gpu_seq)
  cfg = preset(name, param_dtype="float32")
  params = init_model(cfg, seed=0).weights()
  dev = jax.devices()[0]
  peak = metrics.peak_flops(dev.device_kind, dev.platform)
  flops = metrics.train_flops_per_token(cfg, T)
  tx = make_tx(params)
  reps = 2 if smoke else args.gpu_reps
  rng = np.random.default_rng(0)
  print(f"{name}: {cfg.num_params() / 1e9:.3f}B params, seq {T}, {flops / 1e9:.2f} GFLOP/token; peak "
        f"{peak / 1e12:.0f} TFLOP/s ({dev.device_kind})", flush=True)
  rows = []
  for entry in (["full:2", "none:2"] if smoke else args.gpu_configs):
    remat, B, *block = entry.split(":")
    B = int(B)
    variant = Variant(True, remat, args.gpu_chunk, int(block[0]) if block else 0)
    run = variant.run("bfloat16")
    while B >= 1:
      fn = ours_step_fn(cfg, run, args.gpu_chunk, tx)
      batch = {k: jnp.asarray(v) for k, v in
               unpacked_batch(rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)).items()}
      state = None
      try:
        state = fresh_state(params, tx)
        t_first, (state, m) = timed(lambda: jax.block_until_ready(fn(state, batch)))
        for _ in range(2):
          state, m = jax.block_until_ready(fn(state, batch))
        times = []
        for _ in range(reps):
          def call():
            nonlocal state
            state, m = fn(state, batch)
            return jax.block_until_ready((state, m))
          times.append(timed(call)[0])
        break
      except Exception as e:  # out of device memory: halve the batch
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
          raise
        print(f"{variant.name} batch {B}: out of memory; halving the batch", flush=True)
        del state, fn
        gc.collect()
        B //= 2
    else:
      continue
    s = statistics.median(times)
    mfu = metrics.mfu(B * T / s, flops, 1, peak)
    mem = (dev.memory_stats() or {}).get("peak_bytes_in_use") if hasattr(dev, "memory_stats") else None
    print(f"{variant.name} batch {B}: compile + first step {t_first:.1f}s; loss {float(m['loss']):.4f}; step "
          f"{s * 1e3:.1f} ms, {B * T / s:.0f} tok/s, MFU {mfu:.3f}" +
          (f"; peak memory {mem / 2**30:.1f} GiB" if mem else ""), flush=True)
    rows.append(dict(device=device_name(), cpu=host_cpu(), model=f"{name} (random weights)", batch=B, seq=T,
                     dtype="bfloat16 compute, float32 master", variant=variant.name,
                     default=False, torch_attn=None, ours_step_s=round(s, 4), torch_step_s=None,
                     ours_tok_s=round(B * T / s, 1), torch_tok_s=None, ratio=None, mfu=round(mfu, 4),
                     torch_mfu=None, peak_flops=peak, peak_nominal=False, ours_first_loss=None,
                     torch_first_loss=None, loss_rel_diff=None, ours_step_times=[round(t, 4) for t in times],
                     peak_memory_gib=None if not mem else round(mem / 2**30, 2), jax=jax.__version__, torch=None,
                     xla_flags=os.environ.get("XLA_FLAGS", ""), code_version=code_version(),
                     date=datetime.now(timezone.utc).strftime("%Y-%m-%d")))
    del state, fn
    gc.collect()
  return rows


def print_table(rows: list[dict]) -> None:
  fmt = lambda v, f: f"{'-':>{f.split('.')[0].rstrip('e')}}" if v is None else format(v, f)
  print(f"\n{'batch':>5} {'seq':>5} {'variant':<18} {'ours s':>7} {'ours tok/s':>10} {'torch s':>7} "
        f"{'torch tok/s':>11} {'ratio':>6} {'MFU':>6} {'loss ours':>10} {'loss torch':>10} {'rel':>8}")
  for r in rows:
    print(f"{r['batch']:>5} {r['seq']:>5} {r['variant'] + ('*' if r['default'] else ''):<18} "
          f"{r['ours_step_s']:>7.2f} {r['ours_tok_s']:>10.1f} {fmt(r['torch_step_s'], '7.2f')} "
          f"{fmt(r['torch_tok_s'], '11.1f')} {fmt(r['ratio'], '6.2f')} {r['mfu']:>6.3f} "
          f"{fmt(r['ours_first_loss'], '10.5f')} {fmt(r['torch_first_loss'], '10.5f')} "
          f"{fmt(r['loss_rel_diff'], '8.1e')}")
  print(f"({rows[0]['device']}; * = the SFT stage's default; ratio = ours tok/s / torch tok/s; MFU against "
        f"{rows[0]['peak_flops'] / 1e12:.3g} TFLOP/s{' (nominal CPU peak)' if rows[0]['peak_nominal'] else ''})")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", nargs="+", default=["4x512", "2x1024"], help="BATCHxSEQ (CPU)")
  ap.add_argument("--variants", nargs="+", default=[DEFAULT_VARIANT, "scan/none/2048", "unroll/none/512"],
                  help="ours: <scan|unroll>/<remat>/<loss chunk>; the first is the one --breakdown times")
  ap.add_argument("--reps", type=int, default=3, help="measured rounds per shape (after 2 warm-up steps)")
  ap.add_argument("--wait-idle", type=float, default=60.0,
                  help="before each round wait up to this many seconds for other processes to go quiet (0: don't)")
  ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="torch attention implementation")
  ap.add_argument("--breakdown", action="store_true", help="time forward / backward / optimizer separately")
  ap.add_argument("--hf-dir", default=None, help="HF checkpoint (default: the cached SmolLM2-135M-Instruct)")
  ap.add_argument("--gpu-only", action="store_true", help="only the GPU part (Llama-3.2-1B shape)")
  ap.add_argument("--gpu-shape-smoke", action="store_true", help="the GPU path on the tiny preset (any device)")
  ap.add_argument("--gpu-configs", nargs="+", default=["none:2", "save_dots:8"],
                  help="GPU: remat:batch to try (the batch halves on out-of-memory)")
  ap.add_argument("--gpu-seq", type=int, default=2048)
  ap.add_argument("--gpu-chunk", type=int, default=512, help="GPU: loss chunk")
  ap.add_argument("--gpu-reps", type=int, default=10)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
  args = ap.parse_args()

  on_gpu = jax.devices()[0].platform == "gpu"
  print(f"device: {device_name()}; host cpu {host_cpu()}; jax {jax.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {load_average()}", flush=True)
  if args.gpu_shape_smoke:
    rows = gpu_benchmark(args, smoke=True)
    print_table(rows)
    print("smoke run: nothing written")
    return
  if args.gpu_only and not on_gpu:
    sys.exit("--gpu-only: jax sees no GPU")
  rows = gpu_benchmark(args, smoke=False) if on_gpu else cpu_benchmark(args)
  print(f"load average at the end: {load_average()}")
  print_table(rows)
  write_rows(Path(args.out), rows, rows[0]["device"])


if __name__ == "__main__":
  main()
