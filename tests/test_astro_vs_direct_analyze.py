"""experiments/astro_vs_direct/analyze.py on a hand-made run directory: numbers against hand / NumPy computations."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _module():
  spec = importlib.util.spec_from_file_location("analyze", REPO / "experiments" / "astro_vs_direct" / "analyze.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


analyze = _module()
PROBLEMS = ["arith/L1/test/00000", "arith/L1/test/00001", "arith/L2/test/00000", "arith/L2/test/00001"]
# correct samples (of 4) per problem, per (model dir, seed)
CORRECT = {("base/eval", None): [1, 0, 0, 0],
           ("astro/eval_sft", 0): [2, 1, 0, 0], ("astro/eval_sft", 1): [1, 1, 1, 0],
           ("astro/eval_rl", 0): [4, 2, 1, 0], ("astro/eval_rl", 1): [3, 3, 1, 1],
           ("direct/eval_sft", 0): [2, 0, 0, 0], ("direct/eval_sft", 1): [1, 0, 1, 0],
           ("direct/eval_rl", 0): [3, 1, 0, 0], ("direct/eval_rl", 1): [3, 2, 0, 1]}


def _run(root: Path) -> Path:
  """A pipeline run directory with eval rows (backtracks: 1 per correct sample of ASTRO models) and RL metrics."""
  for (sub, seed), correct in CORRECT.items():
    arm, stage = sub.split("/")
    folder = root / sub if seed is None else root / arm / f"seed{seed}" / stage
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": p, "benchmark": "test", "gold": "1",
             "samples": [{"text": "x", "answer": "1" if i < c else "2", "correct": i < c, "n_tokens": 10 + i,
                          "backtracks": int(arm == "astro" and i < c)} for i in range(4)]}
            for p, c in zip(PROBLEMS, correct)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  for arm in ("astro", "direct"):
    for seed in (0, 1):
      folder = root / arm / f"seed{seed}" / "rl"
      folder.mkdir(parents=True)
      rows = [{"step": t, "accuracy": 0.1 * t + seed, "response_length_mean": 50.0 + t,
               "backtracks_per_response": float(arm == "astro") * t} for t in (1, 2, 3)]
      (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "pipeline.json").write_text("{}")
  return root


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
  run = _run(tmp_path_factory.mktemp("run"))
  dest = tmp_path_factory.mktemp("experiment") / "results"
  files = analyze.collect(run, dest)
  assert (dest / "astro" / "seed1" / "eval_rl" / "test.jsonl.gz") in files and (dest / "pipeline.json") in files
  return dest


def test_the_table_and_the_paired_difference_are_the_hand_computed_means(results):
  out = analyze.analyze(results)
  assert out["seeds"] == [0, 1] and out["problems"] == 4
  rate = lambda sub: np.array([CORRECT[(sub, s)] for s in (0, 1)]) / 4
  table = {row["model"]: row for row in out["table"]}
  assert list(table) == ["base", "Direct-SFT", "ASTRO-SFT", "Direct-RL", "ASTRO-RL"]
  assert table["base"]["pass@1"]["mean"] == pytest.approx(0.25 / 4)
  assert table["ASTRO-RL"]["pass@1"]["mean"] == pytest.approx(rate("astro/eval_rl").mean())
  diff = rate("astro/eval_rl") - rate("direct/eval_rl")
  assert out["paired"]["mean"] == pytest.approx(diff.mean())
  assert out["paired"]["ci_low"] <= diff.mean() <= out["paired"]["ci_high"]
  # ASTRO models: one backtrack per correct sample; length: samples of 10..13 tokens
  assert table["ASTRO-RL"]["backtracks_per_response"] == pytest.approx(rate("astro/eval_rl").mean())
  assert table["Direct-RL"]["backtracks_per_response"] == 0
  assert table["base"]["mean_response_tokens"] == pytest.approx(11.5)
  level2 = out["per_level"]["2"]
  assert level2["problems"] == 2 and level2["paired"]["mean"] == pytest.approx(diff[:, 2:].mean())


def test_the_bootstrap_resamples_seeds_and_problems_together():
  constant = np.full((3, 5), 0.4)
  assert analyze.bootstrap_seeds_problems(constant) == pytest.approx((0.4, 0.4))
  # one seed: the interval is the problems' bootstrap, which a brute-force loop with the same draws reproduces
  values = np.array([[0.0, 1.0, 0.5, 0.25, 1.0]])
  rng = np.random.default_rng(analyze.SEED)
  s_idx, p_idx = rng.integers(0, 1, size=(200, 1)), rng.integers(0, 5, size=(200, 5))
  brute = [np.mean([values[s, p] for s in s_idx[i] for p in p_idx[i]]) for i in range(200)]
  expected = tuple(np.percentile(brute, [2.5, 97.5]))
  assert analyze.bootstrap_seeds_problems(values, resamples=200) == pytest.approx(expected)
  # seeds that disagree widen the interval beyond the problems' alone
  spread = np.array([[0.2] * 5, [0.8] * 5])
  low, high = analyze.bootstrap_seeds_problems(spread)
  assert low == pytest.approx(0.2) and high == pytest.approx(0.8)


def test_correlations_curves_and_the_written_files(results):
  out = analyze.analyze(results)
  points = [(np.mean([[int(a == "astro" and i < c) for i in range(4)] for c in CORRECT[(sub, s)]]),
             np.mean(CORRECT[(sub, s)]) / 4)
            for sub, s in CORRECT for a in [sub.split("/")[0]]]
  points += [points[0]]  # the base eval counts once per seed
  x, y = np.array(points).T
  assert out["correlations"]["checkpoints"]["n"] == 9 + 1
  assert out["correlations"]["checkpoints"]["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
  curves = out["rl_curves"]
  assert curves["astro"]["step"] == [1, 2, 3] and curves["astro"]["accuracy"] == pytest.approx([0.6, 0.7, 0.8])
  assert curves["direct"]["backtracks_per_response"] == [0.0, 0.0, 0.0]
  assert analyze.main(["--results", str(results)]) == 0
  folder = results.parent
  assert json.loads((folder / "results.json").read_text())["paired"]["models"] == "ASTRO-RL - Direct-RL"
  assert "| ASTRO-RL |" in (folder / "table.md").read_text()
  assert (folder / "rl_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
