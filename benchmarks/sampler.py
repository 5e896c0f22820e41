"""Sampler throughput: astro_jax vs HF transformers `generate` on the real SmolLM2-135M, side by side.

  python benchmarks/sampler.py [--batches 1 16 64] [--reps 5 3 2] [--new-tokens 128]

Both sides decode greedily exactly `new_tokens` tokens per row (HF: min_new_tokens = max_new_tokens; ours:
ignore_eos) for the same prompts; a measurement is one whole call (tokenize, prefill, decode, detokenize).
Warm-up calls are excluded (compilation), measurements of the two sides are interleaved (alternating order)
and medians are reported. fp32 on CPU, bf16 on a GPU.

Roofline at batch 1: bytes a decode step must read (all weights + the KV cache of the live context) divided by
the decode step time, as a fraction of the streaming read bandwidth measured in the same run (median of 10
runs of the faster of a jitted fp32 matrix-vector product and torch.mv over a 1 GiB matrix; on a GPU bf16 over
4 GiB). The decode step time is (t(new_tokens) - t(1)) / (new_tokens - 1): prefill and fixed costs cancel out.
The machine should be otherwise idle: the load average is printed (torch's threads slow down badly when the
cores are oversubscribed, which would flatter the ratio).

Results: printed, and merged into benchmarks/results/sampler.json (rows of other devices are kept, rows of this
device are replaced), so CPU and GPU rows live in one file, told apart by `device`; `commit` says which code
was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from astro_jax import assets
from astro_jax.checkpoint import load_hf_model
from astro_jax.files import write_text_atomic
from astro_jax.sampler import Sampler, SamplingParams
from astro_jax.tokenizer import Tokenizer

PROMPTS = (
    "The capital of France is",
    "Question: A farmer has 17 sheep and buys 5 more. How many sheep does he have? Think step by step.",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "Explain why the sky is blue in simple words.",
    "List three prime numbers greater than 100 and explain how you know they are prime.",
    "Translate to French: I like apples, but not bananas.",
    "Solve for x: 3x + 7 = 22.",
)


def device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    model = platform.processor() or "cpu"
    try:
      model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
      pass
    return f"cpu: {model}, {os.cpu_count()} cores"
  return f"{dev.platform}: {dev.device_kind}"


def code_version() -> str:
  """The commit the numbers were measured at (+dirty: with uncommitted changes), or "unknown"."""
  import subprocess
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def read_bandwidth(on_gpu: bool) -> float:
  """Streaming read bandwidth (bytes/s): a matrix-vector product reads the matrix once. The median of 10 runs,
  the best of two implementations (a jitted JAX one and torch.mv)."""
  import torch
  dtype, n_bytes = (jnp.bfloat16, 4 << 30) if on_gpu else (jnp.float32, 1 << 30)
  rows = n_bytes // jnp.dtype(dtype).itemsize // 4096
  w = jax.jit(lambda: jnp.full((rows, 4096), 0.5, dtype))()
  x = jnp.ones((4096,), dtype)
  matvec = jax.jit(lambda w, x: w @ x)
  matvec(w, x).block_until_ready()
  best = statistics.median(timed(lambda: matvec(w, x).block_until_ready()) for _ in range(10))
  del w
  device = "cuda" if on_gpu else "cpu"
  wt = torch.full((rows, 4096), 0.5, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device)
  xt = torch.ones(4096, dtype=wt.dtype, device=device)
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)
  torch.mv(wt, xt), sync()
  best = min(best, statistics.median(timed(lambda: (torch.mv(wt, xt), sync())) for _ in range(10)))
  return n_bytes / best


def random_checkpoint(src: Path, dst: Path) -> Path:
  """A HF checkpoint with src's config and tokenizer but random weights (where the real weights cannot be
  copied, e.g. to a remote GPU; fixed-length greedy decoding costs the same whatever the weights)."""
  import shutil
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM
  if not (dst / "model.safetensors").exists():
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
      if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
        shutil.copy(f, dst / f.name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
  return dst


def benchmark_checkpoint(hf_dir: str | None, random_weights: bool) -> tuple[Path, str]:
  """The HF checkpoint a benchmark runs (default: the cached SmolLM2-135M-Instruct; with `random_weights`, its config
  and tokenizer with random weights) and the model's name for the rows."""
  path = Path(hf_dir) if hf_dir else assets.smollm2_hf_dir()
  if random_weights:
    return random_checkpoint(path, Path(tempfile.gettempdir()) / "astro_jax_random_smollm2"), \
        "SmolLM2-135M-Instruct (random weights)"
  return path, "SmolLM2-135M-Instruct"


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
  ap.add_argument("--reps", type=int, nargs="+", default=None, help="measurements per batch size")
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--hf-dir", default=None, help="HF checkpoint (default: the cached SmolLM2-135M-Instruct)")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler.json"))
  ap.add_argument("--random-weights", action="store_true",
                  help="use --hf-dir's config and tokenizer with random weights (e.g. on a remote GPU)")
  ap.add_argument("--no-hf", action="store_true", help="time astro_jax only")
  args = ap.parse_args()

  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  on_gpu = jax.devices()[0].platform == "gpu"
  dtype = "bfloat16" if on_gpu else "float32"
  reps = args.reps or ([10] * len(args.batches) if on_gpu else [{1: 5, 16: 3}.get(b, 2) for b in args.batches])
  hf_dir, model_name = benchmark_checkpoint(args.hf_dir, args.random_weights)
  device, T = device_name(), args.new_tokens
  print(f"device: {device}; dtype {dtype}; {T} new tokens; jax {jax.__version__}, torch {torch.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()}", flush=True)

  tokenizer = Tokenizer.load(hf_dir)
  model = load_hf_model(hf_dir, param_dtype=dtype)
  sampler = Sampler(model, tokenizer, max_batch=max(args.batches), dtype=dtype)
  cfg = model.cfg
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.weights()))
  del model

  torch_device = "cuda" if on_gpu else "cpu"
  hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).to(torch_device).eval()
  hf_tok = AutoTokenizer.from_pretrained(hf_dir)
  hf_tok.padding_side = "left"
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)

  def ours(prompts, n_tokens):
    sampler.generate(prompts, SamplingParams(temperature=0, max_new_tokens=n_tokens, ignore_eos=True))

  def hf(prompts, n_tokens):
    enc = hf_tok(prompts, return_tensors="pt", padding=True).to(torch_device)
    with torch.inference_mode():
      out = hf_model.generate(**enc, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                              pad_token_id=hf_tok.pad_token_id)
    sync()
    assert out.shape[1] == enc["input_ids"].shape[1] + n_tokens
    hf_tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

  bandwidth = read_bandwidth(on_gpu)
  print(f"streaming read bandwidth: {bandwidth / 1e9:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB", flush=True)

  rows = []
  for batch, n_reps in zip(args.batches, reps):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(batch)]
    t0 = time.perf_counter()
    ours(prompts, T)  # compile
    if batch == 1:
      ours(prompts, 1)
    if not args.no_hf:
      hf(prompts, 4)
    print(f"batch {batch}: warm-up {time.perf_counter() - t0:.0f}s", flush=True)
    t_ours, t_hf, t_one = [], [], []
    for r in range(n_reps):
      order = (("ours", "hf") if r % 2 == 0 else ("hf", "ours"))
      for side in order:
        if side == "ours":
          t_ours.append(timed(lambda: ours(prompts, T)))
          if batch == 1:
            t_one.append(timed(lambda: ours(prompts, 1)))
        elif not args.no_hf:
          t_hf.append(timed(lambda: hf(prompts, T)))
    ours_tok_s = batch * T / statistics.median(t_ours)
    hf_tok_s = batch * T / statistics.median(t_hf) if t_hf else None
    roofline = None
    if batch == 1:
      step_s = (statistics.median(t_ours) - statistics.median(t_one)) / (T - 1)
      prompt_len = len(tokenizer.encode_prompt(prompts[0]))
      kv_bytes = (2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (prompt_len + T / 2)
                  * jnp.dtype(sampler.cache_dtype).itemsize)
      roofline = (weight_bytes + kv_bytes) / step_s / bandwidth
      print(f"batch 1: decode step {step_s * 1e3:.2f} ms, {(weight_bytes + kv_bytes) / step_s / 1e9:.1f} GB/s",
            flush=True)
    rows.append(dict(device=device, model=model_name, dtype=dtype, batch=batch, new_tokens=T,
                     astro_jax_tok_s=round(ours_tok_s, 2), hf_tok_s=None if hf_tok_s is None else round(hf_tok_s, 2),
                     ratio=None if hf_tok_s is None else round(ours_tok_s / hf_tok_s, 3),
                     roofline_fraction=None if roofline is None else round(roofline, 3), commit=code_version()))
    print(f"batch {batch}: astro_jax {[round(batch * T / t, 1) for t in t_ours]} tok/s, "
          f"hf {[round(batch * T / t, 1) for t in t_hf]} tok/s", flush=True)

  print(f"load average at the end: {os.getloadavg()}")
  print(f"\n{'batch':>5} {'astro_jax tok/s':>16} {'hf tok/s':>9} {'ratio':>6} {'roofline':>8}   ({device}, {dtype})")
  for r in rows:
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"{r['batch']:>5} {r['astro_jax_tok_s']:>16.1f} {fmt(r['hf_tok_s'], '9.1f')} {fmt(r['ratio'], '6.2f')} "
          f"{fmt(r['roofline_fraction'], '8.2f')}")
  if args.no_hf:
    return
  write_rows(Path(args.out), rows, device)


def write_rows(out: Path, rows: list[dict], device: str, same: tuple[str, ...] = ()) -> None:
  """Merge `rows` into the results JSON at `out`: rows of other devices are kept, this device's replaced (only
  those whose `same` fields equal a new row's, when given: a run of some workloads keeps the others' rows)."""
  new = {tuple(r.get(k) for k in same) for r in rows}
  kept = [r for r in (json.loads(out.read_text()) if out.exists() else [])
          if r.get("device") != device or tuple(r.get(k) for k in same) not in new]
  out.parent.mkdir(parents=True, exist_ok=True)
  write_text_atomic(out, json.dumps(kept + rows, indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
