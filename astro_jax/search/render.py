r"""Procedure cloning to language (paper §2.4): a linearized `Trace` as one natural chain of thought, and SFT rows.

Forward steps are paragraphs joined by blank lines (optionally smoothed by a `rewrite(context, step)` hook: the
policy with `REWRITE_PROMPT`, off by default). After each wrong final answer comes one paragraph: a reflection
question, a negative verdict, and a backtrack sentence that quotes the step it returns to (a step narrated before:
its first clause), or a restart sentence when the trace returns to the root. After high-Q intermediate steps and
after the final answer comes a reflection question with a positive verdict. Phrases are drawn from `Templates`
(several paraphrases per kind) by a seeded RNG.

Invariants, enforced here rather than hoped for (the rendered text is checked before it is returned):
* `prompts.count_backtracks(text) == k`: every backtrack/restart template matches the backtrack regex exactly once
  and no other template does (validated in `Templates`); in step text and quoted steps each backtrack phrase is
  defused into a gerund ("Let's go back to the sum" -> "Going back to the sum"), over whole runs of steps so that
  a phrase split across two steps is caught too.
* Exactly k+1 `\boxed{}`: a non-terminal step's boxes are unwrapped to their content (a box there is not a final
  answer: the search only ends a path at a terminal); in a terminal step the last box holds the node's recorded
  answer (the one the tree verified) and earlier boxes are unwrapped; a terminal without a box gets "The final
  answer is \boxed{...}." appended. Templates may not contain boxes. So `verifier.extract_answer(text)` is the
  correct terminal's answer.
* With the default templates, `prompts.count_reflections` counts one marker per reflection paragraph (each question
  is ASTRO's "(But) wait, are we solving the problem correctly (so far)?" form and each negative verdict ASTRO's
  "I'm not sure if we're solving the problem correctly", which the counter's `astro_reflection` pattern reads as one
  unit together with the backtrack sentence; positive verdicts hold no marker): k + (positive reflections) per trace,
  plus whatever markers the model's own step text contains.

Choices where the paper is silent (config keys in `RenderConfig`):
* Positive reflections: after at most `max_positive_per_segment` (1) intermediate step per forward segment (the
  steps between two backtracks), the one with the highest Q (earliest on ties), when its Q >= `q_threshold` (0.8)
  and rests on at least `min_visits` samples (`q_samples`; default M = `rollouts`, what evaluates one new child),
  so never on a step that a single grafted rollout took; and after the final answer (`positive_final`). One per
  segment, not after every good step: the reflection should mark a checkpoint, and a reflection after each step
  would drown the steps. Never right before a terminal step: the terminal's own reflection (negative or positive)
  follows it at once.
* The backtrack sentence quotes the target step's first sentence, cut at its first clause break (outside `$...$`)
  when it has more than `quote_words` (12) words, else at `quote_words` words with "..." (never inside math).
* Traces in direct.jsonl are rendered with no reflections at all (the Direct-SFT ablation has neither reflection nor
  backtracking); the k=0 trace of the ASTRO mix keeps its positive reflections (reflection that ends in a positive
  verdict is part of what ASTRO teaches).
* Template draws, like the traces, use RNGs derived from (seed, tree id, kind, row index), never file positions.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Callable, Mapping, Sequence

from astro_jax import prompts, verifier
from astro_jax.search import linearize
from astro_jax.search.linearize import Backtrack, Step, Trace, TreeIndex

_BOX = re.compile(r"\\(?:boxed|fbox)\b")

Rewrite = Callable[[str, str], str]  # (trace so far, step text) -> smoothed step text

REWRITE_PROMPT = (
    "You edit one step of a step-by-step math solution so that it reads as a natural continuation of the text "
    "before it. Keep every number, equation and claim of the step exactly; do not add new reasoning, do not fix "
    "mistakes, do not add a final answer the step does not state. Reply with the edited step only.\n\n"
    "Text so far:\nThe garden is a rectangle 12 m long and 5 m wide.\n\n"
    "Step:\narea = 12*5 = 60 m^2\n\n"
    "Edited step:\nIts area is therefore $12 \\times 5 = 60$ square metres.\n\n"
    "Text so far:\nWe need the sum of the first 10 positive integers. Pairing the first and last terms gives "
    "$1 + 10 = 11$.\n\n"
    "Step:\nthere are 5 pairs so sum is 55. The final answer is \\boxed{{55}}.\n\n"
    "Edited step:\nThere are 5 such pairs, so the sum is $5 \\times 11 = 55$. The final answer is \\boxed{{55}}.\n\n"
    "Text so far:\n{context}\n\nStep:\n{step}\n\nEdited step:\n")  # a str.format template (literal braces doubled)


def rewrite_prompt(context: str, step: str, template: str = REWRITE_PROMPT) -> str:
  """The rewriting prompt for one step (for the LM-backed `rewrite` hook)."""
  return template.format(context=context.strip() or "(nothing yet)", step=step.strip())


@dataclasses.dataclass(frozen=True)
class Templates:
  """Paraphrases of each phrase kind; `backtrack` holds `{step}` (the quoted target step)."""
  reflection: tuple[str, ...] = (
      "But wait, are we solving the problem correctly so far? Hmm...",
      "But wait, are we solving this problem correctly so far?",
      "Wait, are we solving the problem correctly so far? Hmm...",
      "But wait, are we solving the problem correctly?",
      "Wait, are we solving this problem correctly so far?")
  negative: tuple[str, ...] = (
      "I'm not sure if we're solving the problem correctly so far.",
      "I'm not sure whether we're solving this problem correctly.",
      "I'm not sure if we're solving this problem correctly so far.",
      "I'm not sure whether we're solving the problem correctly so far.")
  positive: tuple[str, ...] = (
      "Our solution seems to be correct so far.",
      "Yes, everything so far looks right.",
      "The reasoning so far holds up.",
      "So far, each step seems to be correct.",
      "This all appears consistent so far.")
  backtrack: tuple[str, ...] = (
      "Let's go back to where we wrote \"{step}\" and try a different approach from there.",
      "Let me go back to the step \"{step}\" and continue differently.",
      "Let's revisit the step \"{step}\" and take another path from there.",
      "Let us backtrack to \"{step}\" and try something else.",
      "Let's go back to the point where we had \"{step}\" and proceed another way.")
  restart: tuple[str, ...] = (
      "Let's restart our solution from the beginning.",
      "Let's start over from the beginning and try a different approach.",
      "Let me restart the solution from scratch.",
      "Let us start over and approach the problem differently.")

  def __post_init__(self):
    for kind in ("reflection", "negative", "positive", "backtrack", "restart"):
      items = getattr(self, kind)
      if isinstance(items, str) or not items:
        raise ValueError(f"templates.{kind} must be a non-empty sequence of strings")
      object.__setattr__(self, kind, tuple(items))
      want = 1 if kind in ("backtrack", "restart") else 0
      for t in items:
        probes = [t.replace("{step}", p) for p in ("x", "go back", "us go back", "'s restart")]
        if kind == "backtrack" and "{step}" not in t:
          raise ValueError(f"templates.backtrack {t!r} must contain {{step}}")
        if any(prompts.count_backtracks(p) != want for p in probes):
          raise ValueError(f"templates.{kind} {t!r} must match the backtrack regex exactly {want} time(s)")
        if _BOX.search(t):
          raise ValueError(f"templates.{kind} {t!r} must not contain a box")

  @classmethod
  def from_config(cls, mapping: Mapping[str, Sequence[str]] | None) -> Templates:
    """Defaults overridden per kind by `mapping` (e.g. a config dict of lists)."""
    return cls(**{k: tuple(v) for k, v in (mapping or {}).items()})


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  q_threshold: float = 0.8  # positive reflection after an intermediate step with Q >= this
  min_visits: int = 0  # ... and whose Q rests on >= this many samples (`q_samples`; 0: `rollouts`)
  rollouts: int = 16  # M of the search that built the tree: the samples behind a non-terminal's own R
  max_positive_per_segment: int = 1  # at most this many per forward segment (0: only after the final answer)
  positive_final: bool = True  # positive reflection after the final answer
  quote_words: int = 12  # longest quote of the target step in a backtrack sentence
  seed: int = 0
  templates: Templates = Templates()

  def __post_init__(self):
    if self.min_visits < 0 or self.rollouts < 1:
      raise ValueError(f"need min_visits >= 0 and rollouts >= 1, got {self.min_visits}, {self.rollouts}")

  @property
  def samples_needed(self) -> int:
    return self.min_visits or self.rollouts


@dataclasses.dataclass(frozen=True)
class Rendered:
  text: str
  k: int
  n_backtracks: int  # prompts.count_backtracks(text), always == k
  n_positive: int  # positive reflection paragraphs (intermediate + final)


# ----------------------------------------------------------------------------------------------------------------
# Text surgery: boxes, backtrack phrases, quotes
# ----------------------------------------------------------------------------------------------------------------

_GERUND = {"go": "going", "restart": "restarting", "start": "starting", "backtrack": "backtracking",
           "revisit": "revisiting"}
_LET = re.compile(r"let(?:['\u2019]s|\s+us|\s+me)\s+", re.IGNORECASE)


def _box_spans(text: str) -> list[tuple[int, int, str]]:
  """(start, end, content) of each closed top-level `\\boxed{...}` / `\\fbox{...}`."""
  spans, pos = [], 0
  while m := _BOX.search(text, pos):
    brace = m.end()
    while brace < len(text) and text[brace] in " \t":
      brace += 1
    if brace >= len(text) or text[brace] != "{":
      pos = m.end()
      continue
    depth, i = 0, brace
    while i < len(text):
      if text[i] == "\\":
        i += 2
        continue
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      if depth == 0:
        break
      i += 1
    if i >= len(text):  # unclosed: drop the command, keep the rest
      spans.append((m.start(), brace + 1, text[brace + 1:]))
      break
    spans.append((m.start(), i + 1, text[brace + 1:i]))
    pos = i + 1
  return spans


def unbox(text: str) -> str:
  """Every box replaced by its content; a bare `\\boxed 5` loses its command."""
  out, pos = [], 0
  for start, end, content in _box_spans(text):
    out += [text[pos:start], content]
    pos = end
  return _BOX.sub("", "".join(out) + text[pos:])


def final_answer_step(text: str, answer: str) -> str:
  """A terminal step stating `answer` in its one box (the last box, earlier ones unwrapped; appended if none)."""
  spans = _box_spans(text)
  if not spans:
    return f"{unbox(text).rstrip()} The final answer is $\\boxed{{{answer}}}$.".lstrip()
  start, end, _ = spans[-1]
  return unbox(text[:start]) + f"\\boxed{{{answer}}}" + unbox(text[end:])


def defuse_backtracks(text: str) -> str:
  """Backtrack phrases ("Let's go back", "let us restart", ...) rewritten as gerunds, so they count as none."""
  while m := prompts._BACKTRACK_RE.search(text):  # the counter's own regex: what it counts is what goes
    phrase = m.group()
    rest = phrase[_LET.match(phrase).end():]
    verb, tail = re.match(r"(\w+)(.*)", rest, re.DOTALL).groups()
    gerund = _GERUND[verb.lower()]
    text = text[:m.start()] + (gerund.capitalize() if phrase[0].isupper() else gerund) + tail + text[m.end():]
  return text


def _outside_math(text: str) -> list[bool]:
  """Per character: is it outside `$...$` math?"""
  flags, inside, i = [], False, 0
  while i < len(text):
    if text[i] == "\\" and i + 1 < len(text):
      flags += [not inside, not inside]
      i += 2
      continue
    if text[i] == "$":
      inside = not inside
      flags.append(False)
    else:
      flags.append(not inside)
    i += 1
  return flags


def step_gist(text: str, max_words: int = 12) -> str:
  """The first clause of a step, for quoting: its first sentence, shortened outside math to <= max_words words."""
  text = defuse_backtracks(unbox(re.sub(r"\s+", " ", text).strip())).replace('"', "'")
  outside = _outside_math(text)
  end = next((i + 1 for i, c in enumerate(text)
              if c in ".!?" and outside[i] and (i + 1 == len(text) or text[i + 1] == " ")), len(text))
  gist = text[:end]
  if len(gist.split()) > max_words:
    breaks = [i for i, c in enumerate(gist) if c in ",;:" and outside[i] and 3 <= len(gist[:i].split()) <= max_words]
    if breaks:
      gist = gist[:breaks[0]]
    else:
      cut = [m.start() for m in re.finditer(r" ", gist) if outside[m.start()]]
      fits = [i for i in cut if len(gist[:i].split()) <= max_words]
      gist = (gist[:fits[-1]] if fits else gist).rstrip(".,;:!? ") + "..."
  gist = gist.strip() if gist.endswith("...") else gist.strip().rstrip(".,;:!? ")
  return gist if gist.strip(". ") else "the previous step"


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def q_samples(tree: TreeIndex, node: int, rollouts: int) -> int:
  """How many outcomes Q(node) averages: N of each terminal in its subtree (1, or the grafted rollouts that ended
  there) and `rollouts` (M) for each non-terminal's own R (none with grafting: those rollouts are the nodes below)."""
  total, stack = 0, [node]
  while stack:
    n = stack.pop()
    if tree.nodes[n].get("terminal"):
      total += int(tree.nodes[n].get("N") or 1)
    else:
      total += rollouts if tree.nodes[n].get("R") is not None else 0
      stack.extend(tree.children[n])
  return total


