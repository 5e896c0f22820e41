r"""Linearization of a search tree into node sequences that fail, backtrack and recover (paper Algorithm 1).

Input is one `trees.jsonl` record `{"id", "problem", "answer", "nodes": [...]}` (the node whose parent is null
is the root; see the `mcts` stage). Per tree:

  Ψ, Λ ← DFS(root)                   correct / wrong terminals (DFS does not descend below a terminal)
  Ψ'   ← self_eval(Ψ)                 the self-evaluation filter (an optional hook; off when None)
  for each trace i of the mix `ks`:   n* ~ Ψ', k wrong terminals with pairwise distinct answers ~ Λ
    merge the root paths, L <- L + (path(n) - L): each wrong branch is followed to its wrong final answer, then the
    trace returns to the deepest node of the next path that it has already narrated (a restart when that is the
    root) and goes on with the rest of that path; it ends at n*. No step is narrated twice: the target is the lowest
    common ancestor (LCA) of the failed terminal and the next path only when no earlier branch shares more of it.

The result is explicit: a `Trace` is a tuple of `Step(node)` and `Backtrack(failed, to, restart)` events, so the
renderer never re-infers where a jump goes.

Choices where the paper is silent (config keys in `LinearizeConfig` and `make_self_eval`):
* Answers are "distinct" by the verifier's equivalence (an injected `equal(a, b)`, `verifier.answers_equal` by
  default), tried in both directions because Math-Verify is asymmetric; answers are grouped by union-find over all
  pairs, so any two sampled wrong answers are non-equivalent even where `equal` is not transitive. A wrong terminal
  whose answer is equivalent to the gold (a verifier timeout or an asymmetric check) is never narrated as wrong.
* Wrong terminals without a final answer (cut by the depth limit or EOS) count in Q but are not narrated.
* Wrong terminals are drawn uniformly over terminals (so frequent, plausible mistakes are drawn more often), skipping
  any whose answer class is already used, and then visited in DFS order (children by node id): the trace explores
  the tree the way a depth-first search meets the failed branches, before the correct one.
* The mix `ks` defaults to (0, 1, 1, 2): one direct trace and three search traces, with k in {1, 2} split as in the
  paper's secondary source (FIX). k is clipped to the number of distinct wrong answers; a search trace whose k clips
  to 0 is dropped (a search trace has at least one backtrack). Identical traces are deduplicated: a trace is redrawn
  up to `attempts` times before it is dropped.
* The correct terminal is drawn per trace (Algorithm 1 samples n* each time), uniformly over Ψ'.
* Every draw uses a `random.Random` seeded from (seed, tree id, purpose, trace index, attempt) through SHA-256, never
  from positions in a file, so results do not depend on the order in which trees are processed.
* Self-evaluation: N votes by the policy (`n_votes`, 8 as the paper's Appendix A.1 per FIX), kept when unanimous by
  default (`rule="majority"`: more than half); an unparseable vote counts as "no" (fail closed). The prompt is a GAP
  in the paper; `SELF_EVAL_PROMPT` is ours. Trees where no correct terminal passes yield no traces.
* Count-matched Direct-SFT (`direct_traces`): per tree, as many k=0 traces as that tree's search-set rows, over its
  distinct correct paths (distinct step texts) in a seeded order, repeated when there are fewer paths than rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Any, Callable, Mapping, Sequence

from astro_jax import verifier

Equal = Callable[[str, str], bool]
SelfEval = Callable[[str, list[list[str]]], list[bool]]  # (problem, root-path step texts per solution) -> keep?
Vote = Callable[[list[str], int], list[list[str]]]  # (prompts, n) -> n vote texts per prompt

SELF_EVAL_PROMPT = (
    "Below is a math problem and a step-by-step solution. Judge the solution itself, not only its final answer: is "
    "every step correct, and does the reasoning actually lead to the final answer (not a lucky guess)?\n\n"
    "Problem:\n{problem}\n\nSolution:\n{solution}\n\n"
    "Think briefly, then end with exactly one line: \"Verdict: Yes\" or \"Verdict: No\".")


@dataclasses.dataclass(frozen=True)
class LinearizeConfig:
  seed: int = 0
  ks: tuple[int, ...] = (0, 1, 1, 2)  # one direct trace and three search traces per solved tree
  attempts: int = 4  # draws per trace before a duplicate of an earlier trace is dropped

  def __post_init__(self):
    if not self.ks or any(k < 0 for k in self.ks) or self.attempts < 1:
      raise ValueError(f"need non-empty ks >= 0 and attempts >= 1, got ks={self.ks}, attempts={self.attempts}")


# ----------------------------------------------------------------------------------------------------------------
# Tree records
# ----------------------------------------------------------------------------------------------------------------


class TreeIndex:
  """Read-only view of one tree record: nodes by id, children in id order, root paths."""

  def __init__(self, record: Mapping[str, Any]):
    self.id, self.problem, self.answer = str(record["id"]), str(record["problem"]), str(record["answer"])
    self.nodes: dict[int, Mapping[str, Any]] = {int(n["id"]): n for n in record["nodes"]}
    roots = [i for i, n in self.nodes.items() if n.get("parent") is None]
    if len(roots) != 1:
      raise ValueError(f"tree {self.id!r}: need exactly one root (parent null), found {len(roots)}")
    self.root = roots[0]
    self.children: dict[int, list[int]] = {i: [] for i in self.nodes}
    for i in sorted(self.nodes):
      if i != self.root:
        parent = int(self.nodes[i]["parent"])
        if parent not in self.nodes:
          raise ValueError(f"tree {self.id!r}: node {i} has unknown parent {parent}")
        self.children[parent].append(i)

  def parent(self, node: int) -> int | None:
    p = self.nodes[node].get("parent")
    return None if p is None else int(p)

  def text(self, node: int) -> str:
    return str(self.nodes[node].get("text") or "")

  def path(self, node: int) -> list[int]:
    """Node ids from the root to `node`, both included."""
    out = [node]
    while (p := self.parent(out[-1])) is not None:
      out.append(p)
      if len(out) > len(self.nodes):
        raise ValueError(f"tree {self.id!r}: parent links form a cycle at node {node}")
    return out[::-1]

  def path_texts(self, node: int) -> list[str]:
    """The step texts from the root's first child down to `node`."""
    return [self.text(i) for i in self.path(node)[1:]]

  def terminals(self) -> list[int]:
    """Terminal nodes in DFS preorder (children by id); the search does not descend below a terminal."""
    out, stack = [], [self.root]
    while stack:
      node = stack.pop()
      if node != self.root and self.nodes[node].get("terminal"):
        out.append(node)
      else:
        stack.extend(reversed(self.children[node]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Events and traces
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
  node: int  # a forward step: the child of the previous step (or of the backtrack target)


@dataclasses.dataclass(frozen=True)
class Backtrack:
  failed: int  # the wrong terminal just narrated
  to: int  # the ancestor the trace returns to: the next step is its child
  restart: bool  # `to` is the root: start over


Event = Step | Backtrack


@dataclasses.dataclass(frozen=True)
class Trace:
  """One node sequence: k wrong branches, each followed by a backtrack, then the path to the correct terminal."""
  correct: int
  wrong: tuple[int, ...]
  events: tuple[Event, ...]

  @property
  def k(self) -> int:
    return len(self.wrong)

  def to_json(self) -> list[list[Any]]:
    """[["step", node], ["backtrack", to], ...]: compact, for rows and the viewer."""
    return [["step", e.node] if isinstance(e, Step) else ["backtrack", e.to] for e in self.events]


def merge_paths(tree: TreeIndex, wrong: Sequence[int], correct: int) -> Trace:
  """Algorithm 1's merge L <- L + (path(n) - L): each terminal's root path minus the nodes already narrated, entered
  by a backtrack to the deepest node of that path that is already in L (the root: a restart). No node is narrated
  twice; the target is the LCA with the previous terminal only when no earlier branch went deeper along the path."""
  events: list[Event] = []
  narrated, failed = {tree.root}, None
  for terminal in [*wrong, correct]:
    path = tree.path(terminal)
    shared = 1  # the narrated nodes of a root path are a prefix of it: L is closed under taking parents
    while shared < len(path) and path[shared] in narrated:
      shared += 1
    if shared == len(path) or failed in path:
      raise ValueError(f"tree {tree.id!r}: terminal {terminal} lies on one root path with an earlier terminal")
    if failed is not None:
      events.append(Backtrack(failed=failed, to=path[shared - 1], restart=shared == 1))
    events.extend(Step(n) for n in path[shared:])
    narrated.update(path[shared:])
    failed = terminal
  return Trace(correct=correct, wrong=tuple(wrong), events=tuple(events))


# ----------------------------------------------------------------------------------------------------------------
# Seeded draws, answer classes, self-evaluation
# ----------------------------------------------------------------------------------------------------------------


def derived_rng(seed: int, *identity: Any) -> random.Random:
  """A `random.Random` that depends only on `seed` and the stable `identity` (tree id, purpose, index, ...)."""
  key = "\x1f".join(map(str, (seed, *identity))).encode()
  return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def _same(equal: Equal, a: str, b: str) -> bool:
  return a == b or equal(a, b) or equal(b, a)


def wrong_answer_classes(tree: TreeIndex, equal: Equal = verifier.answers_equal) -> list[list[int]]:
  """Wrong terminals with a final answer, grouped by equivalent answers (classes and members in DFS order).

  Terminals whose answer is equivalent to the gold are left out.
  """
  by_answer: dict[str, list[int]] = {}
  for node in tree.terminals():
    n = tree.nodes[node]
    answer = str(n.get("answer") or "").strip()
    if n.get("correct") is False and answer:
      by_answer.setdefault(answer, []).append(node)
  answers = [a for a in by_answer if not _same(equal, a, tree.answer.strip())]
  group = list(range(len(answers)))  # union-find over all pairs: classes are closed even if `equal` is not transitive

  def find(i: int) -> int:
    while group[i] != i:
      group[i] = group[group[i]]
      i = group[i]
    return i

  for i in range(len(answers)):
    for j in range(i):
      if find(i) != find(j) and _same(equal, answers[i], answers[j]):
        group[find(i)] = find(j)
  classes: dict[int, list[int]] = {}
  for i, answer in enumerate(answers):
    classes.setdefault(find(i), []).extend(by_answer[answer])
  order = {node: i for i, node in enumerate(tree.terminals())}
  return [sorted(c, key=order.__getitem__) for c in classes.values()]


def sample_wrong(rng: random.Random, classes: Sequence[Sequence[int]], k: int, order: Mapping[int, int]) -> list[int]:
  """k wrong terminals from k different answer classes, drawn uniformly over terminals, returned in DFS order."""
  cls = {node: i for i, c in enumerate(classes) for node in c}
  picked, used = [], set()
  for node in rng.sample(sorted(cls), len(cls)):
    if len(picked) == k:
      break
    if cls[node] not in used:
      picked.append(node)
      used.add(cls[node])
  return sorted(picked, key=order.__getitem__)


def parse_vote(text: str) -> bool | None:
  """A self-evaluation vote: the last "Verdict: Yes/No", else a leading yes/no; None when neither is there."""
  verdicts = re.findall(r"verdict\W*(yes|no)\b", text, re.IGNORECASE)
  if verdicts:
    return verdicts[-1].lower() == "yes"
  lead = re.match(r"\W*(yes|no)\b", text, re.IGNORECASE)
  return None if lead is None else lead.group(1).lower() == "yes"


def vote_verdict(votes: Sequence[str], rule: str = "unanimous") -> bool:
  """Keep a solution? "unanimous": every vote says yes; "majority": more than half do. Unparseable votes say no."""
  if rule not in ("unanimous", "majority"):
    raise ValueError(f"self-evaluation rule must be 'unanimous' or 'majority', got {rule!r}")
  yes = sum(parse_vote(v) is True for v in votes)
  return bool(votes) and (yes == len(votes) if rule == "unanimous" else 2 * yes > len(votes))


def make_self_eval(vote: Vote, n_votes: int = 8, rule: str = "unanimous", prompt: str = SELF_EVAL_PROMPT) -> SelfEval:
  """A `self_eval` hook from a batched voter (e.g. the policy sampling `n_votes` answers per prompt)."""
  vote_verdict([], rule)  # validate the rule now

  def self_eval(problem: str, paths: list[list[str]]) -> list[bool]:
    prompts = [prompt.format(problem=problem.strip(), solution="\n\n".join(s.strip() for s in p)) for p in paths]
    votes = vote(prompts, n_votes) if prompts else []
    if len(votes) != len(prompts):
      raise ValueError(f"voter returned {len(votes)} vote lists for {len(prompts)} prompts")
    return [vote_verdict(v, rule) for v in votes]

  return self_eval


def passing_correct(tree: TreeIndex, self_eval: SelfEval | None = None) -> list[int]:
  """Ψ': correct terminals (DFS order) that pass `self_eval` (all of them when it is None)."""
  correct = [n for n in tree.terminals() if tree.nodes[n].get("correct") is True]
  if self_eval is None or not correct:
    return correct
  keep = self_eval(tree.problem, [tree.path_texts(n) for n in correct])
  if len(keep) != len(correct):
    raise ValueError(f"self_eval returned {len(keep)} verdicts for {len(correct)} solutions")
  return [n for n, ok in zip(correct, keep) if ok]


# ----------------------------------------------------------------------------------------------------------------
# Trace sets
# ----------------------------------------------------------------------------------------------------------------


def search_traces(tree: TreeIndex, correct: Sequence[int], classes: Sequence[Sequence[int]],
                  config: LinearizeConfig = LinearizeConfig()) -> list[Trace]:
  """The mix `config.ks` for one tree (k clipped to the distinct wrong answers; duplicates redrawn, then dropped)."""
  if not correct:
    return []
  order = {node: i for i, node in enumerate(tree.terminals())}
  traces: list[Trace] = []
  seen: set[tuple[Event, ...]] = set()
  for i, k_wanted in enumerate(config.ks):
    k = min(k_wanted, len(classes))
    if k_wanted > 0 and k == 0:
      continue
    for attempt in range(config.attempts):
      rng = derived_rng(config.seed, tree.id, "trace", i, attempt)
      n_star = rng.choice(sorted(correct))
      trace = merge_paths(tree, sample_wrong(rng, classes, k, order), n_star)
      if trace.events not in seen:
        seen.add(trace.events)
        traces.append(trace)
        break
  return traces


def direct_traces(tree: TreeIndex, correct: Sequence[int], n: int, seed: int = 0) -> list[Trace]:
  """n k=0 traces: the distinct correct paths (by step texts) in a seeded order, repeated as needed."""
  if not correct or n <= 0:
    return []
  distinct: dict[tuple[str, ...], int] = {}
  for node in sorted(correct):
    distinct.setdefault(tuple(t.strip() for t in tree.path_texts(node)), node)
  nodes = derived_rng(seed, tree.id, "direct").sample(list(distinct.values()), len(distinct))
  return [merge_paths(tree, [], nodes[i % len(nodes)]) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Linearized:
  tree: TreeIndex
  search: list[Trace]  # the ASTRO mix (k=0 direct trace included), one row each in sft.jsonl
  direct: list[Trace]  # count-matched k=0 traces for direct.jsonl


def linearize_tree(record: Mapping[str, Any], config: LinearizeConfig = LinearizeConfig(), *,
                   equal: Equal = verifier.answers_equal, self_eval: SelfEval | None = None) -> Linearized:
  """Algorithm 1 over one tree record: the search traces and the count-matched direct traces (both empty when the
  tree has no correct terminal that passes self-evaluation)."""
  tree = TreeIndex(record)
  correct = passing_correct(tree, self_eval)
  if not correct:
    return Linearized(tree, [], [])
  search = search_traces(tree, correct, wrong_answer_classes(tree, equal), config)
  return Linearized(tree, search, direct_traces(tree, correct, len(search), config.seed))
