"""astro_jax.report: every table number against an independent NumPy / hand computation, partial runs, and a
self-contained HTML page (no browser here: html.parser; the screenshot in docs/ is taken by hand)."""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from astro_jax import report

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_RUN = REPO / "docs" / "smollm2_run"  # a real mcts stage's outputs (4 problems)
BENCHMARKS = {"math500": 60, "amc23": 40, "aime24": 30}
SAMPLES = 8
# (model dir, base accuracy, backtracks on a wrong / right response (Poisson means); None: no backtrack field)
MODELS = {"base/eval": (0.35, 0.0, 0.0), "astro/eval_sft": (0.45, 0.6, 1.4), "astro/eval_rl": (0.55, 0.8, 2.0),
          "direct/eval_sft": (0.42, 0.0, 0.0), "direct/eval_rl": (0.48, 0.0, 0.1)}
BACKTRACK = "But wait, are we solving the problem correctly so far? Let's go back to where we set up the equation."


def sample(correct: bool, answer: str | None, n_tokens: int = 100, backtracks: int | None = 0) -> dict:
  text = " ".join([BACKTRACK] * (backtracks or 0)) + f" \\boxed{{{answer}}}"
  out = {"text": text, "answer": answer, "correct": correct, "timed_out": False, "n_tokens": n_tokens,
         "finish_reason": "stop", "reflections": backtracks or 0}
  if backtracks is not None:
    out["backtracks"] = backtracks
  return out


def eval_rows(rng: np.random.Generator, benchmark: str, n_problems: int, accuracy: float, bt_wrong: float,
              bt_right: float) -> list[dict]:
  """Rows of an eval stage's <benchmark>.jsonl: per-problem difficulty, wrong answers from a small pool."""
  rows = []
  for i in range(n_problems):
    p = float(np.clip(accuracy + rng.normal(0, 0.3), 0.02, 0.98))
    samples = []
    for _ in range(SAMPLES):
      ok = bool(rng.random() < p)
      answer = "42" if ok else (None if rng.random() < 0.1 else str(rng.integers(0, 4)))
      bt = int(rng.poisson(bt_right if ok else bt_wrong))
      samples.append(sample(ok, answer, int(rng.integers(150, 900) + 300 * bt), bt))
    rows.append({"id": f"{benchmark}-{i}", "benchmark": benchmark, "gold": "42", "samples": samples})
  return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sft_metrics(steps: int, rng: np.random.Generator) -> list[dict]:
  return [{"step": s, "loss": 2.2 * math.exp(-s / 60) + 0.35 + 0.04 * rng.standard_normal(), "lr": 1e-5,
           "grad_norm": 1.0, **({"eval_loss": 2.1 * math.exp(-s / 60) + 0.45} if s % 50 == 0 else {})}
          for s in range(1, steps + 1)]


def rl_metrics(steps: int, rng: np.random.Generator, bt_scale: float) -> list[dict]:
  rows = []
  for s in range(1, steps + 1):
    acc = 0.45 + 0.2 * s / steps + 0.03 * rng.standard_normal()
    bt = bt_scale * (1.0 + 1.2 * s / steps) + 0.08 * rng.standard_normal()
    row = {"step": s, "reward_mean": 2 * acc - 1, "accuracy": acc,
           "response_length_mean": 700 + 600 * bt_scale * s / steps + 20 * rng.standard_normal(),
           "backtracks_per_response": bt, "reflections_per_response": 1.3 * bt + 0.3,
           "entropy": 0.6 - 0.2 * (0.5 + bt_scale) * s / steps + 0.01 * rng.standard_normal(),
           "clip_fraction": 0.02 + 0.01 * rng.random(), "kl": 0.0}
    if s % 20 == 0:
      row["eval_pass@1"] = acc - 0.05
    rows.append(row)
  return rows


