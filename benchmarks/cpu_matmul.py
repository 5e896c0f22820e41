"""Decode-step matmuls alone: XLA:CPU (in a jitted loop) vs torch (MKL), SmolLM2-135M shapes, side by side.

  python benchmarks/cpu_matmul.py [--batches 1 16 64] [--min-mb 600]

What a decode step's matmuls cost on this CPU when nothing else runs: for each weight shape of a SmolLM2 layer
(fused q/k/v, output projection, gate, up, down) and the tied lm_head, a chain of distinct fp32 matrices (at
least --min-mb in all, so they stream from memory rather than sit in cache) is multiplied by a [batch, in]
activation, each product feeding the next (as in the model). JAX runs the chain inside one jitted fori_loop;
torch calls `x @ w` in a Python loop. Measurements of the two are interleaved; medians are reported.

The sum over one layer's shapes x 30 + lm_head is the matmul-only decode step: a floor for the whole step of
either side, and the reason a target ratio against HF `generate` can be out of reach on a given machine (see
benchmarks/sampler.py). Prints a table and writes benchmarks/results/cpu_matmul.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from astro_jax.files import write_text_atomic
from sampler import code_version, device_name  # benchmarks/sampler.py (this script's directory)

# SmolLM2-135M: D=576, 9 query / 3 kv heads of 64, F=1536, 30 layers, vocab 49152 (tied head).
LAYER_SHAPES = {"wqkv": (576, 960), "wo": (576, 576), "w_gate": (576, 1536), "w_up": (576, 1536),
                "w_down": (1536, 576)}
HEAD_SHAPE = ("lm_head", (576, 49152))
N_LAYERS = 30


def _chain_jax(weights: list[jax.Array], x: jax.Array, loops: int) -> jax.Array:
  """`loops` passes over the chain: x <- x + 1e-9 * (x @ w) mapped back to x's width (a dependency per dot)."""
  k = x.shape[1]

  def body(_, x):
    for w in weights:
      y = x @ w
      y = y[:, :k] if y.shape[1] >= k else jnp.tile(y, (1, -(-k // y.shape[1])))[:, :k]
      x = x + 1e-9 * y
    return x
  return jax.lax.fori_loop(0, loops, body, x)


def measure(batch: int, k: int, n: int, min_bytes: float, reps: int, loops: int = 3) -> dict:
  count = max(2, int(np.ceil(min_bytes / (k * n * 4))))
  rng = np.random.default_rng(0)
  mats = [rng.standard_normal((k, n), np.float32) for _ in range(count)]
  jax_w = [jnp.asarray(m) for m in mats]
  torch_w = [torch.from_numpy(m) for m in mats]
  x_np = rng.standard_normal((batch, k), np.float32)
  run = jax.jit(_chain_jax, static_argnames="loops")
  x = jnp.asarray(x_np)
  run(jax_w, x, loops=loops).block_until_ready()  # compile
  xt = torch.from_numpy(x_np)

  def time_jax():
    t = time.perf_counter()
    run(jax_w, x, loops=loops).block_until_ready()
    return (time.perf_counter() - t) / (loops * count)

  def time_torch():
    t = time.perf_counter()
    for _ in range(loops):
      for w in torch_w:
        xt @ w
    return (time.perf_counter() - t) / (loops * count)

  time_torch()  # warm-up
  jax_s, torch_s = [], []
  for i in range(reps):
    for fn, out in ((time_jax, jax_s), (time_torch, torch_s))[:: 1 if i % 2 == 0 else -1]:
      out.append(fn())
  t_jax, t_torch = statistics.median(jax_s), statistics.median(torch_s)
  flops, nbytes = 2 * batch * k * n, k * n * 4
  return {"batch": batch, "shape": [k, n], "matrices": count, "jax_us": t_jax * 1e6, "torch_us": t_torch * 1e6,
          "jax_gb_s": nbytes / t_jax / 1e9, "torch_gb_s": nbytes / t_torch / 1e9,
          "jax_gflop_s": flops / t_jax / 1e9, "torch_gflop_s": flops / t_torch / 1e9}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
  parser.add_argument("--min-mb", type=float, default=600.0, help="weights per chain (beyond the caches)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_matmul.json"))
  args = parser.parse_args()
  if jax.devices()[0].platform != "cpu":
    raise SystemExit("this benchmark is about XLA:CPU; run it without an accelerator (JAX_PLATFORMS=cpu)")

  device = device_name()
  print(f"device: {device}; fp32; torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
  shapes = list(LAYER_SHAPES.items()) + [HEAD_SHAPE]
  rows, steps = [], []
  for batch in args.batches:
    step = {"batch": batch, "jax_ms": 0.0, "torch_ms": 0.0}
    for name, (k, n) in shapes:
      row = {"name": name, **measure(batch, k, n, args.min_mb * 1e6, args.reps)}
      rows.append(row)
      times = N_LAYERS if name in LAYER_SHAPES else 1
      step["jax_ms"] += row["jax_us"] * times / 1e3
      step["torch_ms"] += row["torch_us"] * times / 1e3
      print(f"batch {batch:3d} {name:8s} {k:5d}x{n:<6d} jax {row['jax_us']:8.1f} us {row['jax_gb_s']:5.1f} GB/s "
            f"{row['jax_gflop_s']:6.1f} GFLOP/s | torch {row['torch_us']:8.1f} us {row['torch_gb_s']:5.1f} GB/s "
            f"{row['torch_gflop_s']:6.1f} GFLOP/s", flush=True)
    steps.append(step)
  print(f"\nmatmul-only decode step of SmolLM2-135M (30 layers + lm_head), {device}")
  print(f"{'batch':>5} {'jax ms':>8} {'torch ms':>9} {'torch/jax':>9}")
  for s in steps:
    print(f"{s['batch']:5d} {s['jax_ms']:8.2f} {s['torch_ms']:9.2f} {s['torch_ms'] / s['jax_ms']:9.2f}")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  write_text_atomic(out, json.dumps({"device": device, "commit": code_version(), "dtype": "float32",
                                     "matmuls": rows, "steps": steps}, indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
