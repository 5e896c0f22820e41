"""The RL update, padded vs packed, side by side in one run on rl_smollm2's shapes.

  python benchmarks/rl_update.py                       # 8 of 30 layers; padded, packed_k, shared_k; ~5 min on 2 cores
  python benchmarks/rl_update.py --layers 0 --layouts padded padded_k packed packed_k shared_k  # all 30, all

What is timed: one jitted optimizer update (`step.jit_train_step` over `rollouts.rl_loss`, AdamW, the config's
remat, dtype, loss chunk, aggregation, clip range and temperature; one micro-batch) on one step's batch_prompts x
group_size responses, laid out as:
  padded    `rollouts.response_rows`: a row per response of max_prompt_tokens + max_new_tokens (today's update)
  padded_k  the same rows, the head (vocabulary projection, log-softmax, entropy) only at each row's response
            positions (`rl_loss(targets_per_row=max_new_tokens)`), not at every position
  packed    `rollouts.packed_response_rows`: the same (prompt + response) sequences first-fit into rows of
            --train-tokens, as many rows as they need
  packed_k  packed with at most --targets-per-row response tokens a row, the head only there
  shared_k  `rollouts.shared_prompt_rows` (the rl stage's share_prompts): each group's prompt once in a row of
            --shared-tokens, its G responses after it, each seeing the prompt but not its siblings (the model's
            prefix_segment mask), the head only at the responses (a group's response budget a row at most)
Each layout is compiled and run once (warm-up), then --reps rounds time one update of each layout in rotating
order (one train state threads through all of them); medians are reported.

Lengths: the prompts are the config's own (its prompts file through the stage's PromptConfig, tokenized as the
stage does: SmolLM2's one-shot prompts are 200-219 tokens); response lengths are drawn per response: truncated
(= max_new_tokens) with the truncation rate, else normal around the rest of the mean (sd 35% of it, in
[8, max_new_tokens - 1]), with the mean response length and truncation rate of the real-weights CPU rows of
benchmarks/results/rl_step.json when present (else 60% of max_new_tokens, 15%). Weights are random (`init_model`):
the update costs the same whatever the weights. --layers (default 8; 0: the model's 30): the real shapes but fewer
decoder layers (every layer costs the same; the head, the loss and the layout are unchanged), to fit a run in
minutes on a CPU; fewer layers weigh the head more, which flatters the _k layouts.

Results: a table, and rows merged into benchmarks/results/rl_update.json (rows of this device and layer count
replaced, others kept).
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from astro_jax import assets, prompts  # noqa: E402
from astro_jax.main import load_config_file  # noqa: E402
from astro_jax.model import Execution, from_hf_config, init_model  # noqa: E402
from astro_jax.tokenizer import Tokenizer  # noqa: E402
from astro_jax.train import optim, rollouts  # noqa: E402
from astro_jax.train import step as step_lib  # noqa: E402
from astro_jax.files import write_text_atomic  # noqa: E402
from sampler import code_version, device_name  # noqa: E402  benchmarks/sampler.py
from train_step import ForeignLoad, host_cpu, load_average, wait_idle  # noqa: E402  benchmarks/train_step.py


LAYOUTS = ("padded", "padded_k", "packed", "packed_k", "shared_k")


def recorded_lengths(path: Path, max_new: int) -> tuple[float, float, str]:
  """(mean response length, truncation rate, where from): the real-weights CPU rows of rl_step.json, per step."""
  rows = json.loads(path.read_text()) if path.exists() else []
  rows = [r for r in rows if "-" not in str(r.get("step")) and "random" not in r.get("model", "")
          and r.get("max_new_tokens") == max_new and r.get("device", "").startswith("cpu")]
  if not rows:
    return 0.6 * max_new, 0.15, "assumed: mean 60% of max_new_tokens, 15% truncated"
  mean = float(np.mean([r["response_length_mean"] for r in rows]))
  trunc = float(np.mean([r["truncation_rate"] for r in rows]))
  return mean, trunc, f"{path.relative_to(REPO)}: {len(rows)} real-weights CPU steps"


def draw_step(config, prompt_lengths: list[int], mean: float, trunc: float, seed: int):
  """One step's responses: batch_prompts prompts (their real lengths) x group_size drawn response lengths."""
  rng = np.random.default_rng(seed)
  max_new, G = config.sampling.max_new_tokens, config.group_size
  rest = (mean - trunc * max_new) / max(1.0 - trunc, 1e-9)  # the mean of the untruncated ones
  P = rng.choice(prompt_lengths, config.batch_prompts)
  n = config.batch_prompts * G
  R = np.where(rng.random(n) < trunc, max_new, np.clip(np.rint(rng.normal(rest, 0.35 * rest, n)), 8, max_new - 1))
  tok = lambda k: [int(t) for t in rng.integers(3, 1000, int(k))]
  prompt_ids = [tok(p) for p in P]
  return ([prompt_ids[i // G] for i in range(n)], [tok(r) for r in R], [[-1.0] * int(r) for r in R],
          list(rng.normal(0.0, 1.0, n)))


def layouts(config, step, names: list[str], train_tokens: int, targets_per_row: int,
            shared_tokens: int) -> dict[str, dict]:
  """The step's batch in each named layout (see the module docstring), with what each holds."""
  prompt_ids, resp, old, adv = step
  G, max_new = config.group_size, config.sampling.max_new_tokens
  seq_len = config.max_prompt_tokens + max_new

  def pack(p, r, o, a, T, K):
    _, info = rollouts.packed_response_rows(p, r, o, a, train_tokens=T, rows_per_micro=1, targets_per_row=K)
    rows, _ = rollouts.packed_response_rows(p, r, o, a, train_tokens=T, rows_per_micro=info["rows"],
                                            targets_per_row=K)
    return {"rows": rows, "axes": rollouts.PACKED_BATCH_AXES, "targets_per_row": K}

  def shared():  # each group's prompt once, its responses after it (the rl stage's share_prompts)
    K = rollouts.targets_per_row(max_new, seq_len, shared_tokens, group_size=G)
    pack_ = functools.partial(rollouts.shared_prompt_rows, prompt_ids, resp, old, adv, train_tokens=shared_tokens,
                              targets_per_row=K)
    rows, _ = pack_(rows_per_micro=pack_(rows_per_micro=1)[1]["rows"])
    return {"rows": rows, "axes": rollouts.rl_batch_axes(packed=True, shared=True), "targets_per_row": K}

  padded = lambda K: {"rows": rollouts.response_rows(prompt_ids, resp, old, adv, seq_len=seq_len),
                      "axes": rollouts.RL_BATCH_AXES, "targets_per_row": K}
  make = {"padded": lambda: padded(None), "padded_k": lambda: padded(max_new),
          "packed": lambda: pack(prompt_ids, resp, old, adv, train_tokens, None),
          "packed_k": lambda: pack(prompt_ids, resp, old, adv, train_tokens, targets_per_row), "shared_k": shared}
  out = {k: make[k]() for k in names}
  for v in out.values():
    rows = v["rows"]
    B, T = v["shape"] = rows["tokens"].shape
    v["tokens"] = int((rows["segment_ids"] > 0).sum())
    v["targets"] = int(rows["weights"].sum())
    v["head"] = B * (v["targets_per_row"] or T)  # positions through the head
    v["attention"] = int(sum(s.size ** 2 for s in rows["segment_ids"] if s.any()))  # dense T^2 per row
  return out


def update_flops(cfg, v: dict) -> dict[str, float]:
  """The update's FLOPs by part (a model, not a measurement): matmuls x 4 for forward, remat's second forward and
  the backward's two; decoder layers at every position (attention dense over each row), the head at its positions."""
  D, H, K, hd, F, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.n_layers
  B, T = v["shape"]
  layer = 2 * (2 * D * H * hd + 2 * D * K * hd + 3 * D * F)  # per position: q, o, k, v, the MLP
  return {"layers": 4 * L * B * T * layer, "attention": 4 * L * v["attention"] * 4 * H * hd,
          "head": 4 * v["head"] * 2 * D * cfg.vocab_size}


def merge_rows(out: Path, rows: list[dict]) -> None:
  """Merge `rows` into the results JSON at `out`: rows of this device and layer count replaced, others kept."""
  key = lambda r: (r.get("device"), r.get("layers"))
  kept = [r for r in (json.loads(out.read_text()) if out.exists() else []) if key(r) != key(rows[0])]
  out.parent.mkdir(parents=True, exist_ok=True)
  write_text_atomic(out, json.dumps(kept + rows, indent=1) + "\n")
  print(f"wrote {out}")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=str(REPO / "configs" / "rl_smollm2.py"))
  ap.add_argument("--layers", type=int, default=8, help="decoder layers (0: the model's 30)")
  ap.add_argument("--train-tokens", type=int, default=640, help="packed rows' length")
  ap.add_argument("--targets-per-row", type=int, default=256, help="packed_k: response tokens a row at most")
  ap.add_argument("--shared-tokens", type=int, default=704,
                  help="shared_k rows' length (704: a group's prompt + 4 responses of ~110 tokens)")
  ap.add_argument("--layouts", nargs="+", default=["padded", "packed_k", "shared_k"], choices=LAYOUTS)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--wait-idle", type=float, default=0.0, help="wait up to this long for a quiet machine per step")
  ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "rl_update.json"))
  args = ap.parse_args()

  config = load_config_file(args.config)
  hf_dir = assets.smollm2_hf_dir()
  cfg = from_hf_config(hf_dir)
  cfg = cfg.replace(n_layers=args.layers or cfg.n_layers)
  m, L = config.model, config.loss
  run = Execution(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, attention_block=m.attention_block)
  tokenizer = Tokenizer.load(hf_dir)
  prompt = prompts.PromptConfig(**config.prompt.to_dict())
  problems = [json.loads(line)["problem"] for line in Path(config.prompts).read_text().splitlines() if line.strip()]
  prompt_lengths = [len(prompts.search_prompt_ids(tokenizer, prompt, p)) for p in problems]
  mean, trunc, source = recorded_lengths(REPO / "benchmarks" / "results" / "rl_step.json",
                                         config.sampling.max_new_tokens)
  step = draw_step(config, prompt_lengths, mean, trunc, args.seed)
  names = ["padded"] + [k for k in args.layouts if k != "padded"]  # the baseline always
  lay = layouts(config, step, names, args.train_tokens, args.targets_per_row, args.shared_tokens)

  device = device_name()
  print(f"device: {device}; host cpu {host_cpu()}; jax {jax.__version__}; load average {load_average()}")
  print(f"config {Path(args.config).name}: {config.batch_prompts} x {config.group_size} responses, prompts "
        f"{min(prompt_lengths)}-{max(prompt_lengths)} tokens, {config.sampling.max_new_tokens} new; responses "
        f"mean {np.mean([len(r) for r in step[1]]):.1f} drawn at mean {mean:.1f}, {trunc:.0%} truncated ({source})")
  print(f"model SmolLM2-135M shapes, {cfg.n_layers} of {from_hf_config(hf_dir).n_layers} layers, random weights; "
        f"{run.dtype}, remat {run.remat}, loss chunk {config.loss_chunk}, {L.aggregation}")

  params = init_model(cfg, seed=0).weights()
  tx = optim.adamw(optim.learning_rate(1e-6, 10, 0, "constant"), params)
  loss_fn = functools.partial(rollouts.rl_loss, cfg, run, None, chunk=config.loss_chunk,
                              temperature=config.sampling.temperature, eps_low=L.eps_low, eps_high=L.eps_high,
                              aggregation=L.aggregation, max_len=config.sampling.max_new_tokens)
  fns = {k: step_lib.jit_train_step(functools.partial(loss_fn, targets_per_row=v["targets_per_row"]), tx, accum=1,
                                    batch_axes=v["axes"]) for k, v in lay.items()}
  batches = {k: {n: jnp.asarray(a) for n, a in v["rows"].items()} for k, v in lay.items()}
  state = step_lib.init_state(params, tx)
  first, times, others, trained = {}, {k: [] for k in lay}, {k: [] for k in lay}, {}
  t_run = time.perf_counter()
  for k in lay:  # warm-up: compile + one step
    t = time.perf_counter()
    state, metrics = jax.block_until_ready(fns[k](state, batches[k]))
    first[k] = time.perf_counter() - t
    trained[k] = (float(metrics["tokens"]), float(metrics.get("targets_dropped", 0.0)))
    print(f"  {k}: first step (compile) {first[k]:.1f}s", flush=True)
  names = list(lay)
  for r in range(args.reps):
    for k in names[r % len(names):] + names[:r % len(names)]:  # rotating order
      if args.wait_idle:
        wait_idle(args.wait_idle)
      probe, t = ForeignLoad(), time.perf_counter()
      state, _ = jax.block_until_ready(fns[k](state, batches[k]))
      times[k].append(time.perf_counter() - t)
      others[k].append(probe.cores())
  pad = statistics.median(times["padded"])
  head = (f"{'layout':8} {'rows x tokens':>14} {'positions':>9} {'tokens':>7} {'fill':>5} {'targets':>7} "
          f"{'head':>6} {'attn T^2':>9} {'TFLOP l/a/h':>15} {'x':>5} {'median s':>9} {'x padded':>8} {'first s':>8} "
          f"{'others':>6}")
  print("\n" + head)
  out_rows = []
  date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
  flops = {k: update_flops(cfg, v) for k, v in lay.items()}
  total = lambda k: sum(flops[k].values())
  for k, v in lay.items():
    B, T = v["shape"]
    med = statistics.median(times[k])
    parts = "/".join(f"{x / 1e12:.1f}" for x in flops[k].values())
    print(f"{k:8} {f'{B} x {T}':>14} {B * T:9d} {v['tokens']:7d} {v['tokens'] / (B * T):5.2f} {v['targets']:7d} "
          f"{v['head']:6d} {v['attention'] / lay['padded']['attention']:8.2f}x {parts:>15} "
          f"{total(k) / total('padded'):5.2f} {med:9.2f} {med / pad:8.2f} {first[k]:8.1f} {max(others[k]):6.2f}")
    assert trained[k] == (lay["padded"]["targets"], 0.0), (k, trained[k])  # the same response tokens, all kept
    out_rows.append({"device": device, "cpu": host_cpu(), "model": "SmolLM2-135M (random weights)",
                     "config": str(Path(args.config).relative_to(REPO)) if Path(args.config).is_relative_to(REPO)
                     else args.config, "layers": cfg.n_layers, "dtype": run.dtype, "remat": run.remat,
                     "loss_chunk": config.loss_chunk, "aggregation": L.aggregation, "layout": k, "rows": B,
                     "row_tokens": T, "positions": B * T, "tokens": v["tokens"], "targets": v["targets"],
                     "targets_per_row": v["targets_per_row"], "head_positions": v["head"],
                     "fill": round(v["tokens"] / (B * T), 4),
                     "attention_vs_padded": round(v["attention"] / lay["padded"]["attention"], 4),
                     "model_tflop": {p: round(x / 1e12, 3) for p, x in flops[k].items()},
                     "model_flops_vs_padded": round(total(k) / total("padded"), 4),
                     "time_s": round(med, 4), "times_s": [round(x, 4) for x in times[k]],
                     "vs_padded": round(med / pad, 4), "first_step_s": round(first[k], 2),
                     "others_cores_max": round(max(others[k]), 2), "lengths": source,
                     "response_length_mean": round(float(np.mean([len(r) for r in step[1]])), 1),
                     "prompt_tokens": [min(prompt_lengths), max(prompt_lengths)], "jax": jax.__version__,
                     "code_version": code_version(), "date": date, "reps": args.reps,
                     "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
  print(f"(positions = rows x row tokens; tokens: real ones; targets: response tokens in the loss; head: positions "
        f"through the vocabulary projection; attn T^2: dense attention score entries vs padded; TFLOP l/a/h: the "
        f"update's modelled FLOPs in decoder-layer matmuls / attention / head, x: their total vs padded; others: "
        f"cores other processes used during a step, max; run {time.perf_counter() - t_run:.0f}s)")
  merge_rows(Path(args.out), out_rows)


if __name__ == "__main__":
  main()
