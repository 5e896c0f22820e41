#!/usr/bin/env python3
"""The experiment's analysis (issue 22), from the committed files under results/ only.

  python experiments/astro_vs_direct/analyze.py                          # results/ -> results.json, table.md, PNGs
  python experiments/astro_vs_direct/analyze.py --collect outputs/astro_vs_direct   # copy a run's files first

--collect copies from a pipeline run directory what the analysis reads (and nothing else) into results/: every
eval's per-response rows (gzipped JSONL), each RL run's metrics.jsonl, the difficulty and mcts summaries and
pipeline.json. Layout of results/ (the run's own): base/eval/, <arm>/seed<N>/{eval_sft,eval_rl,rl,difficulty}/.

Numbers (every interval a 95% percentile bootstrap, `RESAMPLES` resamples, numpy default_rng(`SEED`)):
  pass@1      per (model, seed, problem): the fraction of its samples that are correct; a model's pass@1 is the
              mean over seeds and problems. CI: seeds and problems resampled together (a resample draws seeds with
              replacement, then problems with replacement, the same problems for every drawn seed).
  paired diff ASTRO-RL - Direct-RL per (seed, problem) (the same seed's two arms on the same problem), resampled as
              above: a CI excluding 0 answers Q1.
  maj@k, length (tokens), backtracks/response: means over seeds of astro_jax.report's per-run values.
  per level   the same pass@1 and paired difference on each level's problems (the problem id names its level).
  correlations (Q3) Pearson r with a Fisher-z CI (astro_jax.report.pearson_with_ci): across checkpoints (one point
              per evaluated model and seed: backtracks/response vs pass@1), per problem and per response (pooled
              over the RL checkpoints of both arms).
  RL curves   per arm, the mean over seeds of each step's training accuracy, response length and backtracks.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from astro_jax import report  # noqa: E402

RESULTS = HERE / "results"
ARMS = ("astro", "direct")
MODELS = (("base", None, "eval"), ("Direct-SFT", "direct", "eval_sft"), ("ASTRO-SFT", "astro", "eval_sft"),
          ("Direct-RL", "direct", "eval_rl"), ("ASTRO-RL", "astro", "eval_rl"))  # the paper's row order
CURVES = (("accuracy", "accuracy (training samples)"), ("response_length_mean", "response length (tokens)"),
          ("backtracks_per_response", "backtracks / response"))
RESAMPLES, SEED = 2000, 0
LEVEL = re.compile(r"/L(\d+)/")


# --- collecting a run's files -----------------------------------------------------------------------------------

def collect(run: Path, dest: Path = RESULTS) -> list[Path]:
  """Copy what the analysis reads from pipeline run `run` into `dest` (eval rows gzipped); returns the files."""
  wanted = [p for p in run.glob("**/*.jsonl") if p.parent.name.startswith("eval") and not p.name.startswith(".")]
  wanted += list(run.glob("*/seed*/rl/metrics.jsonl")) + list(run.glob("*/seed*/difficulty/summary.json"))
  wanted += [p for p in (run / "mcts" / "summary.json", run / "pipeline.json") if p.exists()]
  out = []
  for src in sorted(wanted):
    rel = src.relative_to(run)
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if src.parent.name.startswith("eval") and src.suffix == ".jsonl":
      target = target.with_name(target.name + ".gz")
      with open(src, "rb") as f, open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as g:
        shutil.copyfileobj(f, g)  # mtime 0: the same bytes every time
    else:
      shutil.copyfile(src, target)
    out.append(target)
  return out


# --- reading results/ ---------------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict]:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def eval_file(results: Path, arm: str | None, sub: str, seed: int | None) -> Path | None:
  folder = results / "base" / "eval" if arm is None else results / arm / f"seed{seed}" / sub
  found = sorted(folder.glob("*.jsonl.gz")) + sorted(folder.glob("*.jsonl"))
  return found[0] if found else None


def seeds_of(results: Path) -> list[int]:
  """The replicates both arms have (eval_rl rows of each)."""
  have = [{int(p.name[4:]) for p in (results / arm).glob("seed*") if p.name[4:].isdigit()
           and eval_file(results, arm, "eval_rl", int(p.name[4:]))} for arm in ARMS]
  return sorted(set.intersection(*have)) if all(have) else []


def load(results: Path) -> dict[str, dict[int, list[dict]]]:
  """{model label: {seed: eval rows}} (base: the one shared eval, under every seed)."""
  seeds = seeds_of(results)
  read = functools.cache(read_rows)  # the base eval's one file serves every seed
  out: dict[str, dict[int, list[dict]]] = {}
  for label, arm, sub in MODELS:
    runs = {}
    for seed in seeds:
      path = eval_file(results, arm, sub, seed)
      if path is not None:
        runs[seed] = read(path)
    if runs:
      out[label] = runs
  return out


def level_of(problem_id: str) -> int | None:
  m = LEVEL.search(problem_id)
  return int(m.group(1)) if m else None


# --- numbers ------------------------------------------------------------------------------------------------------

def rates(rows: list[dict]) -> dict[str, float]:
  """Problem id -> the fraction of its samples that are correct."""
  return {r["id"]: float(np.mean([bool(s["correct"]) for s in r["samples"]])) for r in rows if r.get("samples")}


def rate_matrix(runs: dict[int, list[dict]], seeds: list[int], problems: list[str]) -> np.ndarray:
  """[seeds, problems] pass rates."""
  per = {s: rates(runs[s]) for s in seeds}
  return np.array([[per[s][p] for p in problems] for s in seeds], dtype=np.float64)


def bootstrap_seeds_problems(values_SP: np.ndarray, resamples: int = RESAMPLES,
                             seed: int = SEED) -> tuple[float, float]:
  """95% interval of the mean of a [seeds, problems] matrix, seeds and problems resampled together."""
  S, P = values_SP.shape
  rng = np.random.default_rng(seed)
  s_idx = rng.integers(0, S, size=(resamples, S))
  p_idx = rng.integers(0, P, size=(resamples, P))
  means = values_SP[s_idx[:, :, None], p_idx[:, None, :]].mean(axis=(1, 2))
  low, high = np.percentile(means, [2.5, 97.5])
  return float(low), float(high)


def mean_ci(values_SP: np.ndarray) -> dict:
  low, high = bootstrap_seeds_problems(values_SP)
  return {"mean": float(values_SP.mean()), "ci_low": low, "ci_high": high, "seeds": int(values_SP.shape[0]),
          "problems": int(values_SP.shape[1])}


def model_table(data: dict[str, dict[int, list[dict]]], problems: list[str]) -> list[dict]:
  """The paper-layout rows: pass@1 (CI over seeds and problems), maj@k, length, backtracks per response."""
  out = []
  for label, runs in data.items():
    seeds = sorted(runs)
    cells = [report.benchmark_cell(runs[s]) for s in seeds]
    out.append({"model": label, "pass@1": mean_ci(rate_matrix(runs, seeds, problems)),
                "maj_k": cells[0]["maj_k"], "maj@k": float(np.mean([c["maj@k"] for c in cells])),
                "mean_response_tokens": float(np.mean([c["mean_response_tokens"] for c in cells])),
                "backtracks_per_response": float(np.mean([c["backtracks_per_response"] for c in cells]))})
  return out


def paired(data: dict, problems: list[str], a: str = "ASTRO-RL", b: str = "Direct-RL") -> dict | None:
  """a - b per (seed, problem), with its bootstrap CI over seeds and problems."""
  if a not in data or b not in data:
    return None
  seeds = sorted(set(data[a]) & set(data[b]))
  diff = rate_matrix(data[a], seeds, problems) - rate_matrix(data[b], seeds, problems)
  return {"models": f"{a} - {b}", **mean_ci(diff)}


def per_level(data: dict, problems: list[str]) -> dict[str, dict]:
  levels = sorted({level_of(p) for p in problems if level_of(p) is not None})
  out = {}
  for level in levels:
    subset = [p for p in problems if level_of(p) == level]
    out[str(level)] = {"problems": len(subset),
                       "pass@1": {label: mean_ci(rate_matrix(runs, sorted(runs), subset))
                                  for label, runs in data.items()},
                       "paired": paired(data, subset)}
  return out


def correlations(data: dict) -> dict:
  """Q3: backtracks vs correctness across checkpoints, per problem and per response."""
  points = [(report.per_problem_mean(rows, lambda s: float(report.backtracks_of(s))),
             float(np.mean(list(rates(rows).values())))) for runs in data.values() for rows in runs.values()]
  rl_rows = [r for label in ("ASTRO-RL", "Direct-RL") for rows in data.get(label, {}).values() for r in rows]
  pooled = report.backtrack_correlations(rl_rows) if rl_rows else None
  return {"checkpoints": report.pearson_with_ci([p[0] for p in points], [p[1] for p in points],
                                                ("backtracks per response", "pass@1")),
          "problem_rl": pooled and pooled["problem"], "response_rl": pooled and pooled["response"]}


def rl_curves(results: Path, seeds: list[int]) -> dict[str, dict[str, list]]:
  """{arm: {"step": [...], metric: [mean over seeds per step]}}, steps every seed has."""
  out = {}
  for arm in ARMS:
    runs = [[r for r in report.iter_jsonl(results / arm / f"seed{s}" / "rl" / "metrics.jsonl")
             if isinstance(r.get("step"), (int, float))] for s in seeds]
    if not runs or not all(runs):
      continue
    steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in runs]))
    curve: dict[str, list] = {"step": steps}
    for key, _ in CURVES:
      by_step = [{r["step"]: r.get(key) for r in rows} for rows in runs]
      curve[key] = [float(np.mean([b[t] for b in by_step])) if all(report._finite(b.get(t)) for b in by_step)
                    else None for t in steps]
    out[arm] = curve
  return out


def analyze(results: Path = RESULTS) -> dict:
  data = load(results)
  if not data:
    raise SystemExit(f"{results}: no eval rows of both arms (run the experiment, then --collect its run directory)")
  problems = sorted(set.intersection(*[set(rates(rows)) for runs in data.values() for rows in runs.values()]))
  seeds = seeds_of(results)
  return {"seeds": seeds, "problems": len(problems), "table": model_table(data, problems),
          "paired": paired(data, problems), "per_level": per_level(data, problems),
          "correlations": correlations(data), "rl_curves": rl_curves(results, seeds),
          "method": {"resamples": RESAMPLES, "seed": SEED, "ci": "percentile bootstrap, seeds and problems together",
                     "r_ci": report.CI_METHOD_R}}


# --- writing ------------------------------------------------------------------------------------------------------

def _ci(c: dict | None) -> str:
  return "–" if not c else f"{100 * c['mean']:.1f} [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}]"


def table_markdown(out: dict) -> str:
  lines = [f"Seeds {out['seeds']}, {out['problems']} test problems; pass@1 in % with 95% CI over seeds and problems.",
           "", "| model | pass@1 | maj@k | tokens / response | backtracks / response |", "|---|---:|---:|---:|---:|"]
  for row in out["table"]:
    lines.append(f"| {row['model']} | {_ci(row['pass@1'])} | {100 * row['maj@k']:.1f} (k={row['maj_k']}) | "
                 f"{row['mean_response_tokens']:.1f} | {row['backtracks_per_response']:.2f} |")
  if out["paired"]:
    lines += ["", f"Paired {out['paired']['models']}: {_ci(out['paired'])} points."]
  levels = out["per_level"]
  if levels:
    labels = [row["model"] for row in out["table"]]
    lines += ["", "| level | problems | " + " | ".join(labels) + " | ASTRO-RL - Direct-RL |",
              "|---|---:|" + "---:|" * (len(labels) + 1)]
    for level, entry in levels.items():
      lines.append(f"| {level} | {entry['problems']} | " + " | ".join(_ci(entry["pass@1"].get(m)) for m in labels)
                   + f" | {_ci(entry['paired'])} |")
  corr = out["correlations"]
  lines += ["", "| backtracks vs correctness | n | r [95% CI] |", "|---|---:|---|"]
  for name, key in (("across checkpoints", "checkpoints"), ("per problem (RL models)", "problem_rl"),
                    ("per response (RL models)", "response_rl")):
    c = corr.get(key)
    r = "–" if not c or c["r"] is None else (f"{c['r']:.2f}" + (f" [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
                                                                if c["ci_low"] is not None else ""))
    lines.append(f"| {name} | {c['n'] if c else 0} | {r} |")
  return "\n".join(lines) + "\n"


def curves_png(curves: dict, path: Path) -> None:
  plt = report._pyplot()
  fig, axes = plt.subplots(1, len(CURVES), figsize=(12, 3.2), dpi=100)
  for ax, (key, label) in zip(axes, CURVES):
    for arm, curve in curves.items():
      pts = [(t, v) for t, v in zip(curve["step"], curve[key]) if v is not None]
      if pts:
        ax.plot(*zip(*pts), marker="o", ms=2, lw=1.2, color=report.ARM_COLOURS.get(arm), label=arm)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("RL step", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  path.write_bytes(report._png(fig))


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--collect", type=Path, default=None, help="a pipeline run directory to copy results/ from first")
  ap.add_argument("--results", type=Path, default=RESULTS)
  args = ap.parse_args(argv)
  if args.collect is not None:
    print(f"collected {len(collect(args.collect, args.results))} files into {args.results}")
  out = analyze(args.results)
  folder = args.results.parent
  (folder / "results.json").write_text(json.dumps(report._json_safe(out), indent=2) + "\n")
  (folder / "table.md").write_text(table_markdown(out))
  if out["rl_curves"]:
    curves_png(out["rl_curves"], folder / "rl_curves.png")
  print(table_markdown(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
