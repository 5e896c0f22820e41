r"""Final-answer extraction and answer checking for math responses.

* `extract_answer` finds the FINAL answer of a response (the last `\boxed{}`; configurable phrase fallbacks). It is
  pure string work and runs in-process.
* `answers_equal`, `verify`, `is_correct` and `verify_batch` decide equivalence with Math-Verify/SymPy plus a thin
  layer for what it lacks (multiple-choice letters and `\text{}` answers compared as strings; degree signs, thousands
  separators, trailing unit words and `\varnothing` normalised; percent answers also compared with the `%` dropped;
  golds wrapped in `\boxed{}` because bare LaTeX extracts nothing, Math-Verify#70).

SymPy can hang inside C big-integer arithmetic (`9^{9^{9^9}}`), where neither signals nor threads can interrupt it,
and Math-Verify's SIGALRM timeouts only work in a main thread. So every SymPy comparison runs in a worker subprocess
(this file run as a script) that is SIGKILLed and replaced when it exceeds its deadline. A timeout counts as
incorrect (fail closed) and is reported in `Verdict.timed_out`. Workers are plain subprocesses, so all of this works
from any thread and from daemonic worker processes.
"""
from __future__ import annotations

import atexit
import collections
import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_FALLBACKS = ("boxed", "answer_is", "gsm8k")
_STARTUP_TIMEOUT_S = 60.0
_WORKER_MEMORY_BYTES = 4 << 30  # address-space cap per worker: a runaway big integer fails instead of eating RAM


@dataclass(frozen=True)
class Verdict:
  """Outcome of one check. A timed-out check is never correct."""
  correct: bool
  answer: str | None  # the extracted final answer (None: the response has none)
  timed_out: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Extraction (pure, in-process; linear-time scanning only)
# ----------------------------------------------------------------------------------------------------------------

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)\b")
_BARE_BOX_ARG = re.compile(r"\s+([^\s$]+)")  # "\boxed 5"
# What may separate boxes that together state one answer: "\boxed{1}, \boxed{2}", "$\boxed{1}$ and $\boxed{2}$".
_BOX_JOINER = re.compile(r"[\s$,;]*(?:(?:and|or|\\text\{\s*(?:and|or)\s*\}|\\q?quad)[\s$,;]*)?")
_ANSWER_IS = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_MATH_SPANS = tuple((open_, re.compile(close)) for open_, close in
                    (("$$", r"(?<!\\)\$\$"), ("$", r"(?<!\\)\$"), ("\\(", r"\\\)"), ("\\[", r"\\\]")))
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")


def _closing_brace(text: str, open_idx: int) -> int:
  """Index of the `}` matching the `{` at `open_idx` (escaped braces ignored), or -1 when unclosed."""
  depth, i = 0, open_idx
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return -1


def _boxes(text: str) -> list[tuple[int, int, str | None]]:
  """(start, end, content) of each top-level `\\boxed`/`\\fbox`; content is None when the box is never closed
  (or the text ends right after the command)."""
  out: list[tuple[int, int, str | None]] = []
  for m in _BOX_CMD.finditer(text):
    if out and m.start() < out[-1][1]:
      continue  # nested inside the previous box
    brace = m.end()
    while brace < len(text) and text[brace] in " \t":
      brace += 1
    if brace < len(text) and text[brace] == "{":
      close = _closing_brace(text, brace)
      if close < 0:
        out.append((m.start(), len(text), None))
        break
      out.append((m.start(), close + 1, text[brace + 1:close]))
    elif bare := _BARE_BOX_ARG.match(text, m.end()):
      out.append((m.start(), bare.end(), bare.group(1).rstrip(".,;")))
    elif not text[m.end():].strip():  # "... the answer is \boxed" cut off before its argument
      out.append((m.start(), len(text), None))
  return out


def _last_boxed(text: str) -> str | None:
  """The last non-empty box, joined with boxes right before it ("\\boxed{1}, \\boxed{2}" -> "1, 2").

  Returns "" (no answer, stop looking) when the last box is unclosed: the response was truncated mid-answer.
  """
  boxes = [b for b in _boxes(text) if b[2] is None or b[2].strip()]
  if not boxes:
    return None
  if boxes[-1][2] is None:
    return ""
  run = [boxes[-1]]
  for prev in reversed(boxes[:-1]):
    if prev[2] is None or not _BOX_JOINER.fullmatch(text, prev[1], run[0][0]):
      break
    run.insert(0, prev)
  return ", ".join(b[2].strip() for b in run)


