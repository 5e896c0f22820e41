"""JSONL loading (strict, with file:line errors), bundled benchmarks, atomic and resumable writers."""
from __future__ import annotations

import json
import os
import re
from importlib import resources

import pytest

from astro_jax.data import (BENCHMARKS, DataError, Problem, append_jsonl, load_benchmark, load_jsonl, read_jsonl_rows,
                            write_jsonl_atomic)

GOOD = {"id": "p1", "problem": "What is $1+1$?", "answer": "2"}


def write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


@pytest.mark.parametrize("name,count", [("math500", 500), ("amc23", 40), ("aime24", 30), ("gsm8k", 1319)])
def test_bundled_benchmarks(name, count):
  problems = load_benchmark(name)
  assert len(problems) == count
  assert len({p.id for p in problems}) == count
  assert all(p.problem and p.answer for p in problems)


def test_bundled_files_and_readme_ship_in_package():
  datasets = resources.files("astro_jax") / "datasets"
  assert all((datasets / f).is_file() for f in BENCHMARKS.values())
  readme = (datasets / "README.md").read_text(encoding="utf-8")
  assert all(name in readme for name in BENCHMARKS) and "licence" in readme.lower()


def test_problem_fields():
  p = load_benchmark("math500")[0]
  assert p.id == "test/precalculus/807.json" and p.subject == "Precalculus" and p.level == 2 and p.solution
  amc = load_benchmark("amc23")[0]
  assert amc.solution is None and amc.extra["url"].startswith("https://")
  assert Problem(**{**GOOD, "extra": {"url": "u"}}).to_dict() == {**GOOD, "url": "u"}


def test_load_local_path(tmp_path):
  path = write_lines(tmp_path / "mine.jsonl", [json.dumps(GOOD), "", json.dumps({**GOOD, "id": "p2", "level": 3})])
  problems = load_benchmark(str(path))
  assert [p.id for p in problems] == ["p1", "p2"] and problems[1].level == 3
  with pytest.raises(FileNotFoundError, match="math500"):
    load_benchmark(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("bad_line,reason", [
    ('{"id": "p2", "problem": "x", "answer": "1"', "invalid JSON"),
    ('["not", "an", "object"]', "JSON object"),
    ('{"problem": "x", "answer": "1"}', "missing required field 'id'"),
    ('{"id": "p2", "answer": "1"}', "missing required field 'problem'"),
    ('{"id": "p2", "problem": "x"}', "missing required field 'answer'"),
    ('{"id": "p2", "problem": "x", "answer": 1}', "'answer' must be a string"),
    ('{"id": 2, "problem": "x", "answer": "1"}', "'id' must be a string"),
    ('{"id": "p2", "problem": "x", "answer": "1", "level": "5"}', "'level' must be int"),
    ('{"id": "p2", "problem": "x", "answer": "1", "level": true}', "'level' must be int"),
    ('{"id": "p1", "problem": "x", "answer": "1"}', "duplicate id 'p1' \\(first on line 1\\)"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, reason):
  path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", bad_line, json.dumps({**GOOD, "id": "p3"})])
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: .*{reason}"):
    load_jsonl(path)


def test_write_jsonl_atomic(tmp_path):
  path = tmp_path / "out.jsonl"
  rows = [{"id": str(i), "x": "é"} for i in range(3)]
  write_jsonl_atomic(path, rows)
  assert read_jsonl_rows(path) == rows
  assert os.listdir(tmp_path) == ["out.jsonl"]  # no temp file left

  def failing_rows():
    yield {"id": "new"}
    raise RuntimeError("crash mid-write")

  with pytest.raises(RuntimeError):
    write_jsonl_atomic(path, failing_rows())
  assert read_jsonl_rows(path) == rows  # old content intact
  assert os.listdir(tmp_path) == ["out.jsonl"]


def test_append_and_torn_last_line(tmp_path):
  path = tmp_path / "progress.jsonl"
  assert read_jsonl_rows(path, missing_ok=True) == []
  with pytest.raises(FileNotFoundError):
    read_jsonl_rows(path)
  append_jsonl(path, {"i": 0})
  append_jsonl(path, {"i": 1}, fsync=False)
  with open(path, "ab") as f:  # a run killed mid-write leaves a partial line
    f.write(b'{"i": 2, "text": "caf\xc3')
  assert read_jsonl_rows(path) == [{"i": 0}, {"i": 1}]
  append_jsonl(path, {"i": 2})  # resuming cuts the torn tail before appending
  assert read_jsonl_rows(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
  assert path.read_bytes().endswith(b'{"i": 2}\n')


def test_torn_tail_without_any_newline(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes(b'{"i": 0')
  assert read_jsonl_rows(path) == []
  append_jsonl(path, {"i": 1})
  assert read_jsonl_rows(path) == [{"i": 1}]


def test_corruption_before_last_line_is_an_error(tmp_path):
  path = write_lines(tmp_path / "p.jsonl", ['{"i": 0}', '{"i": 1', '{"i": 2}'])
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: invalid JSON"):
    read_jsonl_rows(path)
  # A complete last line (terminated by a newline) that does not parse is corruption too, not a torn write.
  write_lines(path, ['{"i": 0}', '{"i": 1'])
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2:"):
    read_jsonl_rows(path)
  # An unterminated but valid last line is kept.
  path.write_text('{"i": 0}\n{"i": 1}', encoding="utf-8")
  assert read_jsonl_rows(path) == [{"i": 0}, {"i": 1}]