def _positive_after(tree: TreeIndex, trace: Trace, config: RenderConfig) -> set[int]:
  """Event indices of intermediate steps that get a positive reflection (the best per forward segment among those
  with Q >= q_threshold resting on >= min_visits samples)."""
  chosen: set[int] = set()
  segment: list[tuple[float, int]] = []
  events = [*trace.events, None]
  for i, event in enumerate(events):
    if isinstance(event, Step):
      nxt = events[i + 1]
      before_terminal = isinstance(nxt, Step) and tree.nodes[nxt.node].get("terminal")
      q = float(tree.nodes[event.node].get("Q") or 0.0)
      if (isinstance(nxt, Step) and not before_terminal and q >= config.q_threshold
          and q_samples(tree, event.node, config.rollouts) >= config.samples_needed):
        segment.append((-q, i))
      continue
    chosen.update(i for _, i in sorted(segment)[:config.max_positive_per_segment])
    segment = []
  return chosen


def render_trace(tree: TreeIndex, trace: Trace, rng: random.Random, config: RenderConfig = RenderConfig(), *,
                 reflect: bool = True, rewrite: Rewrite | None = None) -> Rendered:
  """One chain of thought for `trace`. `reflect=False`: steps only (for direct traces; k must be 0)."""
  if not reflect and trace.k:
    raise ValueError("a trace with backtracks needs its reflections")
  t = config.templates
  positive = _positive_after(tree, trace, config) if reflect else set()
  paragraphs: list[str] = []
  run: list[str] = []  # forward steps not yet defused
  shown: dict[int, str] = {}  # node -> its text as shown
  n_positive = 0

  def flush() -> None:
    if run:
      paragraphs.append(defuse_backtracks("\n\n".join(run)))
      run.clear()

  for i, event in enumerate(trace.events):
    if isinstance(event, Step):
      node = tree.nodes[event.node]
      text = tree.text(event.node).strip()
      if rewrite is not None:
        text = rewrite("\n\n".join(paragraphs + run), text).strip()
      text = final_answer_step(text, str(node["answer"]).strip()) if node.get("terminal") else unbox(text)
      shown[event.node] = text
      run.append(text)
      if i in positive:
        flush()
        paragraphs.append(f"{rng.choice(t.reflection)} {rng.choice(t.positive)}")
        n_positive += 1
    else:
      assert isinstance(event, Backtrack)
      flush()
      if event.restart:
        jump = rng.choice(t.restart)
      else:
        jump = rng.choice(t.backtrack).replace("{step}", step_gist(shown[event.to], config.quote_words))
      paragraphs.append(f"{rng.choice(t.reflection)} {rng.choice(t.negative)} {jump}")
  flush()
  if reflect and config.positive_final:
    paragraphs.append(f"{rng.choice(t.reflection)} {rng.choice(t.positive)}")
    n_positive += 1
  text = "\n\n".join(paragraphs)
  n_backtracks = prompts.count_backtracks(text)
  if n_backtracks != trace.k or len(_box_spans(text)) != trace.k + 1:
    raise AssertionError(f"tree {tree.id!r}: rendered {n_backtracks} backtracks and {len(_box_spans(text))} boxes "
                         f"for k={trace.k}")
  return Rendered(text=text, k=trace.k, n_backtracks=n_backtracks, n_positive=n_positive)


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------