def _leading_value(rest: str) -> str:
  """The answer right after an "answer is" anchor: a `$...$`/`\\(...\\)` span, else the rest of the sentence."""
  rest = rest.lstrip()
  for open_, close in _MATH_SPANS:
    if rest.startswith(open_):
      end = close.search(rest, len(open_))
      return rest[len(open_):end.start()] if end else ""
  sentence = _SENTENCE_END.split(rest.split("\n", 1)[0], 1)[0]
  return sentence.strip().strip("*").strip()


def _answer_is(text: str) -> str | None:
  for m in reversed(list(_ANSWER_IS.finditer(text))):
    if value := _leading_value(text[m.end():]):
      return value
  return None


def _gsm8k(text: str) -> str | None:
  for m in reversed(list(_GSM8K.finditer(text))):
    if value := m.group(1).strip().rstrip("."):
      return value
  return None


_EXTRACTORS: dict[str, Callable[[str], str | None]] = {"boxed": _last_boxed, "answer_is": _answer_is,
                                                       "gsm8k": _gsm8k}


def extract_answer(response: str, *, fallbacks: Sequence[str] = DEFAULT_FALLBACKS) -> str | None:
  """The final answer stated in `response`, or None.

  `fallbacks` are tried in order and the first that finds anything decides; within one, the LAST occurrence wins
  (ASTRO traces state wrong answers, reflect, and then give the final one):
    "boxed":     last `\\boxed{...}` / `\\fbox{...}` / `\\boxed 5` (adjacent boxes joined; an unclosed last box,
                 or a `\\boxed` that ends the text, means a truncated response: no answer, and later fallbacks are
                 not tried);
    "answer_is": "... the answer is X" / "final answer is: X" / "Final Answer: X";
    "gsm8k":     "#### X".
  """
  for name in fallbacks:
    if name not in _EXTRACTORS:
      raise ValueError(f"unknown answer extractor {name!r}; known: {sorted(_EXTRACTORS)}")
    answer = _EXTRACTORS[name](response)
    if answer is not None:
      return answer.strip() or None
  return None


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and comparison (run inside workers: regexes and SymPy there are never trusted to be fast)
# ----------------------------------------------------------------------------------------------------------------

_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*"
_TEXT_ARG = re.compile(_TEXT_CMD + r"\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b")
_THOUSANDS = re.compile(r"-?(?:\\\$)?\d{1,3}(?:(?:,\\!\s*|\{,\}|\\,|,)\d{3})+(?:\.\d+)?")
_THOUSANDS_SEP = re.compile(r",\\!\s*|\{,\}|\\,|,")
_UNIT_TEXT = re.compile(r"(.*[\d}])\s*(?:\\[,;!]\s*)*" + _TEXT_CMD + r"\{\s*[A-Za-z][A-Za-z ]*\}(?:\^\{?\d\}?)?")
_UNIT_WORDS = re.compile(r"(.*\d)\s+([A-Za-z]{2,}(?: [A-Za-z]{2,})*)")
_NOT_UNITS = {"pi", "and", "or", "mod", "sqrt"}
_PAREN_NUMBER = re.compile(r"\s*\(\s*([-+]?\d[\d,.]*)\s*\)\s*")
_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*percent\s*\}|percent)\s*$")
_CHOICE = re.compile(r"\(\s*([A-E])\s*\)|([A-E])")
_CHOICE_PRED = re.compile(r"\(\s*([A-Ea-e])\s*\)|([A-E])(?![A-Za-z0-9])")
_WORDS = re.compile(r"[A-Za-z][A-Za-z' \-]*")


def _unwrap(s: str) -> str:
  """Drop whitespace, math delimiters and a whole-answer `\\boxed{}` around an answer."""
  while True:
    s = s.strip()
    delimited = [(o, c) for o, c in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
                 if len(s) >= len(o) + len(c) and s.startswith(o) and s.endswith(c) and o not in s[len(o):-len(c)]]
    if delimited:
      s = s[len(delimited[0][0]):-len(delimited[0][1])]
    elif (box := re.match(r"\\(?:boxed|fbox)\s*\{", s)) and _closing_brace(s, box.end() - 1) == len(s) - 1:
      s = s[box.end():-1]
    else:
      return s


