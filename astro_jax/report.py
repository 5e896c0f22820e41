"""The run report: `RUN/report.md`, a self-contained `RUN/report.html` and `RUN/report.json`, from the files of a
pipeline run directory only, callable after every stage (a section whose inputs are missing says "not run yet").

  python -m astro_jax.report RUN          # (re)write the report of RUN and print the table

Layout read (written by the `pipeline` stage; every part optional):
  pipeline.json                {"config": {...}, "stages": [{"name", "dir", "status", "wall_s", "compile_s", ...}]}
  mcts/                        summary.json, trees.jsonl, sft.jsonl
  base/eval/                   <benchmark>.jsonl rows {"id", "benchmark", "gold", "samples": [...]}
  <arm>/sft/, <arm>/rl/        metrics.jsonl;  <arm>/difficulty/summary.json;  <arm>/eval_sft/, <arm>/eval_rl/
with <arm> in {astro, direct}, or <arm>/seed<N>/ for a replicate run (pipeline.json's config `seed` N >= 0: the
report shows that replicate's models; mcts/ and base/eval/ are every replicate's).

How every number of the table is computed (from the per-response rows of `<benchmark>.jsonl`; the functions below
are pure and small, so anyone can recompute them):
  pass@1        per problem: the fraction of its n samples that are correct; the mean over problems. 95% CI: the
                percentile bootstrap over problems (`bootstrap_ci`: numpy default_rng(BOOTSTRAP_SEED), an index
                matrix rng.integers(0, P, (BOOTSTRAP_RESAMPLES, P)), the 2.5th / 97.5th percentiles of the resampled
                means, numpy's default linear interpolation).
  maj@k         k = the least sample count of a problem; a problem's samples are cut into consecutive chunks of k
                (`eval_metrics.maj_at_k`), a chunk scores 1 when its largest answer group is correct (ties: the group
                seen first). Groups: every correct sample is one group (each equals the gold), other answers by
                `verifier.normalize_answer` string equality; no answer never votes. The mean over problems.
  tokens        `n_tokens` per response, averaged per problem, then over problems.
  backtracks    `backtracks` per response (or `prompts.count_backtracks(text)` for rows without it), likewise.
Backtracks vs correctness: Pearson r of (backtracks, correct 0/1) over all responses, and of (a problem's mean
backtracks, its pass rate) over problems; 95% CI by the Fisher z transform, tanh(atanh(r) +- 1.96 / sqrt(n - 3))
(the response-level interval treats responses as independent: a problem's samples are not, so it is optimistic).
Undefined (said, never NaN) when n < 2 or either variable is constant; its CI when n <= 3.
"""
from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import math
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from astro_jax import files

NOT_RUN = "not run yet"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
Z_95 = 1.959963984540054
ARMS = ("astro", "direct")
MODELS = (("base", "", "base/eval"), ("ASTRO-SFT", "astro", "eval_sft"), ("ASTRO-RL", "astro", "eval_rl"),
          ("Direct-SFT", "direct", "eval_sft"), ("Direct-RL", "direct", "eval_rl"))  # (label, arm, its stage dir)
OPTIONAL_MODELS = ("Direct-SFT", "Direct-RL")  # rows shown only when their stage ran or is listed
BENCHMARK_ORDER = ("math500", "amc23", "aime24", "gsm8k")
BENCHMARK_TITLES = {"math500": "MATH-500", "amc23": "AMC 2023", "aime24": "AIME 2024", "gsm8k": "GSM8K"}
# (metrics.jsonl key, plot title, table column)
RL_PANELS = (("reward_mean", "reward", "reward"), ("accuracy", "accuracy (training samples)", "accuracy"),
             ("response_length_mean", "response length (tokens)", "tokens"),
             ("backtracks_per_response", "backtracks / response", "backtracks"),
             ("reflections_per_response", "reflections / response", "reflections"),
             ("entropy", "entropy (nats / token)", "entropy"), ("clip_fraction", "clipped token fraction", "clipped"))
RL_EVAL_OVERLAY = {"accuracy": "eval_pass@1", "response_length_mean": "eval_mean_response_tokens",
                   "backtracks_per_response": "eval_mean_backtracks",
                   "reflections_per_response": "eval_mean_reflections"}
ASSETS = "report_files"  # beside report.md: its PNGs and the tree viewer page
CI_METHOD_PASS = f"percentile bootstrap over problems ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})"
CI_METHOD_R = "Fisher z transform, tanh(atanh(r) ± 1.96/√(n−3))"


# ---------------------------------------------------------------------------------------------------------------
# Statistics (pure)
# ---------------------------------------------------------------------------------------------------------------

def sample_lists(rows: Sequence[dict]) -> list[list[dict]]:
  """Each problem's samples (problems without samples are dropped)."""
  return [list(row["samples"]) for row in rows if row.get("samples")]


def backtracks_of(sample: dict) -> int:
  """A response's backtrack count: its `backtracks` field, or counted in its text (rows of older eval runs)."""
  if sample.get("backtracks") is not None:
    return int(sample["backtracks"])
  from astro_jax import prompts
  return prompts.count_backtracks(str(sample.get("text") or ""))


