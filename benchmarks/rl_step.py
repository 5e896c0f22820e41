"""One RL step of the real `rl` stage on the real SmolLM2-135M-Instruct: where the time goes.

  python benchmarks/rl_step.py [--steps 3] [--config configs/rl_smollm2.py] [--max-new-tokens N] [--batch-prompts N]
  python benchmarks/rl_step.py --random-weights    # e.g. on a GPU machine without the checkpoint's weights
  python benchmarks/rl_step.py --layouts padded,packed:640,shared:704   # the update's layouts side by side

Runs `astro_jax.stages.rl.run` in-process on --config (default configs/rl_smollm2.py: 4 prompts x 4 responses,
128 new tokens at T 0.7, rows of 256 + 128 tokens, one update a step, dynamic sampling up to 3 rounds) for --steps
steps in a temporary run directory (export_hf and eval off; checkpoints only at the last step, after its timing).
Step 1 includes the compilation of the sampler's and the trainer's programs and is reported apart; steps 2..N are
the steady state (their sum is the `2-N` row). Per step, from the stage's metrics.jsonl:

  wall          time_s: the step, from the weight sync to the metrics row
  sync          time_weight_sync: the trainer's params -> the sampler's copy
  sampling      time_sampling (and its fraction of the step; verl / OpenRLHF report 70-90% on GPUs), split here
                (an instrumented Sampler handed to the stage, `rl.run(config, make_sampler=TimedSampler)`: each
                program's outputs are waited for) into prefill, decode, and host (batching, detokenization, stop
                strings: the rest of `Sampler.sample`)
  scoring       time_scoring: the verifier's busy time, overlapped with the next chunk's decode (not in the sum)
  training      time_training: the update(s) and fetching the metrics
  other         wall - sync - sampling - training (waiting for the last verdicts, rewards, building the rows,
                bookkeeping)
  tok/s         sampled tokens per second of the step, and per second of sampling
  train tok/s   positions trained per second of training (rows x seq_len: the update computes every position,
                padding included) and response tokens in the loss per second
  finished      finished_row_fraction: of the decoded row-steps, those of rows that had already finished (a batch
                decodes until its longest row stops)
  rounds, groups, compiles   sampling rounds, groups kept, XLA programs compiled during the step
  RSS GiB       this process's peak resident memory so far

Memory: configs/rl_smollm2.py trains with model.remat none; on a 2-core, 23 GiB machine that update was OOM-killed
at ~20 GiB resident. `--remat full` peaks at ~9.4 GiB (and is the faster CPU update, see benchmarks/train_step.py).

dtype: the config's (fp32 on CPU); on a GPU bfloat16 compute for the sampler and the trainer (fp32 master weights)
unless --dtype says otherwise. `others` is the number of cores other processes kept busy during the step (this
process and its verifier workers excluded): on a shared machine a step with others > 0.25 is not a clean measurement.

Layouts: `--layouts padded,packed:640,shared:704` runs the stage once per layout with the same seeds (padded: one
response a row of 256 + 128 tokens; packed: the (prompt + response) sequences packed into rows of 640 tokens;
shared: packed with each group's prompt once, its responses after it; the head only at response positions in all),
and prints the steady update time of each against the first.

Results: a table, and rows merged into benchmarks/results/rl_step.json (rows of other devices kept, this device's
replaced; `cpu` names the host CPU of every row).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import jax
import ml_collections

from astro_jax import sampler as sampler_lib
from astro_jax.main import load_config_file
from astro_jax.stages import rl
from sampler import code_version, device_name, random_checkpoint, write_rows  # benchmarks/sampler.py
from train_step import host_cpu, load_average, wait_idle  # benchmarks/train_step.py

REPO = Path(__file__).resolve().parent.parent


def _tree_ticks() -> int:
  """CPU ticks used by this process and its live descendants (the verifier workers), from /proc (0 elsewhere)."""
  total, todo, seen = 0, [os.getpid()], set()
  while todo:
    pid = todo.pop()
    if pid in seen:
      continue
    seen.add(pid)
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += int(fields[11]) + int(fields[12])
      for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
          todo += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
      continue
  return total


def _all_ticks() -> tuple[int, int]:
  """(busy ticks of all cores, all ticks of all cores)."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:9]]
  except OSError:
    return 0, 0
  busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
  return busy, busy + v[3] + v[4]