def _unwrap_text(s: str) -> str:
  """`\\text{(C)}` -> `(C)`, `\\textbf{\\text{x}}` -> `x`."""
  while (t := _TEXT_ARG.sub(r"\1", s)) != s:
    s = t
  return s.strip()


def normalize_answer(answer: str) -> str:
  """String-level clean-up applied before Math-Verify (which does the rest: `\\left`, `\\dfrac`, units, ...)."""
  s = _unwrap(answer)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\varnothing", "\\emptyset")
  s = _DEGREES.sub("", s)
  if (inner := _TEXT_ARG.fullmatch(s)) and re.match(r"\s*\(?\s*[-+\d.]", inner.group(1)):
    s = inner.group(1)  # \text{5 cm} -> 5 cm
    if number := _PAREN_NUMBER.fullmatch(s):
      s = number.group(1)  # \textbf{(073)} -> 073 (AIME-style)
  if m := _UNIT_TEXT.fullmatch(s):
    s = m.group(1)  # 5\text{ cm}^2 -> 5
  elif (m := _UNIT_WORDS.fullmatch(s)) and not _NOT_UNITS & set(m.group(2).lower().split()):
    s = m.group(1)  # 5 dollars -> 5
  s = s.strip()
  if _THOUSANDS.fullmatch(s):  # 1,000 / 10,\!080 / 1{,}000 -> 1000; tuples such as (1,234) never match
    s = _THOUSANDS_SEP.sub("", s)
  s = s.replace("\\!", "")
  return re.sub(r"\s+", " ", s).strip().rstrip(".").strip()


def _choice(s: str, *, gold: bool) -> str | None:
  """The multiple-choice letter a gold is ("(C)", "C", "\\text{(C)}"), or that a prediction starts with."""
  s = _unwrap_text(s)
  m = _CHOICE.fullmatch(s) if gold else _CHOICE_PRED.match(s)
  return (m.group(1) or m.group(2)).upper() if m else None


def _text_key(s: str) -> str | None:
  """Lower-cased words of a plain-text answer ("\\text{Evelyn}", "east"), or None when it is not plain text."""
  s = _unwrap_text(s)
  if not _WORDS.fullmatch(s):
    return None
  words = re.sub(r"[^a-z ]", " ", s.lower()).split()
  return " ".join(words[1:] if words[:1] in (["a"], ["an"], ["the"]) else words)


@functools.lru_cache(maxsize=None)
def _math_verify() -> tuple[Any, tuple]:
  """Math-Verify and its extraction config, imported on first use: only worker processes need them."""
  import math_verify
  return math_verify, (math_verify.LatexExtractionConfig(boxed_match_priority=0),)


def _math_verify_equal(pred: str, gold: str) -> bool:
  mv, config = _math_verify()

  def parse(s: str) -> list:  # timeouts off: no signals; the hard limit is the worker kill
    return mv.parse("\\boxed{" + s + "}", extraction_config=config, parsing_timeout=None)

  gold_parsed, pred_parsed = parse(gold), parse(pred)
  return bool(gold_parsed and pred_parsed) and mv.verify(gold_parsed, pred_parsed, timeout_seconds=None)


def compare_answers(pred: str, gold: str) -> bool:
  """Is answer `pred` equivalent to gold answer `gold`? No timeout: call it only where a hang is acceptable.

  Asymmetric like Math-Verify (gold `x=3` accepts `3`; gold inequality accepts a matching interval, not vice
  versa). Open and closed intervals differ; sets are unordered, tuples ordered.
  """
  p, g = normalize_answer(pred), normalize_answer(gold)
  if not p or not g:
    return False
  if p == g:
    return True
  if (letter := _choice(g, gold=True)) is not None:
    return _choice(p, gold=False) == letter
  if _TEXT_ARG.search(g) and (key := _text_key(g)) is not None:
    return _text_key(p) == key
  if _math_verify_equal(p, g):
    return True
  p_bare, g_bare = _PERCENT.sub("", p), _PERCENT.sub("", g)
  return (p_bare, g_bare) != (p, g) and bool(p_bare and g_bare) and _math_verify_equal(p_bare, g_bare)