def bootstrap_ci(values: Sequence[float], seed: int = BOOTSTRAP_SEED,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
  """95% percentile-bootstrap interval of the mean of `values` (resampled with replacement, seeded)."""
  v = np.asarray(values, dtype=np.float64)
  if v.size == 0:
    raise ValueError("no values")
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return float(low), float(high)


def pass_at_1_ci(rows: Sequence[dict], seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
  """pass@1 (the mean over problems of each problem's fraction of correct samples) with its bootstrap 95% CI."""
  rates = [float(np.mean([bool(s["correct"]) for s in samples])) for samples in sample_lists(rows)]
  low, high = bootstrap_ci(rates, seed, resamples)
  return {"mean": float(np.mean(rates)), "ci_low": low, "ci_high": high, "n_problems": len(rates)}


def vote_key(sample: dict) -> str | None:
  """What a sample votes for in maj@k: one key for every correct sample, else its normalised answer (None: none)."""
  if sample.get("answer") is None:
    return None
  if sample.get("correct"):
    return "\x00correct"
  from astro_jax.verifier import normalize_answer
  return normalize_answer(str(sample["answer"]))


def maj_at_k(rows: Sequence[dict], k: int) -> float:
  """maj@k: the mean over problems of `eval_metrics.maj_at_k` over the samples' vote keys (`vote_key`)."""
  from astro_jax import eval_metrics
  scores = []
  for samples in sample_lists(rows):
    keyed = [eval_metrics.Sample(bool(s["correct"]), vote_key(s), 0, 0) for s in samples]
    scores.append(eval_metrics.maj_at_k(keyed, k, equal=lambda a, b: a == b))
  return float(np.mean(scores))


def per_problem_mean(rows: Sequence[dict], value: Callable[[dict], float]) -> float:
  """The mean over problems of each problem's mean `value(sample)`."""
  return float(np.mean([np.mean([value(s) for s in samples]) for samples in sample_lists(rows)]))


def pearson_with_ci(x: Sequence[float], y: Sequence[float], names: tuple[str, str] = ("x", "y")) -> dict:
  """{"n", "r", "ci_low", "ci_high", "undefined"}: Pearson r with its Fisher-z 95% CI; r (and the CI) is None, and
  "undefined" says why, when there are fewer than 2 pairs or a variable is constant (the CI alone when n <= 3)."""
  a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f"x and y differ in length: {a.size} and {b.size}")
  out: dict[str, Any] = {"n": int(a.size), "r": None, "ci_low": None, "ci_high": None, "undefined": None}
  if a.size < 2:
    out["undefined"] = f"{a.size} pair{'s' if a.size != 1 else ''}"
    return out
  for name, v in zip(names, (a, b)):
    if np.all(v == v[0]):
      out["undefined"] = f"{name} always {v[0]:g}"
      return out
  da, db = a - a.mean(), b - b.mean()
  r = float(np.clip(np.sum(da * db) / math.sqrt(np.sum(da * da) * np.sum(db * db)), -1.0, 1.0))
  out["r"] = r
  if a.size <= 3:
    out["undefined"] = "CI needs n > 3"
  elif abs(r) == 1.0:
    out["ci_low"] = out["ci_high"] = r
  else:
    z, half = math.atanh(r), Z_95 / math.sqrt(a.size - 3)
    out["ci_low"], out["ci_high"] = math.tanh(z - half), math.tanh(z + half)
  return out


def backtrack_correlations(rows: Sequence[dict]) -> dict:
  """{"response": r of (backtracks, correct) over responses, "problem": r of (mean backtracks, pass rate) over
  problems}, each `pearson_with_ci`'s dict."""
  lists = sample_lists(rows)
  bt = [backtracks_of(s) for samples in lists for s in samples]
  ok = [float(bool(s["correct"])) for samples in lists for s in samples]
  mean_bt = [float(np.mean([backtracks_of(s) for s in samples])) for samples in lists]
  rate = [float(np.mean([bool(s["correct"]) for s in samples])) for samples in lists]
  return {"response": pearson_with_ci(bt, ok, ("backtracks", "correctness")),
          "problem": pearson_with_ci(mean_bt, rate, ("mean backtracks", "pass rate"))}


def benchmark_cell(rows: Sequence[dict], seed: int = BOOTSTRAP_SEED) -> dict | None:
  """One (model, benchmark) cell of the table from its eval rows (None: no problem with samples)."""
  lists = sample_lists(rows)
  if not lists:
    return None
  k = min(len(s) for s in lists)
  return {"n_problems": len(lists), "samples_per_problem": k, "n_responses": sum(len(s) for s in lists),
          "pass@1": pass_at_1_ci(rows, seed), "maj_k": k, "maj@k": maj_at_k(rows, k),
          "mean_response_tokens": per_problem_mean(rows, lambda s: float(s["n_tokens"])),
          "backtracks_per_response": per_problem_mean(rows, lambda s: float(backtracks_of(s))),
          "correlation": backtrack_correlations(rows)}


# ---------------------------------------------------------------------------------------------------------------
# Reading the run directory
# ---------------------------------------------------------------------------------------------------------------

def iter_jsonl(path: Path) -> Iterator[dict]:
  """The JSON objects of a JSONL file, streamed; blank, torn or malformed lines are skipped (a report reads files a
  running stage may be writing). Nothing when the file is missing."""
  try:
    f = open(path, "rb")
  except (FileNotFoundError, NotADirectoryError):
    return
  with f:
    for line in f:
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError:
        continue
      if isinstance(obj, dict):
        yield obj


def read_json(path: Path) -> dict | None:
  """A JSON object file, or None when it is missing or unreadable."""
  try:
    obj = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return obj if isinstance(obj, dict) else None


def stage_states(pipeline: dict | None) -> dict[str, dict]:
  """pipeline.json's stages by their dir (normalised) and by their name."""
  out: dict[str, dict] = {}
  for stage in (pipeline or {}).get("stages") or []:
    if not isinstance(stage, dict):
      continue
    for key in (stage.get("dir"), stage.get("name")):
      if key:
        out.setdefault(os.path.normpath(str(key)), stage)
  return out


def status_of(run_dir: Path, rel: str, stages: dict[str, dict]) -> str:
  """done / running / skipped (pipeline.json's word), else "done" when the directory has files, else NOT_RUN."""
  stage = stages.get(os.path.normpath(rel))
  if stage and stage.get("status"):
    return str(stage["status"])
  d = run_dir / rel
  return "done" if d.is_dir() and any(d.iterdir()) else NOT_RUN


def benchmark_names(eval_dirs: Sequence[Path]) -> list[str]:
  """The benchmarks with rows in any of the eval directories, the bundled ones first in their usual order."""
  names = {p.stem for d in eval_dirs if d.is_dir() for p in d.glob("*.jsonl") if not p.name.startswith(".")}
  return [b for b in BENCHMARK_ORDER if b in names] + sorted(names - set(BENCHMARK_ORDER))


def arm_dir(arm: str, seed: int = -1) -> str:
  """Where an arm's stages are, relative to the run: <arm>, or <arm>/seed<N> for replicate N (the pipeline's `seed`)."""
  return f"{arm}/seed{seed}" if seed >= 0 else arm


def run_seed(pipeline: dict | None) -> int:
  """The replicate the run directory's last pipeline run was (pipeline.json's config `seed`; -1: none)."""
  seed = ((pipeline or {}).get("config") or {}).get("seed", -1)
  return seed if isinstance(seed, int) and not isinstance(seed, bool) else -1


def collect_table(run_dir: Path, stages: dict[str, dict], seed: int = BOOTSTRAP_SEED, replicate: int = -1) -> dict:
  """The paper's table and the backtracks-vs-correctness numbers, one row per model (report.json's "table")."""
  models = [(label, f"{arm_dir(arm, replicate)}/{sub}" if arm else sub) for label, arm, sub in MODELS]
  models = [(label, rel) for label, rel in models if label not in OPTIONAL_MODELS or (run_dir / rel).is_dir()
            or stages.get(os.path.normpath(rel), {}).get("status") not in (None, "skipped")]
  benchmarks = benchmark_names([run_dir / rel for _, rel in models])
  rows = []
  for label, rel in models:
    status = status_of(run_dir, rel, stages)
    cells = {}
    for b in benchmarks:
      cell = benchmark_cell(list(iter_jsonl(run_dir / rel / f"{b}.jsonl")), seed)
      if cell is not None:
        cells[b] = cell
    rows.append({"model": label, "dir": rel, "status": status if cells or status != "done" else "no eval rows",
                 "benchmarks": cells})
  return {"benchmarks": benchmarks, "rows": rows, "pass@1_ci": CI_METHOD_PASS, "r_ci": CI_METHOD_R,
          "maj_grouping": "correct samples form one group; other answers grouped by verifier.normalize_answer"}


def mcts_section(run_dir: Path, stages: dict[str, dict]) -> dict:
  summary = read_json(run_dir / "mcts" / "summary.json")
  return {"status": status_of(run_dir, "mcts", stages) if summary else _missing(run_dir, "mcts", stages),
          "summary": summary}


def _missing(run_dir: Path, rel: str, stages: dict[str, dict]) -> str:
  """A section's status when its result file is absent: the stage's own word when it is running or skipped."""
  status = status_of(run_dir, rel, stages)
  return status if status in ("running", "skipped") else NOT_RUN


def run_arms(run_dir: Path, pipeline: dict | None) -> tuple[str, ...]:
  """The arms this run has: its config's `arms`, else those with a directory (a run the pipeline did not write)."""
  configured = ((pipeline or {}).get("config") or {}).get("arms") or ""
  words = configured.split(",") if isinstance(configured, str) else configured
  named = tuple(a for a in ARMS if a in {str(x).strip() for x in words})
  return named or tuple(a for a in ARMS if (run_dir / a).is_dir()) or ARMS


def difficulty_section(run_dir: Path, stages: dict[str, dict], arms: Sequence[str] = ARMS, replicate: int = -1) -> dict:
  out = {}
  for arm in arms:
    rel = f"{arm_dir(arm, replicate)}/difficulty"
    s = read_json(run_dir / rel / "summary.json")
    keys = ("problems", "samples_per_problem", "kept", "too_hard", "too_easy", "kept_fraction", "mean_pass_rate")
    out[arm] = ({"status": status_of(run_dir, rel, stages), **{k: s.get(k) for k in keys}} if s
                else {"status": _missing(run_dir, rel, stages)})
  return out


def training_section(run_dir: Path, stages: dict[str, dict], kind: str, arms: Sequence[str] = ARMS,
                     replicate: int = -1) -> dict:
  """Per arm: the status and metrics.jsonl's first and last values (kind: sft or rl)."""
  keys = ("loss", "eval_loss", "lr") if kind == "sft" else tuple(k for k, *_ in RL_PANELS)
  out = {}
  for arm in arms:
    rel = f"{arm_dir(arm, replicate)}/{kind}"
    rows = [r for r in iter_jsonl(run_dir / rel / "metrics.jsonl") if isinstance(r.get("step"), (int, float))]
    if not rows:
      out[arm] = {"status": _missing(run_dir, rel, stages)}
      continue
    entry: dict[str, Any] = {"status": status_of(run_dir, rel, stages), "steps": len(rows),
                             "last_step": rows[-1]["step"], "metrics": {}}
    for key in keys:
      values = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
      if values:
        entry["metrics"][key] = {"first": values[0][1], "last": values[-1][1], "first_step": values[0][0],
                                 "last_step": values[-1][0], "min": min(v for _, v in values),
                                 "max": max(v for _, v in values)}
    if kind == "rl":
      pairs = [(r["backtracks_per_response"], r["accuracy"]) for r in rows
               if _finite(r.get("backtracks_per_response")) and _finite(r.get("accuracy"))]
      entry["steps_correlation"] = pearson_with_ci([p[0] for p in pairs], [p[1] for p in pairs],
                                                   ("backtracks per response", "accuracy"))
    out[arm] = entry
  return out


def _finite(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def stages_section(pipeline: dict | None) -> list[dict]:
  keys = ("name", "dir", "status", "wall_s", "compile_s", "started", "ended")
  return [{k: s.get(k) for k in keys} for s in (pipeline or {}).get("stages") or [] if isinstance(s, dict)]


def collect(run_dir: str | os.PathLike) -> dict:
  """Everything report.json holds, from the run directory's files."""
  run_dir = Path(run_dir)
  pipeline = read_json(run_dir / "pipeline.json")
  stages = stage_states(pipeline)
  arms, replicate = run_arms(run_dir, pipeline), run_seed(pipeline)
  return _json_safe({
      "run_dir": str(run_dir), "config": (pipeline or {}).get("config"), "stages": stages_section(pipeline),
      "replicate": replicate if replicate >= 0 else None,
      "mcts": mcts_section(run_dir, stages), "difficulty": difficulty_section(run_dir, stages, arms, replicate),
      "sft": training_section(run_dir, stages, "sft", arms, replicate),
      "rl": training_section(run_dir, stages, "rl", arms, replicate),
      "table": collect_table(run_dir, stages, replicate=replicate)})


def _json_safe(obj: Any) -> Any:
  """Non-finite floats -> None (report.json never holds NaN)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  return obj


# ---------------------------------------------------------------------------------------------------------------
# The example tree (the viewer of tools/view_tree.py)
# ---------------------------------------------------------------------------------------------------------------

def pick_example(mcts_dir: Path, max_trees: int = 50) -> tuple[dict, list[dict], int] | None:
  """(tree record, the tree's sft rows, the chosen row's index) of a solved tree with a backtracking trace: among the
  first `max_trees` trees of sft.jsonl (a tree's rows are contiguous), the one whose trace has the most backtracks
  (counted up to 2), then the fewest nodes, then the first. None when there is none."""
  rows_by_tree: dict[str, list[dict]] = {}
  for row in iter_jsonl(mcts_dir / "sft.jsonl"):
    tid = str(row.get("tree_id"))
    if tid not in rows_by_tree and len(rows_by_tree) >= max_trees:
      break
    rows_by_tree.setdefault(tid, []).append(row)
  wanted = {tid: rows for tid, rows in rows_by_tree.items()
            if any(r.get("kind") == "search" and (r.get("n_backtracks") or 0) >= 1 for r in rows)}
  best, seen = None, 0
  for record in iter_jsonl(mcts_dir / "trees.jsonl"):
    tid = str(record.get("id"))
    if tid not in wanted or not isinstance(record.get("nodes"), list):
      continue
    seen += 1
    if any(isinstance(n, dict) and n.get("correct") is True for n in record["nodes"]):
      rows = wanted[tid]
      index = max(range(len(rows)), key=lambda i: (rows[i].get("kind") == "search",
                                                   min(rows[i].get("n_backtracks") or 0, 2), -i))
      key = (-min(rows[index].get("n_backtracks") or 0, 2), len(record["nodes"]))
      if best is None or key < best[0]:
        best = (key, record, rows, index)
    if seen == len(wanted):
      break
  return None if best is None else best[1:]


def load_view_tree():
  """tools/view_tree.py as a module (tools/ is not a package), or None when this checkout has no tools/."""
  path = Path(__file__).resolve().parent.parent / "tools" / "view_tree.py"
  if not path.is_file():
    return None
  if "astro_jax_view_tree" not in sys.modules:
    spec = importlib.util.spec_from_file_location("astro_jax_view_tree", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["astro_jax_view_tree"] = module
  return sys.modules["astro_jax_view_tree"]


def example_tree(mcts_dir: Path) -> dict | None:
  """{"id", "row", "rows", "page" (the viewer's HTML, or None), "note"} for the picked tree, or None."""
  picked = pick_example(mcts_dir)
  if picked is None:
    return None
  record, rows, index = picked
  page, note = None, ""
  viewer = load_view_tree()
  if viewer is None:
    note = "tree viewer unavailable: tools/view_tree.py is not in this installation"
  else:
    try:
      page = viewer.build_page(record, rows, index, "sft.jsonl")
    except (viewer.UsageError, ValueError, KeyError, TypeError) as e:
      note = f"tree viewer failed: {e}"
  return {"id": str(record["id"]), "row": rows[index], "index": index, "rows": len(rows), "page": page,
          "note": note, "nodes": len(record["nodes"])}


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg) -> PNG bytes
# ---------------------------------------------------------------------------------------------------------------

ARM_COLOURS = {"astro": "#1f77b4", "direct": "#ff7f0e"}


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", metadata={"Software": None})
  _pyplot().close(fig)
  return buf.getvalue()


def metrics_rows(run_dir: Path, rel: str) -> list[dict]:
  return [r for r in iter_jsonl(run_dir / rel / "metrics.jsonl") if _finite(r.get("step"))]


def sft_plot(runs: dict[str, list[dict]]) -> bytes | None:
  """Training loss (and held-out loss) against step, one line per arm; None without rows."""
  runs = {arm: rows for arm, rows in runs.items() if any(_finite(r.get("loss")) for r in rows)}
  if not runs:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
  for arm, rows in runs.items():
    c = ARM_COLOURS.get(arm)
    pts = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    ax.plot(*zip(*pts), lw=1.2, color=c, label=f"{arm}: train loss", marker="o" if len(pts) < 30 else None, ms=2)
    ev = [(r["step"], r["eval_loss"]) for r in rows if _finite(r.get("eval_loss"))]
    if ev:
      ax.plot(*zip(*ev), "s--", color=c, ms=3, lw=1, label=f"{arm}: held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _png(fig)


def rl_plot(runs: dict[str, list[dict]]) -> bytes | None:
  """One panel per RL_PANELS metric against step (an arm per line; held-out eval values as squares)."""
  runs = {arm: rows for arm, rows in runs.items() if rows}
  if not runs:
    return None
  plt = _pyplot()
  cols = 4
  n_rows = math.ceil(len(RL_PANELS) / cols)
  fig, axes = plt.subplots(n_rows, cols, figsize=(13, 2.9 * n_rows), dpi=100, squeeze=False)
  for ax, (key, label, _) in zip(axes.flat, RL_PANELS):
    for arm, rows in runs.items():
      c = ARM_COLOURS.get(arm)
      pts = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
      if pts:
        ax.plot(*zip(*pts), lw=1.2, color=c, marker="o" if len(pts) < 30 else None, ms=2, label=arm)
      ev = [(r["step"], r[RL_EVAL_OVERLAY[key]]) for r in rows if key in RL_EVAL_OVERLAY
            and _finite(r.get(RL_EVAL_OVERLAY[key]))]
      if ev:
        ax.plot(*zip(*ev), "s--", color=c, ms=3, lw=0.8, label=f"{arm} held-out")
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(RL_PANELS):]:
    ax.axis("off")
  fig.tight_layout()
  return _png(fig)


def plots(run_dir: Path) -> dict[str, bytes]:
  """{"sft_loss": PNG, "rl_curves": PNG} for what has metrics rows."""
  out = {}
  replicate = run_seed(read_json(run_dir / "pipeline.json"))
  sft = sft_plot({arm: metrics_rows(run_dir, f"{arm_dir(arm, replicate)}/sft") for arm in ARMS})
  if sft:
    out["sft_loss"] = sft
  rl = rl_plot({arm: metrics_rows(run_dir, f"{arm_dir(arm, replicate)}/rl") for arm in ARMS})
  if rl:
    out["rl_curves"] = rl
  return out


# ---------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------

def fmt_pct(x: float | None, digits: int = 1) -> str:
  return "—" if x is None else f"{100 * x:.{digits}f}"


def fmt_num(x: Any, digits: int = 2) -> str:
  if x is None:
    return "—"
  if isinstance(x, bool):
    return str(x).lower()
  if isinstance(x, int):
    return f"{x:,}"
  if isinstance(x, float):
    return f"{x:,.{digits}f}"
  return str(x)


def fmt_seconds(s: Any) -> str:
  if not _finite(s):
    return "—"
  s = float(s)
  if s < 60:
    return f"{s:.1f} s"
  if s < 3600:
    return f"{int(s // 60)} min {int(s % 60):02d} s"
  return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_time(t: Any) -> str:
  """A stage's start/end: an epoch number as UTC, a string as it is."""
  if _finite(t):
    return datetime.fromtimestamp(float(t), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
  return "—" if t is None else str(t)


def fmt_r(c: dict) -> str:
  """"0.412 [0.301, 0.512]", or "undefined (why)"."""
  if c["r"] is None:
    return f"undefined ({c['undefined']})"
  if c["ci_low"] is None:
    return f"{c['r']:.3f} (CI: {c['undefined']})"
  return f"{c['r']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]"


def title_of(benchmark: str) -> str:
  return BENCHMARK_TITLES.get(benchmark, benchmark)


def maj_header(table: dict, benchmark: str) -> str:
  """"maj@16" when every row's k agrees, else "maj@k" (the cells then say their k)."""
  ks = {r["benchmarks"][benchmark]["maj_k"] for r in table["rows"] if benchmark in r["benchmarks"]}
  return f"maj@{ks.pop()}" if len(ks) == 1 else "maj@k"


def table_cells(table: dict, row: dict, benchmark: str) -> list[str]:
  """pass@1 [CI], maj@k, tokens, backtracks of one (model, benchmark), as text."""
  cell = row["benchmarks"].get(benchmark)
  if cell is None:
    return ["—"] * 4
  p = cell["pass@1"]
  maj = fmt_pct(cell["maj@k"]) + ("" if maj_header(table, benchmark) != "maj@k" else f" (k={cell['maj_k']})")
  return [f"{fmt_pct(p['mean'])} [{fmt_pct(p['ci_low'])}, {fmt_pct(p['ci_high'])}]", maj,
          f"{cell['mean_response_tokens']:.0f}", f"{cell['backtracks_per_response']:.2f}"]


def row_label(row: dict) -> str:
  return row["model"] + (f" ({row['status']})" if row["status"] not in ("done",) and row["benchmarks"] else "")


def correlation_rows(table: dict) -> list[tuple[str, str, dict, dict, dict]]:
  """(model, benchmark, cell, response r, problem r) for every cell with rows."""
  return [(row_label(row), b, row["benchmarks"][b], row["benchmarks"][b]["correlation"]["response"],
           row["benchmarks"][b]["correlation"]["problem"])
          for row in table["rows"] for b in table["benchmarks"] if b in row["benchmarks"]]


def sizes_note(table: dict) -> str:
  """"MATH-500: 500 problems × 16 samples; ..." (per model when they differ)."""
  parts = []
  for b in table["benchmarks"]:
    sizes = {(r["benchmarks"][b]["n_problems"], r["benchmarks"][b]["samples_per_problem"])
             for r in table["rows"] if b in r["benchmarks"]}
    if len(sizes) == 1:
      p, n = sizes.pop()
      parts.append(f"{title_of(b)}: {p} problems × {n} samples")
    else:
      each = ", ".join(f"{r['model']} {r['benchmarks'][b]['n_problems']}×{r['benchmarks'][b]['samples_per_problem']}"
                       for r in table["rows"] if b in r["benchmarks"])
      parts.append(f"{title_of(b)}: {each}")
  return "; ".join(parts)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
  def esc(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")
  align = align or "l" + "r" * (len(header) - 1)
  sep = ["---:" if a == "r" else "---" for a in align]
  return "\n".join("| " + " | ".join(map(esc, r)) + " |" for r in [header, sep, *rows]) + "\n"


def table_markdown(table: dict) -> str:
  """The paper's table and the backtracks-vs-correctness table, as markdown."""
  benchmarks = table["benchmarks"]
  if not benchmarks:
    return "No eval results yet (base, ASTRO-SFT, ASTRO-RL: not run yet).\n"
  header = ["model"]
  for b in benchmarks:
    t = title_of(b)
    header += [f"{t} pass@1 % [95% CI]", f"{maj_header(table, b)} %", "tokens", "backtracks"]
  rows = []
  for row in table["rows"]:
    if not row["benchmarks"]:
      rows.append([row["model"], row["status"]] + [""] * (4 * len(benchmarks) - 1))
    else:
      rows.append([row_label(row)] + [c for b in benchmarks for c in table_cells(table, row, b)])
  out = md_table(header, rows)
  out += (f"\npass@1: mean over problems of the fraction of correct samples; 95% CI: {table['pass@1_ci']}. "
          f"maj@k: {table['maj_grouping']}. tokens, backtracks: mean per response. {sizes_note(table)}.\n")
  corr = correlation_rows(table)
  if corr:
    out += "\nBacktracks vs correctness (Pearson r [95% CI], " + table["r_ci"] + "):\n\n"
    out += md_table(["model", "benchmark", "responses", "r(backtracks, correct)", "problems",
                     "r(mean backtracks, pass rate)"],
                    [[m, title_of(b), str(rr["n"]), fmt_r(rr), str(pr["n"]), fmt_r(pr)] for m, b, _, rr, pr in corr],
                    "llrlrl")
  return out


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
  """Nested dicts as (dotted key, leaf value) pairs."""
  if isinstance(obj, dict):
    return [kv for k, v in obj.items() for kv in flatten(v, f"{prefix}{k}.")] if obj else [(prefix[:-1], {})]
  return [(prefix[:-1], obj)]


def compact(value: Any, width: int = 70) -> str:
  """A config value on one short line (JSON; whitespace of strings collapsed, long ones cut with their length)."""
  if isinstance(value, str):
    one = " ".join(value.split())
    if len(one) <= width:
      return json.dumps(one, ensure_ascii=False)
    return json.dumps(one[:width - 1] + "…", ensure_ascii=False) + f" ({len(value)} chars)"
  text = json.dumps(value, ensure_ascii=False)
  return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------

def mcts_rows(summary: dict) -> list[tuple[str, str]]:
  s, sampler = summary, summary.get("sampler") or {}
  solved = f"{fmt_num(s.get('solved'))} / {fmt_num(s.get('problems'))} ({fmt_pct(s.get('solved_fraction'))}%)"
  return [("problems solved", solved), ("nodes per tree", fmt_num(s.get("nodes_per_tree"), 1)),
          ("terminals per tree", fmt_num(s.get("terminals_per_tree"), 1)),
          ("correct terminals per tree", fmt_num(s.get("correct_terminals_per_tree"), 2)),
          ("distinct wrong answers per tree", fmt_num(s.get("distinct_wrong_answers_per_tree"), 2)),
          ("trees with SFT rows", fmt_num(s.get("trees_with_rows"))),
          ("rows: sft.jsonl (ASTRO) / direct.jsonl", f"{fmt_num(s.get('sft_rows'))} / {fmt_num(s.get('direct_rows'))}"),
          ("tokens sampled", fmt_num(s.get("tokens_sampled"))), ("sampler calls", fmt_num(sampler.get("calls"))),
          ("sampler live-row fraction", fmt_num(sampler.get("live_row_fraction"), 3)),
          ("time in the sampler", fmt_seconds(sampler.get("seconds"))),
          ("stage wall time", fmt_seconds(s.get("wall_s")))]


def search_line(summary: dict) -> str:
  """The search settings recorded in mcts/summary.json, one line."""
  st = (summary.get("settings") or {}).get("search") or {}
  names = (("k", "k"), ("rollouts", "M"), ("iterations", "iterations"), ("max_depth", "max depth"),
           ("c_puct", "c_puct"), ("prior", "prior"), ("temperature", "temperature"))
  parts = [f"{label} = {st[key]}" for key, label in names if key in st]
  return ("Search: " + ", ".join(parts) + ".") if parts else ""


def k_rows(summary: dict) -> list[tuple[str, str, str]]:
  hist = summary.get("k_histogram") or {}
  total = sum(v for v in hist.values() if isinstance(v, int)) or 1
  return [(str(k), fmt_num(v), f"{100 * v / total:.0f}%") for k, v in hist.items() if isinstance(v, int)]


def stage_rows(stages: list[dict]) -> list[list[str]]:
  rows = [[str(s.get("name")), str(s.get("status") or "—"), fmt_seconds(s.get("wall_s")),
           fmt_seconds(s.get("compile_s")), fmt_time(s.get("started")), fmt_time(s.get("ended"))] for s in stages]
  total = sum(float(s["wall_s"]) for s in stages if _finite(s.get("wall_s")))
  compile_total = sum(float(s["compile_s"]) for s in stages if _finite(s.get("compile_s")))
  return rows + [["total", "", fmt_seconds(total), fmt_seconds(compile_total), "", ""]] if stages else rows


def fmt_metric(v: float) -> str:
  """A training metric, to about 3 significant digits (no exponent below 1e6)."""
  a = abs(v)
  return f"{v:,.0f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3f}" if a >= 0.01 or a == 0 else f"{v:.2e}"


def training_rows(section: dict, keys: Sequence[tuple[str, ...]]) -> list[list[str]]:
  """Per arm that ran: steps, then "first → last" per metric (keys: (metrics key, ...))."""
  rows = []
  for arm, e in section.items():
    if "metrics" not in e:
      continue
    cells = [arm, e["status"], fmt_num(e["last_step"])]
    for key, *_ in keys:
      m = e["metrics"].get(key)
      cells.append("—" if m is None else f"{fmt_metric(m['first'])} → {fmt_metric(m['last'])}")
    rows.append(cells)
  return rows


SFT_KEYS = (("loss", "loss curve", "loss"), ("eval_loss", "held-out loss", "held-out loss"))


def status_line(section: dict) -> str:
  """"astro: not run yet; direct: skipped" for the arms without results."""
  return "; ".join(f"{arm}: {e['status']}" for arm, e in section.items() if "metrics" not in e and "kept" not in e)


def render_markdown(report: dict, images: dict[str, str], example: dict | None, tree_link: str | None) -> str:
  """report.md: images and the tree viewer linked by relative path."""
  out = [f"# ASTRO run report\n\nRun directory: `{report['run_dir']}`. Every number below is computed from the files "
         "of this directory (`report.json` holds the same numbers; `astro_jax/report.py` says how).\n"]
  out.append("## Results\n\n" + table_markdown(report["table"]))
  out.append("## Stages\n")
  out.append(md_table(["stage", "status", "wall time", "compile time", "started", "ended"],
                      stage_rows(report["stages"]), "llrrll") if report["stages"] else f"{NOT_RUN} (no pipeline.json "
                      "stages).\n")
  out.append("## MCTS\n")
  m = report["mcts"]
  if m["summary"]:
    out.append((search_line(m["summary"]) + "\n\n" if search_line(m["summary"]) else "")
               + md_table(["statistic", "value"], mcts_rows(m["summary"])))
    out.append("\nk (backtracks) of the SFT traces:\n\n" + md_table(["k", "rows", "share"], k_rows(m["summary"])))
  else:
    out.append(f"{m['status']}.\n")
  out.append("### Example tree\n")
  out.append(example_markdown(example, tree_link, m["summary"] is not None))
  out.append("## Difficulty filter (RL prompts)\n")
  d = report["difficulty"]
  dr = [[arm, e["status"], fmt_num(e.get("problems")), fmt_num(e.get("kept")), fmt_num(e.get("too_hard")),
         fmt_num(e.get("too_easy")), fmt_num(e.get("mean_pass_rate"), 3)] for arm, e in d.items() if "kept" in e]
  out.append(md_table(["arm", "status", "problems", "kept", "too hard", "too easy", "mean pass rate"], dr,
                      "llrrrrr") if dr else "")
  out.append((status_line(d) + ".\n") if status_line(d) else "")
  out.append("## SFT\n")
  out.append(training_markdown(report["sft"], SFT_KEYS, images.get("sft_loss"), "SFT loss"))
  out.append("## RL\n")
  out.append(training_markdown(report["rl"], RL_PANELS, images.get("rl_curves"), "RL curves"))
  corr = [(arm, e["steps_correlation"]) for arm, e in report["rl"].items() if "steps_correlation" in e]
  if corr:
    out.append("\nAcross RL steps, r(backtracks per response, accuracy) [95% CI, Fisher z; steps are not "
               "independent]: " + "; ".join(f"{arm}: {fmt_r(c)} (n = {c['n']})" for arm, c in corr) + ".\n")
  out.append("## Settings\n")
  out.append(SETTINGS_NOTE + "\n\n" + md_table(["key", "value"], settings_rows(report["config"]))
             if report["config"] else "No pipeline.json config.\n")
  return "\n".join(x for x in out if x)


SETTINGS_NOTE = ("The pipeline's config. Keys it sets in every stage's sub-config (checkpoint, inputs, prompt, "
                 "output_dir, overwrite/resume, mesh, ...) are left out: their values are the pipeline's; each stage's "
                 "composed settings are in its run_config.json / summary.json.")


def settings_rows(config: dict) -> list[list[str]]:
  """pipeline.json's config as (key, value) rows, without the sub-config keys the pipeline sets (their stored
  values are the stage defaults it overrides, which would mislead)."""
  from astro_jax.stages import pipeline as pipeline_stage
  set_by_pipeline = {f"{sub}.{key}" for sub in pipeline_stage.SUBCONFIGS
                     for key in pipeline_stage.SET_HERE.get(sub, ()) + pipeline_stage.ALWAYS_SET}
  return [[k, compact(v)] for k, v in flatten(config)
          if not any(k == d or k.startswith(d + ".") for d in set_by_pipeline)]


def training_markdown(section: dict, keys: Sequence[tuple[str, ...]], image: str | None, alt: str) -> str:
  rows = training_rows(section, keys)
  out = (md_table(["arm", "status", "last step", *(label for *_, label in keys)], rows, "ll" + "r" * (len(keys) + 1))
         if rows else "")
  out += "\nFirst → last logged value of each metric.\n" if rows else ""
  if status_line(section):
    out += ("\n" if out else "") + status_line(section) + ".\n"
  if image:
    out += f"\n![{alt}]({image})\n"
  return out


def example_markdown(example: dict | None, tree_link: str | None, mcts_done: bool) -> str:
  if example is None:
    return ("No solved tree with a backtracking trace in mcts/sft.jsonl.\n" if mcts_done else f"{NOT_RUN}.\n")
  row = example["row"]
  out = (f"Tree `{example['id']}` ({example['nodes']} nodes), trace `{row.get('id')}` (kind {row.get('kind')}, "
         f"k = {row.get('k')}, {row.get('n_backtracks')} backtracks; row {example['index']} of the tree's "
         f"{example['rows']} in mcts/sft.jsonl). ")
  out += f"[Open the tree viewer]({tree_link}).\n" if tree_link else (example["note"] + ".\n")
  out += f"\nEvents: {events_text(row)}\n"
  for msg in row.get("messages") or []:
    content = str(msg.get("content", ""))
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", content)), default=0))
    out += f"\n**{msg.get('role')}**\n\n{fence}text\n{content}\n{fence}\n"
  return out


def events_text(row: dict) -> str:
  """The trace's events: step node ids joined by →, a backtrack as "↩ node"."""
  parts = []
  for e in row.get("events") or []:
    if isinstance(e, list) and len(e) == 2:
      parts.append(f"{e[1]}" if e[0] == "step" else f"↩ {e[1]}")
  return " → ".join(parts) or "—"


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1e293b;
  margin: 0; background: #f8fafc; }
main { max-width: 1240px; margin: 0 auto; padding: 18px 28px 60px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #cbd5e1; }
h3 { font-size: 16px; margin: 20px 0 8px; }
table { border-collapse: collapse; margin: 8px 0 12px; background: #fff; font-size: 14px; }
th, td { border: 1px solid #cbd5e1; padding: 4px 9px; vertical-align: top; }
th { background: #f1f5f9; font-weight: 600; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.model { font-weight: 600; white-space: nowrap; }
td.na { color: #64748b; font-style: italic; }
td small, th small { color: #64748b; font-weight: 400; font-size: 12px; }
.wide { overflow-x: auto; }
table.results td { padding: 3px 8px; }
.note { color: #475569; font-size: 13.5px; max-width: 1100px; }
.status { color: #64748b; font-style: italic; }
img { max-width: 100%; border: 1px solid #cbd5e1; background: #fff; }
iframe.viewer { width: 100%; height: 760px; border: 1px solid #94a3b8; border-radius: 6px; background: #fff; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #fff; border: 1px solid #cbd5e1; padding: 8px 10px;
  font: 12.5px/1.45 "DejaVu Sans Mono", ui-monospace, Menlo, Consolas, monospace; max-height: 420px; overflow-y: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
table.settings td { font-size: 12.5px; font-family: "DejaVu Sans Mono", ui-monospace, monospace; }
details summary { cursor: pointer; color: #334155; }
a { color: #1d4ed8; text-decoration: none; }
"""


def esc(s: Any) -> str:
  return html.escape(str(s), quote=True)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None,
               cls: str = "") -> str:
  numeric = numeric or [False] + [True] * (len(header) - 1)
  head = "".join(f"<th>{esc(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f'<td class="{"num" if numeric[i] else ""}">{esc(c)}</td>'
                                  for i, c in enumerate(r)) + "</tr>" for r in rows)
  return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def results_html(table: dict) -> str:
  """The paper's table (grouped headers) and the correlation table."""
  benchmarks = table["benchmarks"]
  if not benchmarks:
    return f'<p class="status">No eval results yet (base, ASTRO-SFT, ASTRO-RL: {NOT_RUN}).</p>'
  top = '<tr><th rowspan="2">model</th>' + "".join(f'<th colspan="4">{esc(title_of(b))}</th>' for b in benchmarks)
  sub = "".join(f"<th>pass@1&nbsp;%<br><small>[95% CI]</small></th><th>{esc(maj_header(table, b))}&nbsp;%</th>"
                "<th>tokens</th><th>backtracks</th>" for b in benchmarks)
  body = []
  for row in table["rows"]:
    if not row["benchmarks"]:
      body.append(f'<tr><td class="model">{esc(row["model"])}</td><td class="na" colspan="{4 * len(benchmarks)}">'
                  f'{esc(row["status"])}</td></tr>')
    else:
      cells = "".join(cell_html(c) for b in benchmarks for c in table_cells(table, row, b))
      body.append(f'<tr><td class="model">{esc(row_label(row))}</td>{cells}</tr>')
  out = (f'<div class="wide"><table class="results"><thead>{top}</tr><tr>{sub}</tr></thead>'
         f"<tbody>{''.join(body)}</tbody></table></div>"
         f'<p class="note">pass@1: mean over problems of the fraction of correct samples; 95% CI: '
         f'{esc(table["pass@1_ci"])}. maj@k: {esc(table["maj_grouping"])}. tokens, backtracks: mean per response '
         f"(per problem, then over problems). {esc(sizes_note(table))}.</p>")
  corr = correlation_rows(table)
  if corr:
    out += ("<h3>Backtracks vs correctness</h3>" + correlation_html(corr)
            + f'<p class="note">Pearson r over responses (backtracks, correct as 0/1) and over problems (mean '
              f'backtracks, pass rate); 95% CI by the {esc(CI_METHOD_R)}. The response-level interval treats a '
              f"problem's samples as independent (they are not), so it is optimistic. Undefined when a variable is "
              f"constant.</p>")
  return out


def cell_html(text: str) -> str:
  """A table cell; "41.2 [38.0, 44.5]" puts its interval on a second, smaller line."""
  value, _, ci = text.partition(" [")
  if ci:
    return f'<td class="num">{esc(value)}<br><small>[{esc(ci)}</small></td>'
  return f'<td class="num">{esc(text)}</td>'


def correlation_html(corr: list[tuple[str, str, dict, dict, dict]]) -> str:
  """The correlation table, a model's benchmarks under one model cell; undefined values in words."""
  head = ("<tr><th>model</th><th>benchmark</th><th>responses</th><th>r(backtracks, correct) [95% CI]</th>"
          "<th>problems</th><th>r(mean backtracks, pass rate) [95% CI]</th></tr>")
  body = []
  for i, (model, b, _, rr, pr) in enumerate(corr):
    span = sum(1 for c in corr if c[0] == model)
    first = i == 0 or corr[i - 1][0] != model
    cells = (f'<td class="model" rowspan="{span}">{esc(model)}</td>' if first else "")
    cells += f"<td>{esc(title_of(b))}</td>"
    for c in (rr, pr):
      cells += f'<td class="num">{c["n"]}</td>'
      cells += f'<td class="{"na" if c["r"] is None else "num"}">{esc(fmt_r(c))}</td>'
    body.append(f"<tr>{cells}</tr>")
  return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def img_html(png: bytes | None, alt: str) -> str:
  if png is None:
    return ""
  return f'<p><img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"></p>'


def training_html(section: dict, keys: Sequence[tuple[str, ...]], png: bytes | None, alt: str) -> str:
  rows = training_rows(section, keys)
  out = html_table(["arm", "status", "last step", *(label for *_, label in keys)], rows,
                   [False, False] + [True] * (len(keys) + 1)) if rows else ""
  out += '<p class="note">First → last logged value of each metric.</p>' if rows else ""
  if status_line(section):
    out += f'<p class="status">{esc(status_line(section))}.</p>'
  return out + img_html(png, alt)


def example_html(example: dict | None, mcts_done: bool) -> str:
  if example is None:
    why = "No solved tree with a backtracking trace in mcts/sft.jsonl." if mcts_done else NOT_RUN
    return f'<p class="status">{why}</p>'
  row = example["row"]
  out = (f'<p>Tree <code>{esc(example["id"])}</code> ({example["nodes"]} nodes), trace <code>{esc(row.get("id"))}'
         f'</code> (kind {esc(row.get("kind"))}, k = {esc(row.get("k"))}, {esc(row.get("n_backtracks"))} backtracks; '
         f'row {example["index"]} of the tree\'s {example["rows"]} in mcts/sft.jsonl). Drag to pan, wheel to zoom, '
         "click a node.</p>")
  if example["page"]:
    out += f'<iframe class="viewer" title="search tree {esc(example["id"])}" srcdoc="{esc(example["page"])}"></iframe>'
  else:
    out += f'<p class="status">{esc(example["note"])}.</p>'
  out += f'<h3>The trace (its sft.jsonl row)</h3><p class="note">Events: {esc(events_text(row))}</p>'
  for msg in row.get("messages") or []:
    out += f"<p><b>{esc(msg.get('role'))}</b></p><pre>{esc(msg.get('content', ''))}</pre>"
  return out


SECTIONS = (("results", "Results"), ("stages", "Stages"), ("mcts", "MCTS"), ("difficulty", "Difficulty filter"),
            ("sft", "SFT"), ("rl", "RL"), ("settings", "Settings"))


def h2(title: str) -> str:
  anchor = {t: a for a, t in SECTIONS}.get(title.split(" (")[0], title.split()[0].lower())
  return f'<h2 id="{anchor}">{esc(title)}</h2>'


def render_html(report: dict, images: dict[str, bytes], example: dict | None) -> str:
  """report.html: one self-contained page (CSS inline, PNGs as data: URIs, the tree viewer in an iframe's srcdoc)."""
  m, d = report["mcts"], report["difficulty"]
  parts = [f"<h1>ASTRO run report</h1><p class=\"note\">Run directory <code>{esc(report['run_dir'])}</code>. Every "
           "number is computed from the files of this directory (<code>report.json</code> holds the same numbers; "
           "<code>astro_jax/report.py</code> says how).</p>",
           '<p class="note">' + " · ".join(f'<a href="#{a}">{t}</a>' for a, t in SECTIONS) + "</p>",
           h2("Results"), results_html(report["table"]), h2("Stages")]
  parts.append(html_table(["stage", "status", "wall time", "compile time", "started", "ended"],
                          stage_rows(report["stages"]), [False, False, True, True, False, False])
               if report["stages"] else f'<p class="status">{NOT_RUN} (no pipeline.json stages).</p>')
  parts.append(h2("MCTS"))
  if m["summary"]:
    parts.append(f'<p>{esc(search_line(m["summary"]))}</p>' if search_line(m["summary"]) else "")
    parts.append('<div class="grid"><div>' + html_table(["statistic", "value"], mcts_rows(m["summary"]))
                 + '</div><div><p class="note">k (backtracks) of the SFT traces</p>'
                 + html_table(["k", "rows", "share"], k_rows(m["summary"])) + "</div></div>")
  else:
    parts.append(f'<p class="status">{esc(m["status"])}</p>')
  parts += ["<h3>Example tree</h3>", example_html(example, m["summary"] is not None)]
  parts.append(h2("Difficulty filter (RL prompts)"))
  dr = [[arm, e["status"], fmt_num(e.get("problems")), fmt_num(e.get("kept")), fmt_num(e.get("too_hard")),
         fmt_num(e.get("too_easy")), fmt_num(e.get("mean_pass_rate"), 3)] for arm, e in d.items() if "kept" in e]
  if dr:
    parts.append(html_table(["arm", "status", "problems", "kept", "too hard", "too easy", "mean pass rate"], dr,
                            [False, False, True, True, True, True, True]))
  if status_line(d):
    parts.append(f'<p class="status">{esc(status_line(d))}.</p>')
  parts += [h2("SFT"), training_html(report["sft"], SFT_KEYS, images.get("sft_loss"), "SFT loss"),
            h2("RL"), training_html(report["rl"], RL_PANELS, images.get("rl_curves"), "RL curves")]
  corr = [(arm, e["steps_correlation"]) for arm, e in report["rl"].items() if "steps_correlation" in e]
  if corr:
    parts.append('<p class="note">Across RL steps, r(backtracks per response, accuracy) [95% CI, Fisher z; steps are '
                 "not independent]: " + esc("; ".join(f"{arm}: {fmt_r(c)} (n = {c['n']})" for arm, c in corr))
                 + ".</p>")
  parts.append(h2("Settings"))
  if report["config"]:
    parts.append(f'<p class="note">{esc(SETTINGS_NOTE)}</p><details open><summary>pipeline.json config</summary>'
                 + html_table(["key", "value"], settings_rows(report["config"]), [False, False], "settings")
                 + "</details>")
  else:
    parts.append('<p class="status">No pipeline.json config.</p>')
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>ASTRO run report</title>"
          f"<style>{CSS}</style></head><body><main>\n" + "\n".join(parts) + "\n</main></body></html>\n")


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

def write_report(run_dir: str | os.PathLike) -> None:
  """Write RUN/report.json, RUN/report.md (+ RUN/report_files/: its PNGs and the tree viewer page) and the
  self-contained RUN/report.html, each atomically, from what the run directory holds now."""
  run_dir = Path(run_dir)
  report = collect(run_dir)
  images = plots(run_dir)
  example = example_tree(run_dir / "mcts")
  if example is not None:
    report["mcts"]["example"] = {"tree_id": example["id"], "row_id": example["row"].get("id"),
                                 "row_index": example["index"]}
  links: dict[str, str] = {}
  tree_link = None
  if images or (example and example["page"]):
    (run_dir / ASSETS).mkdir(exist_ok=True)
  for name, png in images.items():
    files.write_text_atomic(run_dir / ASSETS / f"{name}.png", png)
    links[name] = f"{ASSETS}/{name}.png"
  if example and example["page"]:
    files.write_text_atomic(run_dir / ASSETS / "tree.html", example["page"])
    tree_link = f"{ASSETS}/tree.html"
  files.write_text_atomic(run_dir / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
  files.write_text_atomic(run_dir / "report.md", render_markdown(report, links, example, tree_link))
  files.write_text_atomic(run_dir / "report.html", render_html(report, images, example))


def table_text(run_dir: str | os.PathLike) -> str:
  """The paper's table and the backtracks-vs-correctness table of RUN, as markdown (for the terminal)."""
  run_dir = Path(run_dir)
  return table_markdown(collect_table(run_dir, stage_states(read_json(run_dir / "pipeline.json"))))


def main(argv: Sequence[str] | None = None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  if len(args) != 1 or args[0].startswith("-"):
    print("usage: python -m astro_jax.report RUN_DIR", file=sys.stderr)
    return 2
  if not Path(args[0]).is_dir():
    print(f"error: no such run directory: {args[0]}", file=sys.stderr)
    return 2
  write_report(args[0])
  print(table_text(args[0]))
  print(f"wrote {Path(args[0]) / 'report.html'}, report.md, report.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
