"""The search tree of one problem: flat host lists indexed by node id, and its `trees.jsonl` record.

Node 0 is the root: the problem itself (empty text, depth 0, no parent). Every other node is one reasoning step;
its state is the problem plus the steps on its root path, joined with the step delimiter (a blank line by default).
Ids are assigned in creation order, so a parent's id is always smaller than its children's and reverse id order is a
post-order (what `mcts` uses to recompute values bottom-up).

On disk (one JSON object per problem, see `to_record`):
  {"id", "problem", "answer", "nodes": [{"id", "parent" (null at the root), "depth", "text", "tokens", "N", "Q",
   "R", "prior", "terminal", "answer", "correct"}, ...]}
with nodes in id order and
  tokens   the step's sampled token ids as the sampler returned them (they include the token that completed the stop
           string); [] at the root and for steps that were not sampled as steps (grafted rollout steps);
  N, Q     visit count and backed-up value (see `astro_jax.search.mcts` for their exact definition);
  R        the node's own value: the mean reward of its rollouts, or the judge's reward of a terminal; null at the
           root, which has no rollouts, and with grafted rollouts at every non-terminal (its rollouts are the grafted
           nodes below it, and count in Q through them);
  prior    the PUCT prior P among its siblings (1.0 at the root);
  answer   the extracted final answer of a terminal step, or null;
  correct  the judge's verdict on a terminal (false when it has no answer), null on non-terminals.
Search-only state (`expanded`, `closed`, `logprob`) is not written; `from_record` rebuilds what it can.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

STEP_DELIMITER = "\n\n"
NODE_FIELDS = ("id", "parent", "depth", "text", "tokens", "N", "Q", "R", "prior", "terminal", "answer", "correct")


def normalize_step(text: str) -> str:
  """The dedupe key of a step (or answer): whitespace runs collapsed to one space, ends stripped, lower case."""
  return " ".join(text.split()).lower()


@dataclasses.dataclass
class Tree:
  """One problem's tree; every list is indexed by node id. Build with `Tree.new()` and `add`."""
  parent: list[int]                 # -1 at the root
  depth: list[int]
  text: list[str]
  tokens: list[list[int]]
  N: list[int]
  Q: list[float]
  R: list[float | None]
  prior: list[float]
  terminal: list[bool]
  answer: list[str | None]
  correct: list[bool | None]
  children: list[list[int]]
  expanded: list[bool]              # the policy was asked for this node's next steps (search state)
  closed: list[bool]                # never selected again: terminal, or expanded and every child closed
  logprob: list[float | None]       # length-normalised step log-prob, for the policy prior (None: not sampled)

  @classmethod
  def new(cls) -> Tree:
    """A tree holding only the root (N = 0: no iteration has gone through it yet)."""
    return cls([-1], [0], [""], [[]], [0], [0.0], [None], [1.0], [False], [None], [None], [[]], [False], [False],
               [None])

  def __len__(self) -> int:
    return len(self.parent)

  def add(self, parent: int, text: str, tokens: Sequence[int] = (), *, terminal: bool = False,
          answer: str | None = None, logprob: float | None = None) -> int:
    """Append a child of `parent` (N = 1, Q = R = 0 until it is scored); returns its id."""
    node = len(self)
    self.parent.append(parent)
    self.depth.append(self.depth[parent] + 1)
    self.text.append(text)
    self.tokens.append([int(t) for t in tokens])
    self.N.append(1)
    self.Q.append(0.0)
    self.R.append(0.0)
    self.prior.append(1.0)
    self.terminal.append(terminal)
    self.answer.append(answer)
    self.correct.append(None)
    self.children.append([])
    self.expanded.append(False)
    self.closed.append(terminal)
    self.logprob.append(logprob)
    self.children[parent].append(node)
    return node

  # -- paths
  def path(self, node: int) -> list[int]:
    """Node ids from the root to `node`, both included."""
    ids = []
    while node >= 0:
      ids.append(node)
      node = self.parent[node]
    return ids[::-1]

  def steps(self, node: int) -> list[str]:
    """Step texts on the root path of `node` (the root's empty text excluded)."""
    return [self.text[i] for i in self.path(node)[1:]]

  def step_tokens(self, node: int) -> list[list[int]]:
    """Token ids of each step on the root path of `node` (root excluded)."""
    return [self.tokens[i] for i in self.path(node)[1:]]

  def prefix(self, node: int, delimiter: str = STEP_DELIMITER) -> str:
    """The solution so far at `node`: its root path's steps joined with the step delimiter."""
    return delimiter.join(self.steps(node))

  def terminals(self) -> list[int]:
    return [i for i in range(len(self)) if self.terminal[i]]

  # -- records
  def to_record(self, problem_id: Any, problem: str, answer: str) -> dict:
    """The `trees.jsonl` record of this tree (see the module docstring)."""
    nodes = [{"id": i, "parent": None if i == 0 else self.parent[i], "depth": self.depth[i], "text": self.text[i],
              "tokens": list(self.tokens[i]), "N": self.N[i], "Q": self.Q[i], "R": self.R[i],
              "prior": self.prior[i], "terminal": self.terminal[i], "answer": self.answer[i],
              "correct": self.correct[i]} for i in range(len(self))]
    return {"id": problem_id, "problem": problem, "answer": answer, "nodes": nodes}

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> Tree:
    """The tree of a `trees.jsonl` record; `to_record` of it gives the record back exactly. Search-only state:
    `expanded` = has children, `closed` recomputed from it, `logprob` unknown (None)."""
    nodes = record["nodes"]
    if not nodes or nodes[0]["parent"] is not None:
      raise ValueError(f"record {record.get('id')!r}: node 0 must be the root (parent null)")
    tree = cls.new()
    tree.N[0], tree.Q[0], tree.R[0], tree.prior[0] = nodes[0]["N"], nodes[0]["Q"], nodes[0]["R"], nodes[0]["prior"]
    tree.text[0], tree.tokens[0], tree.depth[0] = nodes[0]["text"], list(nodes[0]["tokens"]), nodes[0]["depth"]
    tree.terminal[0], tree.answer[0], tree.correct[0] = nodes[0]["terminal"], nodes[0]["answer"], nodes[0]["correct"]
    for i, node in enumerate(nodes):
      if set(node) != set(NODE_FIELDS) or node["id"] != i:
        raise ValueError(f"record {record.get('id')!r}: node {i} must have id {i} and exactly the fields {NODE_FIELDS}")
      if i == 0:
        continue
      if not isinstance(node["parent"], int) or not 0 <= node["parent"] < i:
        raise ValueError(f"record {record.get('id')!r}: node {i} has parent {node['parent']!r}, not an earlier node")
      tree.add(node["parent"], node["text"], node["tokens"], terminal=node["terminal"], answer=node["answer"])
      tree.depth[i], tree.N[i], tree.Q[i], tree.R[i] = node["depth"], node["N"], node["Q"], node["R"]
      tree.prior[i], tree.correct[i] = node["prior"], node["correct"]
    for i in reversed(range(len(tree))):
      tree.expanded[i] = bool(tree.children[i])
      tree.closed[i] = tree.terminal[i] or (tree.expanded[i] and all(tree.closed[c] for c in tree.children[i]))
    return tree