def default_user_prompt(problem: str) -> str:
  return prompts.math_messages(problem)[-1]["content"]


def _row(tree: TreeIndex, trace: Trace, rendered: Rendered, row_id: str, kind: str,
         user_prompt: Callable[[str], str]) -> dict[str, Any]:
  return {"id": row_id,
          "messages": [{"role": "user", "content": user_prompt(tree.problem)},
                       {"role": "assistant", "content": rendered.text}],
          "k": trace.k, "n_backtracks": rendered.n_backtracks, "tree_id": tree.id, "kind": kind,
          "events": trace.to_json()}


def tree_rows(record: Mapping[str, Any], lin_config: linearize.LinearizeConfig = linearize.LinearizeConfig(),
              render_config: RenderConfig = RenderConfig(), *, equal: linearize.Equal = verifier.answers_equal,
              self_eval: linearize.SelfEval | None = None, rewrite: Rewrite | None = None,
              user_prompt: Callable[[str], str] = default_user_prompt) -> tuple[list[dict], list[dict]]:
  """(sft rows, direct rows) of one tree record; both empty for a tree without a passing correct terminal.

  sft ids are f"{tree_id}/sft-{i}", direct ids f"{tree_id}/direct-{i}" (unique across both files); kind is
  "direct" for k=0 and "search" otherwise. `events` lists the node sequence (for the viewer).
  """
  lin = linearize.linearize_tree(record, lin_config, equal=equal, self_eval=self_eval)
  tree, sft, direct = lin.tree, [], []
  for i, trace in enumerate(lin.search):
    rng = linearize.derived_rng(render_config.seed, tree.id, "render", "sft", i)
    rendered = render_trace(tree, trace, rng, render_config, rewrite=rewrite)
    sft.append(_row(tree, trace, rendered, f"{tree.id}/sft-{i}", "search" if trace.k else "direct", user_prompt))
  for i, trace in enumerate(lin.direct):
    rng = linearize.derived_rng(render_config.seed, tree.id, "render", "direct", i)
    rendered = render_trace(tree, trace, rng, render_config, reflect=False, rewrite=rewrite)
    direct.append(_row(tree, trace, rendered, f"{tree.id}/direct-{i}", "direct", user_prompt))
  return sft, direct


def dataset_rows(records: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[list[dict], list[dict]]:
  """`tree_rows` over many trees (each tree's rows depend only on that tree and the seeds)."""
  sft, direct = [], []
  for record in records:
    s, d = tree_rows(record, **kwargs)
    sft += s
    direct += d
  return sft, direct
