"""Training metrics: model FLOPs and MFU, one JSONL row per step, TensorBoard events, a PNG learning curve."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from astro_jax.model.config import ModelConfig

# Dense bf16 peak FLOP/s of one chip (vendor figures, no sparsity), matched against jax's device_kind.
PEAK_BF16_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "tpu7x": 2307e12,
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "gh200": 989e12, "b200": 2250e12, "a100": 312e12,
    "l40s": 362e12, "a10g": 125e12,
}

# Memory of one device by the names `config.accelerator` takes (the memory plan's capacity), GiB.
ACCELERATOR_MEMORY_GIB: dict[str, float] = {"tpu_v5p": 95, "tpu_v5e": 16, "tpu_v4": 32, "h100": 80, "h200": 141,
                                            "a100": 80}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """FLOPs of forward + backward per token as the hardware does them: 6 x (matmul weights, the output head
  included) + 12 x layers x (heads x head_dim) x seq_len for attention over the whole (masked) row."""
  D, F, L, H = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.head_dim
  per_layer = D * H * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * D * F
  matmul = L * per_layer + D * cfg.vocab_size
  return 6.0 * matmul + 12.0 * L * cfg.n_heads * H * seq_len


def cpu_peak_flops() -> float:
  """Nominal fp32 peak of this host's cores: AVX-512, 2 FMA units = 64 FLOP/cycle/core at the reported clock."""
  mhz = 0.0
  try:
    with open("/proc/cpuinfo") as f:
      mhz = max(float(line.split(":")[1]) for line in f if line.lower().startswith("cpu mhz"))
  except (OSError, ValueError):
    pass
  return (os.cpu_count() or 1) * 64 * (mhz or 2500.0) * 1e6


def peak_flops(device_kind: str, platform: str) -> float:
  """Peak FLOP/s of one device (bf16 for accelerators; nominal fp32 for a CPU host); 0.0 when unknown."""
  if platform == "cpu":
    return cpu_peak_flops()
  kind = device_kind.lower()
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_BF16_FLOPS[name]
  return 0.0


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_per_device: float) -> float:
  return tokens_per_s * flops_per_token / (n_devices * peak_per_device) if peak_per_device > 0 else float("nan")


class MetricsLog:
  """metrics.jsonl (one row per step, appended and flushed) and TensorBoard events in `run_dir`."""

  def __init__(self, run_dir: str | Path, resume_step: int = 0):
    self.run_dir = Path(run_dir)
    self.path = self.run_dir / "metrics.jsonl"
    keep_rows(self.path, resume_step)  # rows past the restored checkpoint are redone by this run
    self._file = open(self.path, "a")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)

  def write(self, row: dict[str, Any]) -> None:
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(f"train/{key}" if not key.startswith("eval") else key.replace("_", "/", 1), value,
                            row["step"])

  def close(self) -> None:
    self._file.close()
    self._tb.close()


def read_rows(path: str | Path) -> list[dict]:
  """The rows of a metrics.jsonl (a torn last line, from a kill mid-write, is ignored)."""
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break
  except FileNotFoundError:
    pass
  return rows


def keep_rows(path: Path, last_step: int) -> None:
  """Rewrite metrics.jsonl (atomically) with only the rows of steps <= last_step."""
  if not path.exists():
    return
  from astro_jax.files import write_text_atomic
  kept = [r for r in read_rows(path) if r.get("step", 0) <= last_step]
  write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(rows: Sequence[dict], out_png: str | Path, title: str = "") -> Path:
  """Loss (and held-out loss) against step, learning rate on a second axis: a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  steps = [r["step"] for r in rows if "loss" in r]
  ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label="train loss", lw=1.2)
  evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
  if evals:
    ax.plot(*zip(*evals), "o-", label="held-out loss", ms=3)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
  if lr:
    ax2 = ax.twinx()
    ax2.plot(*zip(*lr), color="gray", lw=0.8, ls="--", label="learning rate")
    ax2.set_ylabel("learning rate")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
  ax.legend(loc="upper right")
  ax.set_title(title)
  fig.tight_layout()
  tmp = Path(out_png).with_suffix(".tmp.png")  # write, then rename: never a half-written picture
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, out_png)
  return Path(out_png)


def plot_panels(rows: Sequence[dict], panels: Sequence[tuple[str, ...]], out_png: str | Path,
                title: str = "") -> Path:
  """One small plot per (metric key, label[, held-out key drawn over it]) against step, in a grid: a PNG (written,
  then renamed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = 3
  n_rows = max(1, math.ceil(len(panels) / cols))
  fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 2.8 * n_rows), dpi=110, squeeze=False)
  for ax, (key, label, *held_out) in zip(axes.flat, panels):
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if points:
      ax.plot(*zip(*points), lw=1.2, marker="o" if len(points) < 30 else None, ms=2)
    other = held_out[0] if held_out else f"eval_{key}"
    evals = [(r["step"], r[other]) for r in rows if isinstance(r.get(other), (int, float))]
    if evals:
      ax.plot(*zip(*evals), "s--", ms=3, label=f"held-out ({other.removeprefix('eval_')})")
      ax.legend(loc="best", fontsize=7)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  tmp = Path(out_png).with_suffix(".tmp.png")
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, out_png)
  return Path(out_png)
