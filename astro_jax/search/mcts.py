r"""Batched step-level MCTS (ASTRO §2.2) on the host; the model only samples, behind a `Policy`.

One tree per problem (`tree.Tree`); a node's state is the problem plus the steps on its root path.

  selection   from the root, descend through expanded nodes by PUCT
                score(c) = Q(c) + c_puct * P(c) * sqrt(N(s)) / (1 + N(c))
              to the first node that has not been expanded yet. Exact ties are broken by an RNG keyed on
              (seed, problem id, the tree's iteration index). Closed nodes are skipped (below).
  expansion   the policy proposes k next steps, deduplicated by `normalize_step` (first occurrence wins, also
              against existing children; empty non-terminal steps are dropped). A child is terminal when its step
              has a final answer, ended with EOS, was cut by the step token budget (`length_terminal`), or is at
              depth `max_depth`. Its prior P: softmax over the siblings of the length-normalised step log-prob
              (log-prob sum / tokens), or uniform (`prior`).
  evaluation  every new non-terminal child gets M = `rollouts` continuations to a terminal; R = their mean reward
              (1 when the judge accepts a rollout's answer, 0 when it rejects it or there is none). A new terminal
              child is scored directly: R = its own reward, `correct` = the verdict.
  backup      paper Eq. 3-4 along the selected node's root path, bottom-up: N(s) += 1 and
                Q(s) = (sum_c Q(c) * N(c) + R(s)) / (sum_c N(c) + 1)
              over the children c of s: a visit-weighted mean of the children's values with s's own rollout value
              as one more visit. The root has no rollouts: Q(root) = sum_c Q(c) N(c) / sum_c N(c).

N and Q of a new node (the paper only gives the update): N = 1 and Q = R, i.e. the formula with no children: its
creation is its first visit, the one its rollouts evaluated. N of a node is then 1 + the number of iterations whose
selected node lay in its subtree; the root starts at N = 0, so N(root) = iterations done. Q is a pure function of
the subtree, so the update is exact whatever order iterations come in.

Terminal and exhausted nodes: a node is closed when it is terminal, or expanded with every child closed (an
expansion whose proposals were all empty or duplicates leaves it childless, hence closed). Selection never enters a
closed node, so every iteration expands a new node and samples something new; a tree whose root is closed is done
(exhausted). Re-selecting a terminal and backing its reward up again, as game-playing MCTS does, would spend
iterations on no new samples: here the search makes training data, and a terminal's value is already exact.

Grafting (`graft_rollouts`, default False; a GAP in the paper): with it, each rollout's steps (its text split at the
delimiter) are added under the child as nodes, merged by normalised text (token ids not kept). Every rollout ends at
a terminal node: its last step, with the rollout's answer and verdict (an empty step for a rollout without text, or
for one that ends on a step another rollout went past); one that reaches a terminal already there (the depth limit,
or a step another rollout ended on) stops at it and takes its verdict. Backup with grafting: each rollout counts
ONCE. A grafted node's N is the number of rollouts through it; a grafted terminal's R is its verdict; a non-terminal
has no R of its own, neither a grafted step nor the child whose rollouts they are (R = null: its rollouts are the
grafted nodes below it), so its Q is Eq. 4 without the R term, as at the root: Q = sum_c Q(c) N(c) / sum_c N(c).
The child's Q is then the mean reward of its M rollouts (what R gives it without grafting; only a rollout merged
into a terminal with another verdict counts that terminal's), where adding R as well would count every rollout
twice; its N stays 1 (one visit, evaluated by M rollouts), so its parent weighs it as without grafting. Later
iterations add visits as usual (a grafted node's N = rollouts through it + iterations through it). Off by default
because the paper's expansion adds "a node n_{t+1} for each S_{t+1}" -- the k children -- and uses rollouts only
to estimate R (as do the secondary sources); grafting makes trees about M times larger, with chains whose values
rest on few samples (one, on a step only one rollout took), that selection then walks and the linearizer would
narrate (the renderer's positive reflections need `min_visits` samples). It is there for small models where a
tree's correct terminals are few: rollouts that found the answer then stay in the tree.

Batching: `BatchedSearch.step_round` advances every active tree by up to `leaves_per_tree` iterations (several
leaves per tree use a virtual loss: each selection adds one loss-valued visit to its path, and a selected leaf is
not selected again in that round). A round makes ONE `policy.propose` call with the expansions of all trees and ONE
`policy.rollout` call with the rollouts of all their new children, so calls per round do not depend on the number
of problems. The judge is called at most twice per round: the new terminal children are submitted to a thread
(`overlap_judge`) while the rollouts sample, then the rollouts' answers. (Overlap across rounds is left: the next
round's selection needs this round's values.) `RoundStats` records calls, requests, rows, tokens and seconds.

Seeding contract (resume and batch independence). A finished tree must depend only on (config, problem), never on
which problems shared its batch or where a run resumed. The search's own randomness comes from keys of stable
identities; each request carries `seed` (the run seed) and `key` = [kind, problem id, iteration, node], where
iteration is the TREE'S OWN iteration index, not the batch round, and node ids are assigned in the tree's own
order. The policy must draw each request's samples from (seed, key, sample index) alone -- never from the
request's position in a call -- e.g. `sampler.Request(prefix, SamplingParams(seed=r.seed, ...), key=r.key)`.
`tree` (the problem's position in this search) is for bookkeeping only. Finished trees are reported as soon as
they finish, so a stage can append and fsync each record and skip finished problems when it resumes.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import threading
import time
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from astro_jax.search.tree import STEP_DELIMITER, Tree, normalize_step

FINISH_REASONS = ("stop", "eos", "length")
PRIORS = ("policy", "uniform")
Judge = Callable[[Sequence[tuple[str, str]]], list[bool]]


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """MCTS settings (defaults: the paper's secondary sources, see astro_paper.md §3.2; c_puct is a GAP)."""
  k: int = 8                     # proposals per expansion
  rollouts: int = 16             # M: rollouts per new non-terminal child
  iterations: int = 32           # expansions per tree
  max_depth: int = 50            # steps; a child at this depth is terminal
  c_puct: float = 1.0
  prior: str = "policy"          # "policy" (softmax of length-normalised step log-probs) | "uniform"
  leaves_per_tree: int = 1       # > 1: several expansions per tree per round, with a virtual loss
  graft_rollouts: bool = False   # add rollout paths to the tree as nodes (see the module docstring)
  length_terminal: bool = True   # a step cut by its token budget ends the branch (no answer: reward 0)
  stop_after_correct: int = 0    # finish a tree once it has this many correct terminals (0: never)
  step_delimiter: str = STEP_DELIMITER
  seed: int = 0                  # the run seed: passed on every request
  # Sampling settings: carried on the requests for the policy; the search itself does not read them.
  temperature: float = 1.0
  top_p: float = 1.0
  step_max_tokens: int = 256
  rollout_max_tokens: int = 1024

  def __post_init__(self):
    problems = search_config_problems(self)
    if problems:
      raise ValueError("invalid search settings: " + "; ".join(f"{k} {why}" for k, why in problems.items()))


def search_config_problems(cfg: Any) -> dict[str, str]:
  """{field: what is wrong} for search settings (a SearchConfig or anything with its fields, e.g. a config)."""
  checks = {"k": (cfg.k >= 1, "must be >= 1"), "rollouts": (cfg.rollouts >= 1, "must be >= 1"),
            "iterations": (cfg.iterations >= 1, "must be >= 1"), "max_depth": (cfg.max_depth >= 1, "must be >= 1"),
            "c_puct": (cfg.c_puct >= 0, "must be >= 0"), "prior": (cfg.prior in PRIORS, f"must be one of {PRIORS}"),
            "leaves_per_tree": (cfg.leaves_per_tree >= 1, "must be >= 1"),
            "stop_after_correct": (cfg.stop_after_correct >= 0, "must be >= 0 (0 = off)"),
            "step_delimiter": (bool(cfg.step_delimiter), "must be non-empty"),
            "seed": (0 <= cfg.seed < 2**32, "must be in [0, 2**32)"),
            "temperature": (cfg.temperature >= 0, "must be >= 0"), "top_p": (0 < cfg.top_p <= 1, "must be in (0, 1]"),
            "step_max_tokens": (cfg.step_max_tokens >= 1, "must be >= 1"),
            "rollout_max_tokens": (cfg.rollout_max_tokens >= 1, "must be >= 1")}
  return {name: f"= {getattr(cfg, name)!r}: {why}" for name, (ok, why) in checks.items() if not ok}


# --- The policy interface --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeRequest:
  """What the policy is asked about one node: the state (problem + steps so far) and how to sample."""
  KIND: ClassVar[str] = ""
  tree: int                              # the problem's position in this search: bookkeeping, never randomness
  problem_id: Any
  problem: str
  node: int
  iteration: int                         # the tree's own iteration index (not the batch round)
  depth: int                             # of `node`; its steps are `steps`
  steps: tuple[str, ...]                 # step texts on the root path of `node` (root excluded)
  step_tokens: tuple[tuple[int, ...], ...]
  n: int
  seed: int
  temperature: float
  top_p: float
  max_tokens: int

  @property
  def key(self) -> list:
    """The stable identity that, with `seed`, must be the only source of this request's randomness."""
    return [self.KIND, self.problem_id, self.iteration, self.node]


@dataclasses.dataclass(frozen=True)
class ExpandRequest(NodeRequest):
  """Propose n next steps of `node` (each ends at the first `stop` string, EOS or `max_tokens`)."""
  KIND: ClassVar[str] = "expand"
  stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RolloutRequest(NodeRequest):
  """Continue `node` n times to a terminal (final answer, EOS or `max_tokens`; at most `max_steps` more steps)."""
  KIND: ClassVar[str] = "rollout"
  max_steps: int = 1


class Step(NamedTuple):
  """One proposed step: its text (without the delimiter), sampled token ids, summed log-prob, how it ended
  ("stop" at the delimiter, "eos", "length" = token budget) and its final answer (None: the step has none)."""
  text: str
  tokens: Sequence[int]
  logprob: float
  finish_reason: str
  answer: str | None


class Rollout(NamedTuple):
  """One continuation to a terminal: text (steps joined by the delimiter), token ids, final answer or None, and
  whether it ended with EOS."""
  text: str
  tokens: Sequence[int]
  answer: str | None
  eos: bool


class Policy(Protocol):
  """What the search needs from the model; one call serves many trees. Outer lists follow the requests."""

  def propose(self, requests: Sequence[ExpandRequest]) -> list[list[Step]]: ...

  def rollout(self, requests: Sequence[RolloutRequest]) -> list[list[Rollout]]: ...


# --- Judging ---------------------------------------------------------------------------------------------------


class MemoJudge:
  """A judge memoised on (answer, gold): each distinct pair is judged once, in one call per batch of new pairs.
  Thread-safe (calls are serialised)."""

  def __init__(self, judge: Judge):
    self._judge = judge
    self._lock = threading.Lock()
    self.cache: dict[tuple[str, str], bool] = {}
    self.calls = 0   # calls of the wrapped judge
    self.pairs = 0   # pairs it judged

  def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
    pairs = [(str(a), str(g)) for a, g in pairs]
    with self._lock:
      todo = list(dict.fromkeys(p for p in pairs if p not in self.cache))
      if todo:
        verdicts = list(self._judge(todo))
        if len(verdicts) != len(todo):
          raise ValueError(f"judge returned {len(verdicts)} verdicts for {len(todo)} pairs")
        self.cache.update(zip(todo, map(bool, verdicts)))
        self.calls += 1
        self.pairs += len(todo)
      return [self.cache[p] for p in pairs]


def pool_judge(pool: Any) -> Judge:
  """A judge on a long-lived `verifier.VerifierPool` (a timed-out check counts as wrong). Answers written exactly
  as the gold need no worker."""
  def judge(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    verdicts = [a.strip() == g.strip() for a, g in pairs]
    todo = [i for i, ok in enumerate(verdicts) if not ok]
    for i, (equal, _) in zip(todo, pool.compare([pairs[i] for i in todo]) if todo else []):
      verdicts[i] = equal
    return verdicts
  return judge


# --- Pure pieces -----------------------------------------------------------------------------------------------


def stable_seed(*parts: Any) -> int:
  """A seed in [0, 2**32) from JSON-able identities (hash-salting free: the same in every process and run)."""
  blob = json.dumps(parts, separators=(",", ":")).encode()
  return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") & 0xFFFFFFFF


def puct_scores(Q_C: np.ndarray, N_C: np.ndarray, P_C: np.ndarray, n_parent: float, c_puct: float) -> np.ndarray:
  """Q + c_puct * P * sqrt(N(parent)) / (1 + N(child)) for each child."""
  return np.asarray(Q_C, float) + c_puct * np.asarray(P_C, float) * math.sqrt(n_parent) / (1.0 + np.asarray(N_C))


def sibling_priors(logprobs: Sequence[float | None], mode: str) -> list[float]:
  """Priors of one node's children: uniform, or softmax of their length-normalised log-probs ("policy"; a child
  without one, e.g. a grafted step, gets the mean of the others')."""
  n = len(logprobs)
  known = [lp for lp in logprobs if lp is not None]
  if mode == "uniform" or not known:
    return [1.0 / n for _ in range(n)]
  x_C = np.array([sum(known) / len(known) if lp is None else lp for lp in logprobs], float)
  e_C = np.exp(x_C - x_C.max())
  return [float(p) for p in e_C / e_C.sum()]


def backed_up_q(tree: Tree, node: int) -> float:
  """Eq. 4: (sum_c Q(c) N(c) + R(node)) / (sum_c N(c) + 1); without R (the root; with grafting, every non-terminal)
  the children's visit-weighted mean alone."""
  kids = tree.children[node]
  num, den = sum(tree.Q[c] * tree.N[c] for c in kids), sum(tree.N[c] for c in kids)
  if tree.R[node] is not None:
    num, den = num + tree.R[node], den + 1
  return num / den if den else 0.0


def refresh_closed(tree: Tree) -> None:
  """Recompute `closed` for every node (reverse id order is a post-order)."""
  for i in reversed(range(len(tree))):
    tree.closed[i] = tree.terminal[i] or (tree.expanded[i] and all(tree.closed[c] for c in tree.children[i]))


def select_leaf(tree: Tree, c_puct: float, rng: np.random.Generator, pending: Iterable[int] = (),
                virtual: Mapping[int, int] | None = None) -> int | None:
  """The node to expand next by PUCT, or None when every open node is closed or pending. `virtual`: virtual
  visits per node (each counts as a visit with reward 0); `pending`: leaves already selected this round."""
  pending, virtual = set(pending), virtual or {}

  def blocked(s: int) -> bool:
    return tree.closed[s] or s in pending or (tree.expanded[s] and all(blocked(c) for c in tree.children[s]))

  if blocked(0):
    return None
  node = 0
  while tree.expanded[node]:
    kids = [c for c in tree.children[node] if not blocked(c)]
    N_C = np.array([tree.N[c] for c in kids], float)
    V_C = np.array([virtual.get(c, 0) for c in kids], float)
    Q_C = np.array([tree.Q[c] for c in kids]) * N_C / np.maximum(N_C + V_C, 1.0)
    scores = puct_scores(Q_C, N_C + V_C, [tree.prior[c] for c in kids], tree.N[node] + virtual.get(node, 0), c_puct)
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    node = kids[int(best[0] if len(best) == 1 else best[rng.integers(len(best))])]
  return node


# --- Driver ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TreeResult:
  """One problem's search: its live state while searching, its result once finished."""
  index: int                 # position in this search (bookkeeping)
  problem_id: Any
  problem: str
  answer: str                # gold
  tree: Tree
  iterations: int = 0        # expansions done
  rounds: int = 0
  tokens_sampled: int = 0    # proposal + rollout tokens, duplicates included

  def record(self) -> dict:
    return self.tree.to_record(self.problem_id, self.problem, self.answer)


@dataclasses.dataclass
class RoundStats:
  """What one round did; calls / requests / rows (= sum of n) / tokens per policy entry point."""
  round: int
  trees: int = 0             # active trees at the start of the round
  expansions: int = 0
  new_nodes: int = 0
  propose_calls: int = 0
  propose_requests: int = 0
  propose_rows: int = 0
  propose_tokens: int = 0
  rollout_calls: int = 0
  rollout_requests: int = 0
  rollout_rows: int = 0
  rollout_tokens: int = 0
  judge_calls: int = 0       # calls that judged at least one new pair
  judge_pairs: int = 0       # new pairs judged
  policy_s: float = 0.0
  judge_wait_s: float = 0.0  # time spent waiting for verdicts after sampling
  finished: int = 0

  @property
  def policy_calls(self) -> int:
    return self.propose_calls + self.rollout_calls


class BatchedSearch:
  """Trees that advance together, one round at a time; add problems at any time (`add`), call `step_round`."""

  def __init__(self, policy: Policy, judge: Judge, config: SearchConfig, *, overlap_judge: bool = True):
    self.policy, self.config = policy, config
    self.judge = judge if isinstance(judge, MemoJudge) else MemoJudge(judge)
    self.active: list[TreeResult] = []
    self.stats: list[RoundStats] = []
    self.round = 0
    self._added = 0
    self._executor = concurrent.futures.ThreadPoolExecutor(1, "judge") if overlap_judge else None

  def __enter__(self) -> BatchedSearch:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def close(self) -> None:
    if self._executor is not None:
      self._executor.shutdown()

  def add(self, problem: Mapping[str, Any]) -> TreeResult:
    """Start the tree of a problem ({"id", "problem", "answer"})."""
    state = TreeResult(self._added, problem["id"], problem["problem"], str(problem["answer"]), Tree.new())
    self._added += 1
    self.active.append(state)
    return state

  def step_round(self) -> list[TreeResult]:
    """One round over all active trees; returns the trees that finished in it (in the order they were added)."""
    cfg = self.config
    stats = RoundStats(self.round, trees=len(self.active))
    judge_calls, judge_pairs = self.judge.calls, self.judge.pairs
    selected: list[tuple[TreeResult, int, int]] = []  # (tree, leaf, iteration)
    for st in self.active:
      pending: set[int] = set()
      virtual: collections.Counter = collections.Counter()
      for it in range(st.iterations, min(st.iterations + cfg.leaves_per_tree, cfg.iterations)):
        rng = np.random.default_rng(stable_seed(cfg.seed, "select", st.problem_id, it))
        leaf = select_leaf(st.tree, cfg.c_puct, rng, pending, virtual)
        if leaf is None:
          break
        pending.add(leaf)
        virtual.update(st.tree.path(leaf))
        selected.append((st, leaf, it))
    stats.expansions = len(selected)

    # Expansion: one call for every tree's selected leaves.
    requests = [ExpandRequest(**self._request_fields(st, leaf, it), n=cfg.k, max_tokens=cfg.step_max_tokens,
                              stop=(cfg.step_delimiter,)) for st, leaf, it in selected]
    proposals = self._call("propose", self.policy.propose, requests, stats)
    new: list[tuple[TreeResult, int, int]] = []
    for (st, leaf, it), steps in zip(selected, proposals):
      st.tokens_sampled += sum(len(s.tokens) for s in steps)
      new += [(st, c, it) for c in self._expand(st.tree, leaf, steps)]
    stats.new_nodes = len(new)

    # Evaluation: judge new terminals (in a thread, when overlapping) while all new children's rollouts sample.
    terminals = [(st, c) for st, c, _ in new if st.tree.terminal[c]]
    pairs = [(st.tree.answer[c], st.answer) for st, c in terminals if st.tree.answer[c] is not None]
    pending_verdicts = self._executor.submit(self.judge, pairs) if self._executor is not None and pairs else None
    open_new = [(st, c, it) for st, c, it in new if not st.tree.terminal[c]]
    requests = [RolloutRequest(**self._request_fields(st, c, it), n=cfg.rollouts, max_tokens=cfg.rollout_max_tokens,
                               max_steps=cfg.max_depth - st.tree.depth[c]) for st, c, it in open_new]
    rollouts = self._call("rollout", self.policy.rollout, requests, stats)
    t0 = time.perf_counter()
    rollout_pairs = [(r.answer, st.answer) for (st, _, _), rs in zip(open_new, rollouts) for r in rs
                     if r.answer is not None]
    rollout_verdicts = iter(self.judge(rollout_pairs) if rollout_pairs else [])
    if pending_verdicts is not None:
      terminal_verdicts = iter(pending_verdicts.result())
    else:
      terminal_verdicts = iter(self.judge(pairs) if pairs else [])
    stats.judge_wait_s = time.perf_counter() - t0
    for st, c in terminals:
      ok = next(terminal_verdicts) if st.tree.answer[c] is not None else False
      st.tree.correct[c], st.tree.R[c], st.tree.Q[c] = ok, float(ok), float(ok)
    for (st, c, _), rs in zip(open_new, rollouts):
      st.tokens_sampled += sum(len(r.tokens) for r in rs)
      rewards = [float(next(rollout_verdicts)) if r.answer is not None else 0.0 for r in rs]
      st.tree.R[c] = sum(rewards) / len(rewards) if rewards else 0.0
      if cfg.graft_rollouts:  # R(c) becomes null: its rollouts count once, through the grafted nodes
        for g in reversed(self._graft(st.tree, c, rs, rewards)):  # reverse creation order: children first
          st.tree.Q[g] = backed_up_q(st.tree, g)
      st.tree.Q[c] = backed_up_q(st.tree, c)

    # Backup (Eq. 3-4) along each selected leaf's root path.
    for st, leaf, _ in selected:
      for s in reversed(st.tree.path(leaf)):
        st.tree.N[s] += 1
        st.tree.Q[s] = backed_up_q(st.tree, s)
      st.iterations += 1

    finished, still = [], []
    for st in self.active:
      refresh_closed(st.tree)
      st.rounds += 1
      n_correct = sum(bool(x) for x in st.tree.correct)
      done = (st.iterations >= cfg.iterations or st.tree.closed[0]
              or (cfg.stop_after_correct and n_correct >= cfg.stop_after_correct))
      (finished if done else still).append(st)
    self.active = still
    stats.finished = len(finished)
    stats.judge_calls, stats.judge_pairs = self.judge.calls - judge_calls, self.judge.pairs - judge_pairs
    self.stats.append(stats)
    self.round += 1
    return finished

  # -- helpers
  def _request_fields(self, st: TreeResult, node: int, iteration: int) -> dict:
    cfg, tree = self.config, st.tree
    return dict(tree=st.index, problem_id=st.problem_id, problem=st.problem, node=node, iteration=iteration,
                depth=tree.depth[node], steps=tuple(tree.steps(node)),
                step_tokens=tuple(tuple(t) for t in tree.step_tokens(node)), seed=cfg.seed,
                temperature=cfg.temperature, top_p=cfg.top_p)

  def _call(self, kind: str, fn: Callable, requests: list, stats: RoundStats) -> list:
    if not requests:
      return []
    t0 = time.perf_counter()
    outputs = list(fn(requests))
    stats.policy_s += time.perf_counter() - t0
    if len(outputs) != len(requests):
      raise ValueError(f"policy.{kind} returned {len(outputs)} results for {len(requests)} requests")
    setattr(stats, f"{kind}_calls", getattr(stats, f"{kind}_calls") + 1)
    setattr(stats, f"{kind}_requests", getattr(stats, f"{kind}_requests") + len(requests))
    setattr(stats, f"{kind}_rows", getattr(stats, f"{kind}_rows") + sum(r.n for r in requests))
    setattr(stats, f"{kind}_tokens", getattr(stats, f"{kind}_tokens") + sum(len(x.tokens) for o in outputs for x in o))
    return outputs

  def _expand(self, tree: Tree, leaf: int, steps: Sequence[Step]) -> list[int]:
    """Add the deduplicated proposals as children of `leaf`; set its children's priors. Returns the new ids."""
    cfg = self.config
    tree.expanded[leaf] = True
    seen = {normalize_step(tree.text[c]): c for c in tree.children[leaf]}
    new = []
    for step in steps:
      if step.finish_reason not in FINISH_REASONS:
        raise ValueError(f"step finish_reason {step.finish_reason!r} not in {FINISH_REASONS}")
      key, logprob = normalize_step(step.text), step.logprob / max(1, len(step.tokens))
      if key in seen:
        if tree.logprob[seen[key]] is None:
          tree.logprob[seen[key]] = logprob
        continue
      terminal = (step.answer is not None or step.finish_reason == "eos" or tree.depth[leaf] + 1 >= cfg.max_depth
                  or (cfg.length_terminal and step.finish_reason == "length"))
      if not key and not terminal:
        continue
      seen[key] = child = tree.add(leaf, step.text, step.tokens, terminal=terminal, answer=step.answer,
                                   logprob=logprob)
      new.append(child)
    kids = tree.children[leaf]
    for c, p in zip(kids, sibling_priors([tree.logprob[c] for c in kids], cfg.prior)):
      tree.prior[c] = p
    return new

  def _graft(self, tree: Tree, child: int, rollouts: Sequence[Rollout], rewards: Sequence[float]) -> list[int]:
    """Add the rollouts' steps under `child` as nodes (merged by normalised text), each rollout ending at a terminal;
    N of a grafted node = the rollouts through it, R = the verdict of a terminal, null otherwise (as R(child)).
    Returns the new ids in creation order (see the module docstring)."""
    cfg = self.config
    created: list[int] = []
    visits: collections.Counter = collections.Counter()

    def down(node: int, piece: str, last: bool, answer: str | None, reward: float) -> int:
      key = normalize_step(piece)
      match = next((c for c in tree.children[node] if normalize_step(tree.text[c]) == key), None)
      if match is None:
        terminal = last or tree.depth[node] + 1 >= cfg.max_depth
        match = tree.add(node, piece, terminal=terminal, answer=answer if last else None)
        if terminal:
          tree.correct[match] = tree.answer[match] is not None and reward > 0
        created.append(match)
      visits[match] += 1
      return match

    for rollout, reward in zip(rollouts, rewards):
      pieces = [p for p in rollout.text.split(cfg.step_delimiter) if p.strip()] or [""]  # "": an empty rollout
      node = child
      for i, piece in enumerate(pieces):
        node = down(node, piece, i == len(pieces) - 1, rollout.answer, reward)
        if tree.terminal[node]:  # its last step, the depth limit, or a terminal another rollout ended on
          break
      if not tree.terminal[node]:  # it ended on a step another rollout went past: end it with an empty step
        down(node, "", True, rollout.answer, reward)
    tree.R[child] = None
    for g in created:
      tree.N[g] = visits[g]
      tree.R[g] = float(tree.correct[g]) if tree.terminal[g] else None
    for parent in {tree.parent[g] for g in created}:
      kids = tree.children[parent]
      for c, p in zip(kids, sibling_priors([tree.logprob[c] for c in kids], cfg.prior)):
        tree.prior[c] = p
    return created


def search(problems: Iterable[Mapping[str, Any]], policy: Policy, judge: Judge, config: SearchConfig, *,
           on_finish: Callable[[TreeResult], None] | None = None, max_active: int | None = None,
           overlap_judge: bool = True) -> tuple[list[TreeResult], list[RoundStats]]:
  """Search every problem ({"id", "problem", "answer"}); `on_finish` gets each tree as it finishes. With
  `max_active`, at most that many trees advance together and finished ones are replaced from the queue (results
  do not change: trees are independent). Returns the results in input order and the per-round stats."""
  queue = collections.deque(problems)
  results: list[TreeResult] = []
  with BatchedSearch(policy, judge, config, overlap_judge=overlap_judge) as engine:
    while queue or engine.active:
      while queue and (max_active is None or len(engine.active) < max_active):
        engine.add(queue.popleft())
      for result in engine.step_round():
        results.append(result)
        if on_finish is not None:
          on_finish(result)
  return sorted(results, key=lambda r: r.index), engine.stats


# --- Summary ---------------------------------------------------------------------------------------------------


def distinct_answers(answers: Iterable[str], equal: Callable[[str, str], bool] | None = None) -> list[str]:
  """One representative per group of equivalent answers (greedy, first seen represents). Default equivalence:
  equal `normalize_step` strings; pass e.g. `lambda a, b: judge([(a, b)])[0]` for the verifier's."""
  groups: list[str] = []
  for a in answers:
    if equal is None:
      match = any(normalize_step(a) == normalize_step(g) for g in groups)
    else:
      match = any(equal(a, g) for g in groups)
    if not match:
      groups.append(a)
  return groups


def tree_summary(tree: Tree, equal: Callable[[str, str], bool] | None = None) -> dict[str, int]:
  """Counts of one tree: nodes, terminals, correct terminals, distinct wrong final answers (terminals without an
  answer are wrong but have no answer to count)."""
  terminals = tree.terminals()
  wrong = [tree.answer[i] for i in terminals if not tree.correct[i] and tree.answer[i] is not None]
  correct = sum(bool(tree.correct[i]) for i in terminals)
  return {"nodes": len(tree), "terminals": len(terminals), "correct_terminals": correct,
          "distinct_wrong_answers": len(distinct_answers(wrong, equal))}


def summarize(trees: Sequence[Tree], *, tokens_sampled: Sequence[int] | None = None,
              rounds: Sequence[RoundStats] | None = None,
              equal: Callable[[str, str], bool] | None = None) -> dict[str, Any]:
  """Search summary: solved fraction (>= 1 correct terminal), per-tree means, and totals when given."""
  per_tree = [tree_summary(t, equal) for t in trees]
  n = max(1, len(per_tree))
  out: dict[str, Any] = {"problems": len(per_tree), "solved": sum(s["correct_terminals"] > 0 for s in per_tree)}
  out["solved_fraction"] = out["solved"] / n
  for key in ("nodes", "terminals", "correct_terminals", "distinct_wrong_answers"):
    out[f"{key}_per_tree"] = sum(s[key] for s in per_tree) / n
  if tokens_sampled is not None:
    out["tokens_sampled"] = int(sum(tokens_sampled))
  if rounds is not None:
    out["rounds"] = len(rounds)
    out["policy_calls"] = sum(r.policy_calls for r in rounds)
    out["max_policy_calls_per_round"] = max((r.policy_calls for r in rounds), default=0)
    out["policy_s"] = sum(r.policy_s for r in rounds)
  return out