class OthersProbe:
  """Cores that processes other than this one and its children kept busy since the last `take()`."""

  def __init__(self):
    self.start = (*_all_ticks(), _tree_ticks())

  def take(self) -> float:
    now = (*_all_ticks(), _tree_ticks())
    busy, total, mine = (b - a for a, b in zip(self.start, now))
    self.start = now
    return max(0.0, (busy - mine) / total * (os.cpu_count() or 1)) if total > 0 else 0.0


class TimedSampler(sampler_lib.Sampler):
  """The stage's Sampler (handed to `rl.run` as `make_sampler`), with its prefill and decode programs timed (each
  waited for; they run back to back anyway: the decode needs the prefill's cache, and its tokens are fetched right
  after). `update_weights`, called at the start of every RL step, closes one step's record and opens the next."""
  steps: list[dict] = []
  current: "TimedSampler | None" = None
  probe: OthersProbe | None = None

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    prefill, decode = self._prefill, self._decode
    self._prefill = lambda *a, **k: self._timed("prefill", prefill, *a, **k)
    self._decode = lambda *a, **k: self._timed("decode", decode, *a, **k)

  def _timed(self, part: str, fn, *args, **kwargs):
    began = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    if TimedSampler.steps:
      TimedSampler.steps[-1][part] += time.perf_counter() - began
    return out

  def update_weights(self, weights) -> None:
    TimedSampler.close_step()
    TimedSampler.steps.append({"prefill": 0.0, "decode": 0.0, "tokens": self.stats.tokens,
                               "row_steps": self.stats.row_steps, "batches": self.stats.batches})
    TimedSampler.current = self
    super().update_weights(weights)

  @classmethod
  def close_step(cls) -> None:
    if cls.steps and "others" not in cls.steps[-1]:
      s, stats = cls.steps[-1], cls.current.stats
      s.update(tokens=stats.tokens - s["tokens"], row_steps=stats.row_steps - s["row_steps"],
               batches=stats.batches - s["batches"], others=cls.probe.take() if cls.probe else 0.0,
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    elif cls.probe:
      cls.probe.take()


def _display_path(path: str) -> str:
  """`path` relative to the repository when inside it (the same on every machine), else as given."""
  p = Path(path).resolve()
  return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else path


def make_config(args: argparse.Namespace) -> tuple[ml_collections.ConfigDict, str]:
  config = load_config_file(args.config)
  on_gpu = jax.devices()[0].platform == "gpu"
  dtype = args.dtype or ("bfloat16" if on_gpu else "")
  if dtype:
    config.model.dtype = config.sampler.dtype = dtype
  if args.max_new_tokens:
    config.sampling.max_new_tokens = args.max_new_tokens
  if args.batch_prompts:
    config.batch_prompts = args.batch_prompts
    config.sampler.max_batch = max(config.sampler.max_batch, args.batch_prompts * config.group_size)
  if args.remat:
    config.model.remat = args.remat
  if args.checkpoint:
    config.checkpoint = args.checkpoint
  model = "SmolLM2-135M-Instruct" if config.checkpoint == "asset:smollm2" else config.checkpoint
  if args.random_weights:
    from astro_jax.stages import common
    src = common.resolve_path(config.checkpoint)  # an HF directory (config and tokenizer files are kept)
    config.checkpoint = str(random_checkpoint(src, Path(tempfile.gettempdir()) / "astro_jax_random_smollm2"))
    model += " (random weights: rewards are all wrong, dynamic sampling runs every round)"
    # every reward is wrong, so dynamic sampling would keep no group and nothing would be trained: train them all
    config.dynamic_sampling = False
  config.steps = args.steps
  config.save_every = args.steps
  config.export_hf = False
  config.eval.every = 0
  config.overwrite = True
  return config, model


def step_row(m: dict, s: dict, config, common: dict) -> dict:
  """One benchmark row from a metrics.jsonl row `m` and the instrumented sampler's record `s` of the same step."""
  wall, sync, sampling, training = (m["time_s"], m["time_weight_sync"], m["time_sampling"], m["time_training"])
  from astro_jax.rl.learner import LearnerConfig
  lc = LearnerConfig.from_config(config)  # padded: rows x seq_len; packed: packed_rows x grad_accum of train_tokens
  positions = (lc.update_rows * config.minibatches + m.get("spilled_micro_batches", 0) * lc.packed_rows) * \
      lc.update_seq_len
  sampled = m["tokens_per_s"] * wall
  host = sampling - s["prefill"] - s["decode"]
  return dict(
      common, step=str(m["step"]), steps=1, time_s=round(wall, 3), time_weight_sync=round(sync, 3),
      time_sampling=round(sampling, 3), time_prefill=round(s["prefill"], 3), time_decode=round(s["decode"], 3),
      time_sampling_host=round(host, 3), time_scoring=round(m["time_scoring"], 3),
      time_training=round(training, 3), time_other=round(wall - sync - sampling - training, 3),
      sampling_fraction=round(sampling / wall, 4), training_fraction=round(training / wall, 4),
      sampled_tokens=int(round(sampled)), tokens_per_s=round(sampled / wall, 2),
      sampling_tokens_per_s=round(sampled / max(sampling, 1e-9), 2),
      decode_row_steps=s["row_steps"], decode_row_steps_per_s=round(s["row_steps"] / max(s["decode"], 1e-9), 2),
      trained_positions=positions, trained_positions_per_s=round(positions / max(training, 1e-9), 2),
      packed_fill=m.get("packed_fill"), spilled_micro_batches=m.get("spilled_micro_batches"),
      trained_tokens=m.get("tokens_trained"),
      trained_tokens_per_s=None if m.get("tokens_trained") is None else round(m["tokens_trained"] / training, 2),
      finished_row_fraction=round(m["finished_row_fraction"], 4), sampling_rounds=m["sampling_rounds"],
      sampler_batches=s["batches"], groups=m["groups"], compiles=m["compiles"],
      response_length_mean=round(m["response_length_mean"], 1), truncation_rate=round(m["truncation_rate"], 3),
      accuracy=round(m["accuracy"], 3), others_cores=round(s["others"], 2), peak_rss_gib=round(s["peak_rss_gib"], 2))


def summary_row(rows: list[dict]) -> dict:
  """Steps 2..N together: sums of times and tokens, fractions and rates of the sums."""
  t = {k: sum(r[k] for r in rows) for k in rows[0] if k.startswith("time_") or k in (
      "sampled_tokens", "decode_row_steps", "trained_positions", "sampling_rounds", "sampler_batches", "groups",
      "compiles")}
  finished = sum(r["finished_row_fraction"] * r["decode_row_steps"] for r in rows) / max(t["decode_row_steps"], 1)
  trained = None if rows[0]["trained_tokens"] is None else sum(r["trained_tokens"] for r in rows)
  return dict(
      rows[0], step=f"{rows[0]['step']}-{rows[-1]['step']}", steps=len(rows), **{k: round(v, 3) for k, v in t.items()},
      sampling_fraction=round(t["time_sampling"] / t["time_s"], 4),
      training_fraction=round(t["time_training"] / t["time_s"], 4),
      tokens_per_s=round(t["sampled_tokens"] / t["time_s"], 2),
      sampling_tokens_per_s=round(t["sampled_tokens"] / t["time_sampling"], 2),
      decode_row_steps_per_s=round(t["decode_row_steps"] / max(t["time_decode"], 1e-9), 2),
      trained_positions_per_s=round(t["trained_positions"] / max(t["time_training"], 1e-9), 2), trained_tokens=trained,
      trained_tokens_per_s=None if trained is None else round(trained / t["time_training"], 2),
      finished_row_fraction=round(finished, 4),
      response_length_mean=round(sum(r["response_length_mean"] for r in rows) / len(rows), 1),
      truncation_rate=round(sum(r["truncation_rate"] for r in rows) / len(rows), 3),
      accuracy=round(sum(r["accuracy"] for r in rows) / len(rows), 3),
      others_cores=round(max(r["others_cores"] for r in rows), 2), peak_rss_gib=max(r["peak_rss_gib"] for r in rows))


def print_table(rows: list[dict]) -> None:
  pct = lambda r, k: f"{r[k]:.1f} ({r[k] / r['time_s']:.0%})"
  print(f"\n{'step':>5} {'wall s':>7} {'sync':>5} {'sampling s':>12} {'prefill':>7} {'decode':>7} {'host':>5} "
        f"{'scoring':>7} {'training s':>12} {'other':>5} {'tok/s':>6} {'samp tok/s':>10} {'train pos/s':>11} "
        f"{'train tok/s':>11} {'finished':>8} {'rounds':>6} {'groups':>6} {'compiles':>8} {'others':>6} {'RSS GiB':>7}")
  for r in rows:
    print(f"{r['step']:>5} {r['time_s']:>7.1f} {r['time_weight_sync']:>5.2f} {pct(r, 'time_sampling'):>12} "
          f"{r['time_prefill']:>7.2f} {r['time_decode']:>7.1f} {r['time_sampling_host']:>5.2f} "
          f"{r['time_scoring']:>7.2f} {pct(r, 'time_training'):>12} {r['time_other']:>5.2f} "
          f"{r['tokens_per_s']:>6.1f} {r['sampling_tokens_per_s']:>10.1f} {r['trained_positions_per_s']:>11.1f} "
          f"{'-' if r['trained_tokens_per_s'] is None else format(r['trained_tokens_per_s'], '.1f'):>11} "
          f"{r['finished_row_fraction']:>8.3f} {r['sampling_rounds']:>6} {r['groups']:>6} {r['compiles']:>8} "
          f"{r['others_cores']:>6.2f} {r['peak_rss_gib']:>7.1f}")
  r = rows[0]
  print(f"({r['device']}; {r['model']}; {r['dtype']}; remat {r['remat']}; {r['rows']} rows x {r['seq_len']} tokens, "
        f"{r['max_new_tokens']} new; step 1 compiles; '{rows[-1]['step']}' = the steady steps summed; times in s "
        f"(% of the step); scoring overlaps sampling; finished = decoded row-steps on rows already finished; "
        f"others = cores other processes used; RSS = this process's peak resident memory so far)")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=3, help="RL steps (the first compiles; >= 2 for a steady state)")
  ap.add_argument("--config", default=str(REPO / "configs" / "rl_smollm2.py"))
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rl_step.json"))
  ap.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=0, help="override sampling.max_new_tokens")
  ap.add_argument("--batch-prompts", "--batch_prompts", type=int, default=0, help="override batch_prompts")
  ap.add_argument("--dtype", default="", help="sampler and trainer compute dtype (default: the config's; GPU bf16)")
  ap.add_argument("--remat", default="", help="override model.remat (the trainer's rematerialisation: none, full)")
  ap.add_argument("--checkpoint", default="", help="override the config's checkpoint")
  ap.add_argument("--random-weights", action="store_true",
                  help="the checkpoint's config and tokenizer with random weights (where the weights are absent)")
  ap.add_argument("--wait-idle", type=float, default=30.0,
                  help="before the run wait up to this many seconds for other processes to go quiet (0: don't)")
  ap.add_argument("--layouts", default="",
                  type=lambda v: [x for x in v.split(",") if x],
                  help="comma-separated update layouts NAME[:TRAIN_TOKENS], one run each, side by side: padded "
                       "(train_tokens 0), packed (share_prompts off), shared (share_prompts on), e.g. "
                       "padded,packed:640,shared:704; default: the config's own")
  ap.add_argument("--no-write", action="store_true", help="print the table only")
  args = ap.parse_args()
  if args.steps < 1:
    sys.exit("--steps must be >= 1")

  config, model = make_config(args)
  device = device_name()
  print(f"device: {device}; host cpu {host_cpu()}; jax {jax.__version__}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}; load average {load_average()}", flush=True)
  print(f"config {args.config}: {config.batch_prompts} prompts x {config.group_size} responses, "
        f"{config.sampling.max_new_tokens} new tokens, rows of {rl.seq_len(config)}; dtype trainer "
        f"{config.model.dtype}, sampler {config.sampler.dtype}; remat {config.model.remat}; {args.steps} steps",
        flush=True)
  if args.wait_idle > 0:
    print(f"waited {wait_idle(args.wait_idle):.0f}s for the machine to go quiet", flush=True)

  rows, steady = [], {}
  for spec in args.layouts or [f"{layout_of(config)}:{config.train_tokens}"]:
    layout, _, tokens = spec.partition(":")
    if layout not in LAYOUTS or (layout != "padded") != tokens.isdigit():
      sys.exit(f"--layouts: {spec!r} is not padded, packed:N or shared:N")
    config.train_tokens = int(tokens or 0)
    config.share_prompts = layout == "shared"
    rl.check(config)
    layout_rows = run_layout(config, args, device, model)
    print_table(layout_rows)
    rows += layout_rows
    last = layout_rows[-1]
    steady[spec] = last["time_training"] / last["steps"] if len(layout_rows) > 1 else None
  if len(steady) > 1 and all(steady.values()):
    base = next(iter(steady))
    print("update (time_training per steady step): " + "; ".join(
        f"{t}: {v:.1f} s = {v / steady[base]:.2f}x" for t, v in steady.items()))
  if not args.no_write:
    write_rows(Path(args.out), rows, device)