# ----------------------------------------------------------------------------------------------------------------
# Worker processes with a hard per-check timeout
# ----------------------------------------------------------------------------------------------------------------


class _Worker:
  """A subprocess running `_serve`: requests and replies are JSON lines on its stdin/stdout."""

  def __init__(self) -> None:
    # Run this file by path with -I (no script dir, PYTHONPATH or user site on sys.path): the worker never imports
    # the astro_jax package (and JAX with it), so it starts in well under a second.
    self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--serve"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    self.ready = False
    self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

  def fileno(self) -> int:
    return self.proc.stdout.fileno()

  def send(self, pred: str, gold: str, timeout_s: float) -> bool:
    try:
      self.proc.stdin.write((json.dumps({"pred": pred, "gold": gold, "timeout_s": timeout_s}) + "\n").encode())
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError):
      return False
    self.deadline = time.monotonic() + timeout_s
    return True

  def receive(self) -> dict | None:
    """The next reply (call only once readable; a reply is a single line), or None if the worker died."""
    line = self.proc.stdout.readline()
    try:
      return json.loads(line) if line else None
    except ValueError:
      return None

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    for pipe in (self.proc.stdin, self.proc.stdout):
      try:
        pipe.close()
      except OSError:
        pass


class VerifierPool:
  """Up to `workers` verifier subprocesses, started lazily and reused across calls until `close()`.

  Thread-safe: concurrent calls are serialised. A check that exceeds its deadline kills its worker (replaced when
  more work is queued) and counts as not equal with `timed_out=True`; `n_timeouts` counts them.
  """

  def __init__(self, workers: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S):
    if workers < 1 or timeout_s <= 0:
      raise ValueError(f"need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
    self.size, self.timeout_s = workers, timeout_s
    self.n_timeouts = 0
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self._pid = os.getpid()
    self._closed = False

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def close(self) -> None:
    """Kill all workers. In a forked child the inherited workers belong to the parent and are left alone."""
    with self._lock:
      if os.getpid() == self._pid:
        for w in self._workers:
          w.kill()
      self._workers.clear()
      self._closed = True

  def compare(self, pairs: Sequence[tuple[str, str]], timeout_s: float | None = None) -> list[tuple[bool, bool]]:
    """(equal, timed_out) for each (pred, gold) pair, in order."""
    with self._lock:
      if self._closed:
        raise RuntimeError("VerifierPool is closed")
      return self._run(pairs, timeout_s or self.timeout_s)

  def verify(self, responses: Sequence[str], golds: Sequence[str], *, timeout_s: float | None = None,
             fallbacks: Sequence[str] = DEFAULT_FALLBACKS) -> list[Verdict]:
    """Extract each response's final answer and check it against its gold; order preserved."""
    if len(responses) != len(golds):
      raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    answers = [extract_answer(r, fallbacks=fallbacks) for r in responses]
    # Answers written exactly as the gold need no worker.
    todo = [i for i, a in enumerate(answers) if a is not None and a != golds[i].strip()]
    checked = dict(zip(todo, self.compare([(answers[i], golds[i]) for i in todo], timeout_s)))
    verdicts = []
    for i, answer in enumerate(answers):
      equal, timed_out = checked.get(i, (answer is not None, False))
      verdicts.append(Verdict(equal, answer, timed_out))
    return verdicts

  def _run(self, pairs: Sequence[tuple[str, str]], timeout_s: float) -> list[tuple[bool, bool]]:
    results: list[tuple[bool, bool]] = [(False, False)] * len(pairs)
    todo = collections.deque(range(len(pairs)))
    busy: dict[_Worker, int] = {}
    try:
      while todo or busy:
        while len(self._workers) < min(self.size, len(todo) + len(busy)):
          self._workers.append(_Worker())
        for w in self._workers:
          if todo and w.ready and w not in busy:
            i = todo.popleft()
            if w.send(*pairs[i], timeout_s):
              busy[w] = i
            else:  # died while idle: retry the item on a fresh worker
              todo.appendleft(i)
              self._discard(w)
              break
        waiting = [w for w in self._workers if w in busy or not w.ready]
        if not waiting:
          continue
        wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        readable = select.select(waiting, [], [], wait_s)[0]
        for w in readable:
          reply = w.receive()
          if reply is None:  # the process died: a check in flight fails closed; a start-up failure is fatal
            self._discard(w)
            if w not in busy:
              raise RuntimeError(f"verifier worker exited during start-up (code {w.proc.returncode})")
          if w in busy:
            results[busy.pop(w)] = (reply is not None and reply.get("equal") is True, False)
          else:
            w.ready = True
        now = time.monotonic()
        for w in [w for w in waiting if w not in readable and w.deadline <= now]:
          if w not in busy:
            self._discard(w)
            raise RuntimeError(f"verifier worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
          results[busy.pop(w)] = (False, True)
          self.n_timeouts += 1
          self._discard(w)
    finally:
      for w in list(busy):  # interrupted: these may still answer later, so they cannot be reused
        self._discard(w)
    return results

  def _discard(self, w: _Worker) -> None:
    w.kill()
    if w in self._workers:
      self._workers.remove(w)


_default: VerifierPool | None = None
_default_lock = threading.Lock()


def _default_pool() -> VerifierPool:
  """A process-wide single-worker pool for one-off checks (re-created after a fork)."""
  global _default
  with _default_lock:
    if _default is None or _default._pid != os.getpid():
      _default = VerifierPool(workers=1)
      atexit.register(_default.close)
    return _default


def verify(response: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
           fallbacks: Sequence[str] = DEFAULT_FALLBACKS) -> Verdict:
  """Check the final answer of `response` against `gold` (bare LaTeX as in the datasets) under a hard timeout."""
  return _default_pool().verify([response], [gold], timeout_s=timeout_s, fallbacks=fallbacks)[0]


def is_correct(response: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
  return verify(response, gold, timeout_s=timeout_s).correct


def answers_equal(pred: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
  """Are two extracted answers equivalent (e.g. to group sampled answers)? False on timeout."""
  if not pred.strip() or not gold.strip():
    return False
  if pred.strip() == gold.strip():
    return True
  return _default_pool().compare([(pred, gold)], timeout_s)[0][0]


def verify_batch(responses: Sequence[str], golds: Sequence[str], *, workers: int = min(4, os.cpu_count() or 1),
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 fallbacks: Sequence[str] = DEFAULT_FALLBACKS) -> list[Verdict]:
  """`verify` over a batch with a fresh pool of `workers` processes; all of them are gone when this returns."""
  with VerifierPool(workers, timeout_s) as pool:
    return pool.verify(responses, golds, fallbacks=fallbacks)


# ----------------------------------------------------------------------------------------------------------------
# Worker entry point
# ----------------------------------------------------------------------------------------------------------------


def _limit(kind: str, soft: int) -> None:
  """Lower a resource limit of this (worker) process where the platform supports it."""
  try:
    import resource
    limit = getattr(resource, kind)
    hard = resource.getrlimit(limit)[1]
    resource.setrlimit(limit, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
  except (ImportError, AttributeError, ValueError, OSError):
    pass


def _cpu_seconds_used() -> float:
  times = os.times()
  return times.user + times.system


def _serve() -> None:
  """Answer {"pred", "gold", "timeout_s"} request lines with {"equal": bool} lines until stdin closes."""
  _limit("RLIMIT_AS", _WORKER_MEMORY_BYTES)
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us when it exits
  # Keep the protocol channel private: anything else printed to stdout (even from C) goes to stderr.
  channel = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  # Math-Verify warns that its own timeouts are disabled; the kill is ours. Its failures are answers (False).
  logging.disable(logging.CRITICAL)
  compare_answers("\\frac{1}{2}", "0.5")  # import and warm up Math-Verify/SymPy before reporting ready
  channel.write('{"ready": true}\n')
  channel.flush()
  for line in sys.stdin:
    try:
      request = json.loads(line)
      # Backstop for a parent that died without killing us: SIGXCPU ends a check well past its deadline.
      _limit("RLIMIT_CPU", int(_cpu_seconds_used() + 2 * request["timeout_s"]) + 5)
      equal = compare_answers(request["pred"], request["gold"])
    except Exception:  # includes MemoryError and RecursionError: fail closed
      equal = False
    channel.write(json.dumps({"equal": equal}) + "\n")
    channel.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
  _serve()
