"""Eval metrics: pass@k against brute force, majority voting, confidence intervals, markdown."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from astro_jax.eval_metrics import (Sample, maj_at_k, majority_vote, mean_ci, pass_at_k, summarize,
                                    summary_markdown)

str_equal = lambda a, b: a == b  # noqa: E731  (fast grouping for tests that are not about equivalence)


def sample(correct: bool, answer: str | None = "x", tokens: int = 10, reflections: int = 0) -> Sample:
  return Sample(correct, answer, tokens, reflections)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_subset_enumeration(n):
  for c in range(n + 1):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(outcomes, k))
      brute = sum(any(s) for s in subsets) / len(subsets)
      assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
  assert pass_at_k(16, 0, 8) == 0.0
  assert pass_at_k(16, 16, 1) == 1.0
  assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
  assert 0.0 < pass_at_k(1000, 1, 500) <= 1.0
  for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
    with pytest.raises(ValueError):
      pass_at_k(*bad)


def test_majority_vote_ties_and_missing():
  assert majority_vote(["1", "2", "2", "1"], str_equal) == 0  # tie: the group seen first wins
  assert majority_vote(["2", "1", "1", "2"], str_equal) == 0
  assert majority_vote([None, "3", "4", "4"], str_equal) == 2
  assert majority_vote([None, None], str_equal) is None
  assert majority_vote([], str_equal) is None
  assert majority_vote([None, "5"], str_equal) == 1


def test_majority_vote_groups_equivalent_answers():
  # \frac12, 0.5 and 1/2 are one answer (3 votes) and beat "3" (2 votes) under the real verifier.
  assert majority_vote(["3", r"\frac12", "3", "0.5", "1/2"]) == 1


def test_maj_at_k_chunks():
  right, wrong = sample(True, "7"), sample(False, "8")
  assert maj_at_k([right, wrong, right, wrong], 4, str_equal) == 1.0  # tie -> first group ("7")
  assert maj_at_k([wrong, right, right, wrong], 4, str_equal) == 0.0
  assert maj_at_k([right, right, wrong, wrong], 2, str_equal) == 0.5  # two chunks of 2
  assert maj_at_k([sample(False, None)] * 3, 3, str_equal) == 0.0
  with pytest.raises(ValueError):
    maj_at_k([right], 2, str_equal)


def test_mean_ci():
  ci = mean_ci([0.0, 1.0, 1.0, 0.0, 1.0], rate=True)
  assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"] and ci["mean"] == pytest.approx(0.6)
  assert 0.0 <= ci["ci_low"] and ci["ci_high"] <= 1.0
  assert mean_ci([3.0, 3.0, 3.0]) == {"mean": 3.0, "ci_low": 3.0, "ci_high": 3.0}
  assert mean_ci([5.0]) == {"mean": 5.0, "ci_low": 5.0, "ci_high": 5.0}
  assert mean_ci([0.0, 0.0, 1.0], rate=True)["ci_low"] == 0.0  # clipped
  narrow, wide = mean_ci([0.0, 1.0] * 200), mean_ci([0.0, 1.0] * 5)
  assert narrow["ci_high"] - narrow["ci_low"] < wide["ci_high"] - wide["ci_low"]


def test_summarize_and_markdown():
  rng = random.Random(0)
  per_problem = []
  for p in range(30):
    skill = p / 30
    per_problem.append([sample(ok, "1" if ok else rng.choice(["2", "3", None]), rng.randint(50, 500),
                               rng.randint(0, 3)) for ok in (rng.random() < skill for _ in range(8))])
  summary = summarize(per_problem, equal=str_equal)
  json.dumps(summary)  # serialisable
  metrics = summary["metrics"]
  assert summary["n_problems"] == 30 and summary["samples_per_problem"] == 8
  assert list(metrics) == ["pass@1", "pass@2", "pass@4", "pass@8", "maj@8", "no_answer_rate",
                           "mean_response_tokens", "mean_reflections", "mean_backtracks"]
  for m in metrics.values():
    assert m["ci_low"] <= m["mean"] <= m["ci_high"]
  flat = [x for s in per_problem for x in s]
  assert metrics["pass@1"]["mean"] == pytest.approx(sum(x.correct for x in flat) / len(flat))
  assert metrics["mean_response_tokens"]["mean"] == pytest.approx(sum(x.n_tokens for x in flat) / len(flat))
  assert metrics["pass@1"]["mean"] <= metrics["pass@2"]["mean"] <= metrics["pass@8"]["mean"]
  assert metrics["pass@8"]["mean"] == pytest.approx(sum(any(x.correct for x in s) for s in per_problem) / 30)

  table = summary_markdown(summary, title="MATH-500")
  assert table.startswith("### MATH-500")
  assert "| pass@1 |" in table and "| maj@8 |" in table and "| mean_response_tokens |" in table
  assert f"{metrics['pass@1']['mean'] * 100:.1f}%" in table

  custom = summarize(per_problem, pass_ks=[4], maj_ks=[2, 4], equal=str_equal)["metrics"]
  assert {"pass@1", "pass@4", "maj@2", "maj@4"} <= set(custom)
  with pytest.raises(ValueError):
    summarize([])
  with pytest.raises(ValueError):
    summarize(per_problem, pass_ks=[16], equal=str_equal)