def build_run(root: Path, *, seed: int = 0, direct: bool = True) -> Path:
  """A complete synthetic pipeline run directory (the mcts outputs are the real docs/smollm2_run ones)."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  (root / "mcts").mkdir(exist_ok=True)
  for name in ("summary.json", "trees.jsonl", "sft.jsonl", "direct.jsonl"):
    shutil.copy(SMOLLM2_RUN / name, root / "mcts" / name)
  stages = [{"name": "mcts", "dir": "mcts", "status": "done", "wall_s": 242.8, "compile_s": 31.5,
             "started": "2025-07-01T10:00:00Z", "ended": "2025-07-01T10:04:03Z"}]
  for rel, (acc, bw, br) in MODELS.items():
    if rel.startswith("direct") and not direct:
      continue
    for b, n in BENCHMARKS.items():
      write_jsonl(root / rel / f"{b}.jsonl", eval_rows(rng, b, n, acc - 0.15 * (b == "aime24"), bw, br))
    stages.append({"name": rel, "dir": rel, "status": "done", "wall_s": float(rng.uniform(100, 900)),
                   "compile_s": float(rng.uniform(5, 40)), "started": 1751364000.0, "ended": 1751364500.0})
  for arm in ("astro", "direct") if direct else ("astro",):
    write_jsonl(root / arm / "sft" / "metrics.jsonl", sft_metrics(200, rng))
    write_jsonl(root / arm / "rl" / "metrics.jsonl", rl_metrics(80, rng, 1.0 if arm == "astro" else 0.05))
    (root / arm / "difficulty").mkdir(parents=True, exist_ok=True)
    (root / arm / "difficulty" / "summary.json").write_text(json.dumps(
        {"problems": 500, "samples_per_problem": 8, "kept": 212, "too_hard": 180, "too_easy": 108,
         "kept_fraction": 0.424, "mean_pass_rate": 0.41}))
    for name in ("sft", "difficulty", "rl"):
      stages.append({"name": f"{arm}/{name}", "dir": f"{arm}/{name}", "status": "done", "wall_s": 1800.0,
                     "compile_s": 60.0, "started": None, "ended": None})
  config = {"model": "asset:smollm2", "benchmarks": "math500,amc23,aime24", "samples": SAMPLES,
            "prompt": {"instruction": "x " * 200},
            "mcts": {"search": {"k": 4, "rollouts": 2, "iterations": 5}, "checkpoint": "",
                     "prompt": {"instruction": "stage default"}},
            "sft": {"steps": 200, "optimizer": {"lr": 1e-5}}, "rl": {"steps": 80, "group_size": 4},
            "arms": ["astro", "direct"] if direct else ["astro"]}
  (root / "pipeline.json").write_text(json.dumps({"config": config, "stages": stages}))
  return root


# --- independent computations ------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def np_pass1(rows: list[dict]) -> np.ndarray:
  return np.array([np.mean([s["correct"] for s in r["samples"]]) for r in rows], dtype=float)


def np_bootstrap(values: np.ndarray, seed: int, resamples: int) -> tuple[float, float]:
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(values), size=(resamples, len(values)))
  return tuple(np.percentile(values[idx].mean(axis=1), [2.5, 97.5]))


def fisher_ci(r: float, n: int) -> tuple[float, float]:
  half = 1.959963984540054 / math.sqrt(n - 3)
  return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def hand_maj(answers_correct: list[tuple[str | None, bool]], k: int) -> float:
  """maj@k by hand: chunks of k; groups: correct samples together, others by exact string; ties -> first seen."""
  scores = []
  for start in range(0, len(answers_correct) - k + 1, k):
    chunk = answers_correct[start:start + k]
    groups: dict[str, list[int]] = {}
    for i, (a, ok) in enumerate(chunk):
      if a is not None:
        groups.setdefault("OK" if ok else a.replace(",", ""), []).append(i)
    if not groups:
      scores.append(0.0)
      continue
    best = max(groups.values(), key=lambda g: (len(g), -g[0]))
    scores.append(float(chunk[best[0]][1]))
  return float(np.mean(scores))


# --- tests ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
  run = build_run(tmp_path_factory.mktemp("run") / "RUN")
  report.write_report(run)
  return run


def test_pass_at_1_and_bootstrap_ci() -> None:
  rng = np.random.default_rng(3)
  rows = eval_rows(rng, "math500", 37, 0.5, 0.0, 1.0)
  got = report.pass_at_1_ci(rows, seed=11, resamples=500)
  want = np_pass1(rows)
  assert got["mean"] == pytest.approx(want.mean(), abs=1e-12)
  assert (got["ci_low"], got["ci_high"]) == pytest.approx(np_bootstrap(want, 11, 500), abs=1e-12)
  assert got["ci_low"] <= got["mean"] <= got["ci_high"]
  assert report.pass_at_1_ci(rows, seed=11, resamples=500) == got  # reproducible
  other = report.pass_at_1_ci(rows, seed=12, resamples=500)
  assert other["mean"] == got["mean"] and (other["ci_low"], other["ci_high"]) != (got["ci_low"], got["ci_high"])
  # a constant rate: the interval collapses onto it
  flat = [{"samples": [sample(True, "1")] * 2} for _ in range(5)]
  assert report.pass_at_1_ci(flat) == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n_problems": 5}


def test_maj_at_k_by_hand() -> None:
  problems = [
      [("42", True), ("3", False), ("3", False), ("42", True)],      # tie 2-2: the correct group was seen first -> 1
      [("3", False), ("3", False), ("42", True), (None, False)],     # 3 wins -> 0
      [("1,000", False), ("1000", False), ("42", True), ("7", False)],  # "1,000" == "1000" once normalised -> 0
      [(None, False), (None, False), ("42", True), ("42", True)],    # no answer never votes -> 1
      [("5", False), ("42", True), ("6", False), ("7", False)],      # all size 1: first seen (5) wins -> 0
  ]
  rows = [{"samples": [sample(ok, a) for a, ok in p]} for p in problems]
  for k in (1, 2, 3, 4):
    want = np.mean([hand_maj(p, k) for p in problems])
    assert report.maj_at_k(rows, k) == pytest.approx(want), k
  assert report.maj_at_k(rows, 4) == pytest.approx(2 / 5)


def test_pearson_with_ci_against_numpy_and_fisher_by_hand() -> None:
  rng = np.random.default_rng(5)
  x = rng.poisson(1.5, 200).astype(float)
  y = (rng.random(200) < 0.2 + 0.15 * x).astype(float)
  got = report.pearson_with_ci(x, y)
  r = np.corrcoef(x, y)[0, 1]
  assert got["r"] == pytest.approx(r, abs=1e-12) and got["n"] == 200 and got["undefined"] is None
  assert (got["ci_low"], got["ci_high"]) == pytest.approx(fisher_ci(r, 200), abs=1e-12)
  assert got["ci_low"] < got["r"] < got["ci_high"]
  # undefined: constant variables, too few pairs; no NaN anywhere
  const = report.pearson_with_ci([0, 0, 0, 0, 0], [0, 1, 1, 0, 1], ("backtracks", "correct"))
  assert const["r"] is None and const["undefined"] == "backtracks always 0"
  assert report.pearson_with_ci([1, 2, 3], [1, 1, 1], ("a", "b"))["undefined"] == "b always 1"
  assert report.pearson_with_ci([1], [2])["undefined"] == "1 pair"
  three = report.pearson_with_ci([1, 2, 3], [1, 3, 2])
  assert three["r"] == pytest.approx(0.5) and three["ci_low"] is None and "n > 3" in three["undefined"]
  perfect = report.pearson_with_ci([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
  assert perfect["r"] == perfect["ci_low"] == perfect["ci_high"] == 1.0
  assert "undefined (backtracks always 0)" in report.fmt_r(const)


def test_backtracks_fall_back_to_the_text() -> None:
  rows = [{"samples": [sample(True, "1", backtracks=None), {**sample(False, "2", backtracks=None),
                                                             "text": BACKTRACK + " " + BACKTRACK}]}]
  assert [report.backtracks_of(s) for s in rows[0]["samples"]] == [0, 2]


def test_table_numbers_match_independent_computation(full_run: Path) -> None:
  data = json.loads((full_run / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in json"))
  table = data["table"]
  assert table["benchmarks"] == list(BENCHMARKS)
  assert [r["model"] for r in table["rows"]] == ["base", "ASTRO-SFT", "ASTRO-RL", "Direct-SFT", "Direct-RL"]
  md = (full_run / "report.md").read_text()
  for row in table["rows"]:
    assert row["status"] == "done"
    for b, n in BENCHMARKS.items():
      rows = read_rows(full_run / row["dir"] / f"{b}.jsonl")
      cell = row["benchmarks"][b]
      rates = np_pass1(rows)
      assert (cell["n_problems"], cell["samples_per_problem"], cell["n_responses"]) == (n, SAMPLES, n * SAMPLES)
      assert cell["pass@1"]["mean"] == pytest.approx(rates.mean(), abs=1e-12)
      low, high = np_bootstrap(rates, report.BOOTSTRAP_SEED, report.BOOTSTRAP_RESAMPLES)
      assert (cell["pass@1"]["ci_low"], cell["pass@1"]["ci_high"]) == pytest.approx((low, high), abs=1e-12)
      assert low <= rates.mean() <= high
      assert cell["maj_k"] == SAMPLES
      maj = np.mean([hand_maj([(s["answer"], s["correct"]) for s in r["samples"]], SAMPLES) for r in rows])
      assert cell["maj@k"] == pytest.approx(maj, abs=1e-12)
      tokens = np.mean([np.mean([s["n_tokens"] for s in r["samples"]]) for r in rows])
      assert cell["mean_response_tokens"] == pytest.approx(tokens, abs=1e-9)
      bts = np.array([[s["backtracks"] for s in r["samples"]] for r in rows], dtype=float)
      assert cell["backtracks_per_response"] == pytest.approx(bts.mean(axis=1).mean(), abs=1e-12)
      ok = np.array([[s["correct"] for s in r["samples"]] for r in rows], dtype=float)
      for level, (x, y) in {"response": (bts.ravel(), ok.ravel()), "problem": (bts.mean(1), ok.mean(1))}.items():
        c = cell["correlation"][level]
        assert c["n"] == len(x)
        if np.all(x == x[0]):
          assert c["r"] is None and "always" in c["undefined"]
          assert f"undefined ({c['undefined']})" in md
          continue
        r = np.corrcoef(x, y)[0, 1]
        assert c["r"] == pytest.approx(r, abs=1e-12)
        assert (c["ci_low"], c["ci_high"]) == pytest.approx(fisher_ci(r, len(x)), abs=1e-12)
        assert report.fmt_r(c) in md
      p = cell["pass@1"]
      assert f"{100 * p['mean']:.1f} [{100 * p['ci_low']:.1f}, {100 * p['ci_high']:.1f}]" in md
  assert "nan" not in md.lower()
  # the base model never backtracks: its correlation is undefined, said in words
  base = table["rows"][0]["benchmarks"]["math500"]["correlation"]["response"]
  assert base["r"] is None and base["undefined"] == "backtracks always 0"
  # the terminal table is the same markdown
  text = report.table_text(full_run)
  assert text == report.table_markdown(table) and "| ASTRO-RL |" in text and "MATH-500 pass@1" in text


def test_other_sections(full_run: Path) -> None:
  data = json.loads((full_run / "report.json").read_text())
  summary = json.loads((SMOLLM2_RUN / "summary.json").read_text())
  assert data["mcts"]["summary"]["solved_fraction"] == summary["solved_fraction"]
  ex = data["mcts"]["example"]
  sft = read_rows(SMOLLM2_RUN / "sft.jsonl")
  row = next(r for r in sft if r["id"] == ex["row_id"])
  assert row["tree_id"] == ex["tree_id"] and row["kind"] == "search" and row["n_backtracks"] == 2
  assert len(data["stages"]) == 1 + 5 + 6
  assert data["difficulty"]["astro"]["kept"] == 212
  rl = read_rows(full_run / "astro" / "rl" / "metrics.jsonl")
  acc = data["rl"]["astro"]["metrics"]["accuracy"]
  assert (acc["first"], acc["last"]) == (rl[0]["accuracy"], rl[-1]["accuracy"])
  corr = data["rl"]["astro"]["steps_correlation"]
  assert corr["r"] == pytest.approx(np.corrcoef([r["backtracks_per_response"] for r in rl],
                                                [r["accuracy"] for r in rl])[0, 1])
  md = (full_run / "report.md").read_text()
  for heading in ("## Results", "## Stages", "## MCTS", "### Example tree", "## SFT", "## RL", "## Settings"):
    assert heading in md
  assert f"(report_files/sft_loss.png)" in md and "(report_files/rl_curves.png)" in md
  assert (full_run / "report_files" / "tree.html").is_file()
  assert row["messages"][1]["content"] in md
  assert "mcts.search.k" in md and "(400 chars)" in md  # settings flattened, long strings cut
  # sub-config keys the pipeline sets show the stage defaults it overrode: left out
  assert "mcts.checkpoint" not in md and "stage default" not in md
  assert not [p for p in full_run.rglob(".*tmp*")]  # atomic writes leave nothing behind


class Refs(HTMLParser):
  """Every URL-valued attribute and every iframe srcdoc of a page."""

  def __init__(self) -> None:
    super().__init__()
    self.urls: list[tuple[str, str, str]] = []
    self.srcdocs: list[str] = []
    self.tags: list[str] = []

  def handle_starttag(self, tag, attrs) -> None:
    self.tags.append(tag)
    for name, value in attrs:
      if name in ("src", "href", "xlink:href", "action", "poster", "data", "background"):
        self.urls.append((tag, name, value or ""))
      if name == "srcdoc":
        self.srcdocs.append(value or "")


def refs(page: str) -> Refs:
  p = Refs()
  p.feed(page)
  return p


def test_html_is_self_contained(full_run: Path) -> None:
  page = (full_run / "report.html").read_text()
  top = refs(page)
  assert top.urls and all(v.startswith("data:") or v.startswith("#") for _, _, v in top.urls), top.urls
  images = [v for tag, name, v in top.urls if tag == "img"]
  assert len(images) == 2
  for v in images:
    assert v.startswith("data:image/png;base64,")
    assert base64.b64decode(v.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
  assert "link" not in top.tags and len(top.srcdocs) == 1  # the tree viewer, inline
  inner = refs(top.srcdocs[0])
  assert all(v.startswith(("data:", "#")) for _, _, v in inner.urls), inner.urls
  assert "svg" in inner.tags and "script" in inner.tags and "link" not in inner.tags
  assert "http://" not in page and "https://" not in page
  for heading in ("Results", "Stages", "MCTS", "Example tree", "SFT", "RL", "Settings", "Backtracks vs correctness"):
    assert f">{heading}</h" in page


def test_partial_runs_say_not_run_yet(tmp_path: Path) -> None:
  empty = tmp_path / "empty"
  empty.mkdir()
  report.write_report(empty)
  for name in ("report.md", "report.html"):
    text = (empty / name).read_text()
    assert report.NOT_RUN in text
  assert "not run yet" in report.table_text(empty)
  # after mcts and the base eval (one benchmark still running), nothing else
  run = tmp_path / "RUN"
  build_run(run, direct=False)
  for rel in ("astro/eval_sft", "astro/eval_rl", "astro/sft", "astro/rl", "astro/difficulty"):
    shutil.rmtree(run / rel)
  pipeline = json.loads((run / "pipeline.json").read_text())
  pipeline["stages"] = [s for s in pipeline["stages"] if s["dir"] in ("mcts", "base/eval")]
  pipeline["stages"][-1]["status"] = "running"
  pipeline["stages"].append({"name": "astro/sft", "dir": "astro/sft", "status": "skipped"})
  (run / "pipeline.json").write_text(json.dumps(pipeline))
  report.write_report(run)
  data = json.loads((run / "report.json").read_text())
  rows = {r["model"]: r for r in data["table"]["rows"]}
  assert list(rows) == ["base", "ASTRO-SFT", "ASTRO-RL"]  # the direct arm did not run: no rows for it
  assert rows["base"]["status"] == "running" and rows["base"]["benchmarks"]
  assert rows["ASTRO-SFT"]["status"] == rows["ASTRO-RL"]["status"] == report.NOT_RUN
  assert data["sft"]["astro"]["status"] == "skipped" and data["rl"]["astro"]["status"] == report.NOT_RUN
  assert "direct" not in data["sft"] and "direct" not in data["rl"] and "direct" not in data["difficulty"]
  md = (run / "report.md").read_text()
  assert "direct: not run yet" not in md  # an astro-only run has no direct arm to wait for
  assert "| base (running) |" in md and "| ASTRO-SFT | not run yet |" in md
  assert "astro: skipped" in md and "astro: not run yet" in md
  assert not (run / "report_files" / "sft_loss.png").exists()
  html_page = (run / "report.html").read_text()
  assert "not run yet" in html_page and "<img" not in html_page
  # torn last line of a running eval: ignored
  with open(run / "base" / "eval" / "math500.jsonl", "a") as f:
    f.write('{"id": "torn", "samp')
  report.write_report(run)
  again = json.loads((run / "report.json").read_text())
  assert again["table"]["rows"][0]["benchmarks"]["math500"]["n_problems"] == BENCHMARKS["math500"]
