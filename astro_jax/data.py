"""Math problems as JSON Lines: strict loading, bundled benchmarks, atomic and append-only writers."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from astro_jax.errors import UserError
from astro_jax.files import write_text_atomic

logger = logging.getLogger(__name__)

# Benchmark name -> file shipped in astro_jax/datasets/ (see the README there for origins and licences).
BENCHMARKS = {"math500": "math500.jsonl", "amc23": "amc23.jsonl", "aime24": "aime24.jsonl",
              "gsm8k": "gsm8k_test.jsonl"}


class DataError(UserError):
  """A malformed data file; the message starts with `file:line:`."""


@dataclasses.dataclass(frozen=True)
class Problem:
  id: str
  problem: str
  answer: str  # gold final answer, bare LaTeX (no \boxed{})
  solution: str | None = None
  source: str | None = None
  subject: str | None = None
  level: int | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)  # other fields, e.g. url

  def to_dict(self) -> dict[str, Any]:
    row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
    return {**{k: v for k, v in row.items() if v is not None}, **self.extra}


_REQUIRED = ("id", "problem", "answer")
_OPTIONAL_TYPES: dict[str, type] = {"solution": str, "source": str, "subject": str, "level": int}


def problem_from_row(row: Any) -> Problem:
  """Validate one decoded JSON row; raises ValueError with the reason."""
  if not isinstance(row, dict):
    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
  for key in _REQUIRED:
    if key not in row:
      raise ValueError(f"missing required field {key!r}")
    if not isinstance(row[key], str):
      raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
  for key, typ in _OPTIONAL_TYPES.items():
    value = row.get(key)
    if value is not None and (not isinstance(value, typ) or isinstance(value, bool)):
      raise ValueError(f"field {key!r} must be {typ.__name__} or null, got {type(value).__name__}")
  known = {k: row.get(k) for k in (*_REQUIRED, *_OPTIONAL_TYPES)}
  return Problem(**known, extra={k: v for k, v in row.items() if k not in known})


def decode_line(line: bytes) -> str:
  """One line of a text file as str; ValueError "not UTF-8 text (...)" naming the first bad byte and its column."""
  try:
    return line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}: {e.reason})") from None


def parse_json_line(line: bytes) -> Any:
  """The JSON value of one JSONL line; ValueError with the reason (not UTF-8 text, invalid JSON)."""
  text = decode_line(line)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None


def load_jsonl(path: str | os.PathLike, *, nonblank: tuple[str, ...] = ()) -> list[Problem]:
  """Problems from a JSONL file. Blank lines are skipped; anything malformed raises DataError at `file:line`, as
  does a problem whose fields `nonblank` (of problem, answer, ...) are empty or only whitespace."""
  problems: list[Problem] = []
  first_line: dict[str, int] = {}
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{os.fspath(path)}:{lineno}"
      try:
        problem = problem_from_row(parse_json_line(line))
      except ValueError as e:
        raise DataError(f"{where}: {e}") from None
      for field in nonblank:
        if not str(getattr(problem, field) or "").strip():
          raise DataError(f"{where}: problem {problem.id!r} has an empty {field!r}")
      if problem.id in first_line:
        raise DataError(f"{where}: duplicate id {problem.id!r} (first on line {first_line[problem.id]})")
      first_line[problem.id] = lineno
      problems.append(problem)
  return problems


def load_benchmark(name_or_path: str | os.PathLike, *, nonblank: tuple[str, ...] = ()) -> list[Problem]:
  """A bundled benchmark by name (math500, amc23, aime24, gsm8k = GSM8K test), else a local JSONL file (see
  `load_jsonl` for `nonblank`)."""
  if isinstance(name_or_path, str) and name_or_path in BENCHMARKS:
    with resources.as_file(resources.files("astro_jax") / "datasets" / BENCHMARKS[name_or_path]) as path:
      return load_jsonl(path, nonblank=nonblank)
  if not Path(name_or_path).is_file():
    raise FileNotFoundError(f"{name_or_path!r} is neither a bundled benchmark {sorted(BENCHMARKS)} nor a file")
  return load_jsonl(name_or_path, nonblank=nonblank)


def _dumps(row: Mapping[str, Any]) -> str:
  return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
  """Write rows so that `path` is either the old file or the complete new one, never a partial write."""
  write_text_atomic(path, (_dumps(row) for row in rows))


def append_jsonl(path: str | os.PathLike, row: Mapping[str, Any], *, fsync: bool = True) -> None:
  """Append one row (one write call). A torn last line left by a killed writer is cut off first."""
  with open(path, "a+b") as f:
    _truncate_torn_tail(f)
    f.write(_dumps(row).encode("utf-8"))
    f.flush()
    if fsync:
      os.fsync(f.fileno())


def _truncate_torn_tail(f) -> None:
  """Cut a file opened in "a+b" back to just after its last newline, if it does not end with one."""
  size = f.seek(0, os.SEEK_END)
  end = size
  while end > 0:
    start = max(0, end - 65536)
    f.seek(start)
    chunk = f.read(end - start)
    if end == size and chunk.endswith(b"\n"):
      return
    newline = chunk.rfind(b"\n")
    if newline >= 0:
      f.truncate(start + newline + 1)
      return
    end = start
  if size:
    f.truncate(0)


def read_jsonl_rows(path: str | os.PathLike, *, missing_ok: bool = False,
                   torn_tail_ok: bool = True) -> list[dict[str, Any]]:
  """Rows of a JSONL file. With `torn_tail_ok` (files written by `append_jsonl`), an unterminated last line that
  does not parse (a run killed mid-write) is dropped; any other malformed line raises DataError at `file:line`."""
  return [row for _, row in read_jsonl_lines(path, missing_ok=missing_ok, torn_tail_ok=torn_tail_ok)]


def read_jsonl_lines(path: str | os.PathLike, *, missing_ok: bool = False,
                     torn_tail_ok: bool = True) -> list[tuple[int, dict[str, Any]]]:
  """(line number, row) for every row of a JSONL file, as `read_jsonl_rows`."""
  try:
    data = Path(path).read_bytes()
  except FileNotFoundError:
    if missing_ok:
      return []
    raise
  lines = data.split(b"\n")  # the last element is b"" when the file ends with a newline
  rows = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = parse_json_line(line)
    except ValueError as e:  # not UTF-8 (a character cut by a torn write, too) or invalid JSON
      if torn_tail_ok and lineno == len(lines):
        logger.warning("%s:%d: dropping torn last line (%d bytes)", os.fspath(path), lineno, len(line))
        break
      raise DataError(f"{os.fspath(path)}:{lineno}: {e}") from None
    if not isinstance(row, dict):
      raise DataError(f"{os.fspath(path)}:{lineno}: expected a JSON object, got {type(row).__name__}")
    rows.append((lineno, row))
  return rows