LAYOUTS = ("padded", "packed", "shared")


def layout_of(config) -> str:
  return "padded" if not config.train_tokens else "shared" if config.share_prompts else "packed"


def run_layout(config, args, device: str, model: str) -> list[dict]:
  """One in-process run of the stage on `config`: its per-step rows (+ the steady steps summed)."""
  TimedSampler.steps, TimedSampler.probe = [], None
  with tempfile.TemporaryDirectory(prefix="rl_step_") as tmp:
    config.output_dir = str(Path(tmp) / "run")
    TimedSampler.probe = OthersProbe()
    began = time.perf_counter()
    rl.run(config, make_sampler=TimedSampler)
    TimedSampler.close_step()
    total = time.perf_counter() - began
    metrics = [json.loads(l) for l in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines() if l]
  if len(metrics) != len(TimedSampler.steps):
    raise RuntimeError(f"{len(metrics)} metrics rows but {len(TimedSampler.steps)} sampler step records")
  print(f"run ({layout_of(config)}, train_tokens {config.train_tokens}): {total:.0f}s in all (model loading, "
        f"{args.steps} steps, the final checkpoint); load average at the end {load_average()}", flush=True)

  common = dict(device=device, cpu=host_cpu(), model=model, config=_display_path(args.config),
                dtype=f"trainer {config.model.dtype}, sampler {config.sampler.dtype}", remat=config.model.remat,
                batch_prompts=config.batch_prompts, group_size=config.group_size,
                rows=config.batch_prompts * config.group_size, seq_len=rl.seq_len(config),
                layout=layout_of(config), train_tokens=config.train_tokens,
                max_new_tokens=config.sampling.max_new_tokens, temperature=config.sampling.temperature, minibatches=config.minibatches, jax=jax.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""), code_version=code_version(),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
  rows = [step_row(m, s, config, common) for m, s in zip(metrics, TimedSampler.steps)]
  if len(rows) > 2:
    rows.append(summary_row(rows[1:]))
  return rows


if __name__ == "__main__":
  main()
