"""The arithmetic word-problem generator (astro_jax.datasets.arith) and tools/make_arith.py: answers recomputed
from the text's numbers and the expression (not by the generator's code), seeded and reproducible files, no text
shared between train and test, ids that say the level, rows every stage reads, the real verifier's verdicts."""
from __future__ import annotations

import json
import os
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import sympy

from astro_jax import data, verifier
from astro_jax.datasets import arith
from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import make_arith  # noqa: E402

ID = re.compile(r"^arith/L([1-4])/(train|test)/(\d{5})$")
TOKEN = re.compile(r"\d+|[-+*/]")


def make(out: Path, *args: str) -> dict[str, list[dict]]:
  assert make_arith.main(["--out", str(out), *args]) == 0
  return {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in arith.SPLITS}


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict[str, list[dict]]:
  return make(tmp_path_factory.mktemp("arith"), "--train", "300", "--test", "100", "--seed", "5")


def steps(expression: str) -> tuple[list[int], list[str]]:
  """The numbers and operators of a left-nested expression "((a op b) op c)", in order."""
  tokens = TOKEN.findall(expression)
  numbers, ops = [int(t) for t in tokens if t.isdigit()], [t for t in tokens if not t.isdigit()]
  assert len(numbers) == len(ops) + 1 and expression.count("(") == len(ops), expression
  return numbers, ops


def test_answers_follow_from_the_text_numbers_and_every_step_is_whole_and_positive(split):
  apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
  for row in split["train"] + split["test"]:
    numbers, ops = steps(row["expression"])
    # the numbers the problem states, in its order, are those the expression computes with
    assert [int(x) for x in re.findall(r"\d+", row["problem"])] == numbers, row
    assert sympy.sympify(row["expression"]) == sympy.Integer(int(row["answer"])), row
    value = Fraction(numbers[0])
    for op, x in zip(ops, numbers[1:]):
      value = apply[op](value, Fraction(x))
      assert value.denominator == 1 and value >= 1, f"{row['id']}: an intermediate result of {value}"
    assert value == int(row["answer"])


def test_ids_levels_and_step_counts(split):
  for name, rows in split.items():
    assert [int(ID.match(r["id"]).group(1)) for r in rows] == [r["level"] for r in rows]
    assert {ID.match(r["id"]).group(2) for r in rows} == {name}
    for level in arith.LEVELS:
      mine = [r for r in rows if r["level"] == level]
      assert [int(ID.match(r["id"]).group(3)) for r in mine] == list(range(300 if name == "train" else 100))
      assert all(len(steps(r["expression"])[1]) == level for r in mine)
      assert {op for r in mine for op in steps(r["expression"])[1]} == set(arith.OPS)  # every operation occurs


def test_no_problem_text_is_shared_between_train_and_test(split):
  train, test = [r["problem"] for r in split["train"]], [r["problem"] for r in split["test"]]
  assert len(set(train)) == len(train) and len(set(test)) == len(test)
  assert not set(train) & set(test)
  from astro_jax.search.policy import EXAMPLE_PROBLEM
  assert EXAMPLE_PROBLEM not in set(train) | set(test)


def test_templates_and_names_vary(split):
  rows = split["train"]
  questions = {re.sub(r"\d+", "N", r["problem"].rsplit(". ", 1)[-1]) for r in rows}
  names = {r["problem"].split(" ", 1)[0].split("'")[0] for r in rows}
  assert len(questions) >= 10 and len(names) >= 12
  assert {"dollars" in r["problem"] for r in rows} == {True, False}  # both domains


def test_same_seed_same_files_other_seed_other_problems(tmp_path, split):
  a = make(tmp_path / "a", "--train", "20", "--test", "10", "--levels", "1,2", "--seed", "3")
  make(tmp_path / "b", "--train", "20", "--test", "10", "--levels", "1,2", "--seed", "3")
  for s in arith.SPLITS:
    assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
  c = make(tmp_path / "c", "--train", "20", "--test", "10", "--levels", "1,2", "--seed", "4")
  assert not {r["problem"] for r in a["test"]} & {r["problem"] for r in c["test"]}
  # a level depends on (seed, level) only, the test problems not on the train size
  d = make(tmp_path / "d", "--train", "5", "--test", "10", "--levels", "2", "--seed", "3")
  assert d["test"] == [r for r in a["test"] if r["level"] == 2]
  assert d["train"] == [r for r in a["train"] if r["level"] == 2][:5]


def test_every_stage_reads_the_rows_and_the_real_verifier_accepts_the_answer(tmp_path, capsys):
  make(tmp_path, "--train", "4", "--test", "3", "--levels", "1", "--seed", "0")
  assert capsys.readouterr().out.splitlines()[-1].endswith("test.jsonl: 3 problems; level 1: 3")
  problems = data.load_jsonl(tmp_path / "train.jsonl", nonblank=("problem", "answer"))
  assert [p.level for p in problems] == [1] * 4 and all("expression" in p.extra for p in problems)
  for p in problems:
    assert verifier.verify(f"So the answer is \\boxed{{{p.answer}}}.", p.answer).correct
    assert not verifier.verify(f"\\boxed{{{int(p.answer) + 1}}}", p.answer).correct


def test_bad_arguments_stop_with_one_line(tmp_path, capsys):
  for args in (["--levels", "5"], ["--levels", "1,1"], ["--levels", "x"], ["--train", "-1"]):
    with pytest.raises(SystemExit) as exit_:
      make_arith.main(["--out", str(tmp_path), *args])
    assert exit_.value.code == 2
  assert not list(tmp_path.iterdir())
  first = next(arith.level_stream(0, 1)).problem
  with pytest.raises(ValueError, match="no new problem text"):  # no distinct text within max_tries draws
    arith.make_split(0, 1, [1], seed=0, exclude=[first], max_tries=1)
