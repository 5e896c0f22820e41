"""Evaluation summary over k samples per problem: pass@1, pass@k, maj@k, response length and reflections.

Every metric is first reduced to one value per problem (e.g. the fraction of that problem's samples that are
correct); the reported value is the mean over problems, and its 95% confidence interval is the normal
approximation over problems, mean +- 1.96 * sd / sqrt(P) (rates clipped to [0, 1]). Problems are the sampling unit:
with k >= 4 samples per problem, problem-to-problem variance dominates the sampling noise of the k generations.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, NamedTuple, Sequence

from astro_jax.verifier import answers_equal

Z_95 = 1.959963984540054
Equal = Callable[[str, str], bool]


class Sample(NamedTuple):
  correct: bool
  answer: str | None  # extracted final answer (None: none found)
  n_tokens: int
  n_reflections: int
  n_backtracks: int = 0  # explicit backtracks (prompts.count_backtracks)


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k estimator (Chen et al. 2021): P(some of k draws without replacement from n is correct)
  = 1 - C(n - c, k) / C(n, k), computed as a stable product."""
  if not (0 <= c <= n and 1 <= k <= n):
    raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_vote(answers: Sequence[str | None], equal: Equal = answers_equal) -> int | None:
  """Index of the winning answer: answers are grouped greedily by `equal(answer, group's first answer)`
  (default: the verifier's `answers_equal`), the largest group wins, ties go to the group seen first, and the
  group's first member represents it. None when no sample has an answer."""
  firsts: list[int] = []
  sizes: list[int] = []
  for i, answer in enumerate(answers):
    if answer is None:
      continue
    for g, first in enumerate(firsts):
      if equal(answer, answers[first]):
        sizes[g] += 1
        break
    else:
      firsts.append(i)
      sizes.append(1)
  if not firsts:
    return None
  return firsts[max(range(len(firsts)), key=lambda g: (sizes[g], -firsts[g]))]


def maj_at_k(samples: Sequence[Sample], k: int, equal: Equal = answers_equal) -> float:
  """maj@k of one problem: the samples are cut into len // k consecutive chunks of k; a chunk scores 1 when its
  majority answer (its representative sample) is correct. Returns the mean over chunks."""
  if not 1 <= k <= len(samples):
    raise ValueError(f"maj@{k} needs at least {k} samples, got {len(samples)}")
  chunks = [samples[i:i + k] for i in range(0, len(samples) - k + 1, k)]
  wins = 0
  for chunk in chunks:
    winner = majority_vote([s.answer for s in chunk], equal)
    wins += winner is not None and bool(chunk[winner].correct)
  return wins / len(chunks)


def mean_ci(values: Sequence[float], *, rate: bool = False) -> dict[str, float]:
  """{"mean", "ci_low", "ci_high"}: normal-approximation 95% interval of the mean (clipped to [0, 1] for rates)."""
  if not values:
    raise ValueError("no values")
  mean = statistics.fmean(values)
  half = Z_95 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
  low, high = mean - half, mean + half
  if rate:
    low, high = max(0.0, low), min(1.0, high)
  return {"mean": mean, "ci_low": low, "ci_high": high}


def summarize(per_problem: Sequence[Sequence[Sample]], *, pass_ks: Sequence[int] | None = None,
              maj_ks: Sequence[int] | None = None, equal: Equal = answers_equal) -> dict:
  """Summary dict (JSON-serialisable) of per-problem samples.

  pass_ks default to the powers of two up to the smallest per-problem sample count n; maj_ks default to (n,).
  Metrics: pass@k..., maj@k..., no_answer_rate, mean_response_tokens, mean_reflections,
  mean_backtracks.
  """
  if not per_problem or min(len(s) for s in per_problem) == 0:
    raise ValueError("need at least one problem and one sample per problem")
  n = min(len(s) for s in per_problem)
  pass_ks = tuple(pass_ks) if pass_ks is not None else tuple(2**i for i in range(n.bit_length()))
  maj_ks = tuple(maj_ks) if maj_ks is not None else ((n,) if n > 1 else ())
  if 1 not in pass_ks:
    pass_ks = (1, *pass_ks)

  per_metric: dict[str, list[float]] = {}
  for k in pass_ks:
    per_metric[f"pass@{k}"] = [pass_at_k(len(s), sum(x.correct for x in s), k) for s in per_problem]
  for k in maj_ks:
    per_metric[f"maj@{k}"] = [maj_at_k(s, k, equal) for s in per_problem]
  per_metric["no_answer_rate"] = [statistics.fmean(x.answer is None for x in s) for s in per_problem]
  per_metric["mean_response_tokens"] = [statistics.fmean(x.n_tokens for x in s) for s in per_problem]
  per_metric["mean_reflections"] = [statistics.fmean(x.n_reflections for x in s) for s in per_problem]
  per_metric["mean_backtracks"] = [statistics.fmean(x.n_backtracks for x in s) for s in per_problem]

  return {
      "n_problems": len(per_problem),
      "samples_per_problem": n,
      "metrics": {name: mean_ci(values, rate=_is_rate(name)) for name, values in per_metric.items()},
  }


def summarize_records(records: Sequence[Sequence[dict]]) -> dict:
  """`summarize` of each problem's sample records (as `generation.Verified.records` gives them), with the count of
  verifier timeouts."""
  per_problem = [[Sample(s["correct"], s["answer"], s["n_tokens"], s["reflections"], s.get("backtracks", 0))
                  for s in samples] for samples in records]
  out = summarize(per_problem)
  out["verifier_timeouts"] = sum(s["timed_out"] for samples in records for s in samples)
  return out


def _is_rate(name: str) -> bool:
  return name.startswith(("pass@", "maj@")) or name.endswith("_rate")


def summary_markdown(summary: dict, title: str | None = None) -> str:
  """A markdown table of `summarize`'s output (rates in %, 95% CIs)."""
  lines = [f"### {title}", ""] if title else []
  lines += [f"{summary['n_problems']} problems, {summary['samples_per_problem']} samples each; "
            "95% CI: normal approximation over problems.", "",
            "| metric | value | 95% CI |", "| --- | ---: | ---: |"]
  for name, m in summary["metrics"].items():
    scale, unit = (100.0, "%") if _is_rate(name) else (1.0, "")
    lines.append(f"| {name} | {m['mean'] * scale:.1f}{unit} | "
                 f"{m['ci_low'] * scale:.1f} – {m['ci_high'] * scale:.1f}{unit} |")
  return "\n".join(lines) + "\n"
