"""Step-level MCTS on toy environments with scripted policies (no language model)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from astro_jax.search.mcts import (BatchedSearch, MemoJudge, Rollout, SearchConfig, Step, backed_up_q,
                                   distinct_answers, pool_judge, puct_scores, search, select_leaf, sibling_priors,
                                   stable_seed, summarize, tree_summary)
from astro_jax.search.tree import Tree, normalize_step

# --- A puzzle: reach the target from 1 with "+1" / "x2"; a step "answer \boxed{v}" ends with the current value. ---

OPS = {"+1": lambda v: v + 1, "x2": lambda v: 2 * v}
SPELLINGS = {"+1": ("+1", " +1", "+1  "), "x2": ("x2", "X2", "x2\n")}  # all normalise to the same step
STEP_LOGPROB = {"+1": -0.5, "x2": -0.25, "answer": -1.0}                 # per token


def value_of(steps) -> int:
  v = 1
  for s in steps:
    v = OPS[normalize_step(s)](v)
  return v


def exact_judge(calls: list | None = None):
  def judge(pairs):
    if calls is not None:
      calls.append(list(pairs))
    return [a == g for a, g in pairs]
  return judge


class PuzzlePolicy:
  """Proposals and rollouts drawn from (seed, request key) only, as the LM policy must. Rollouts take random
  steps (stopping early with probability 1/4 per step) and then answer."""

  def __init__(self):
    self.calls: list[tuple[str, int]] = []

  def propose(self, requests):
    self.calls.append(("propose", len(requests)))
    out = []
    for r in requests:
      rng, v = np.random.default_rng(stable_seed(r.seed, r.key)), value_of(r.steps)
      steps, actions = [], ["+1", "x2", "answer"]
      rng.shuffle(actions)  # every action once, in a seeded order, then seeded repeats (spelled differently)
      for j in range(r.n):
        action = actions[j] if j < 3 else actions[rng.integers(3)]
        if action == "answer":
          steps.append(Step(f"answer \\boxed{{{v}}}", [5, 6], 2 * STEP_LOGPROB["answer"], "stop", str(v)))
        else:
          text = SPELLINGS[action][rng.integers(3)]
          steps.append(Step(text, [3, 4], 2 * STEP_LOGPROB[action], "stop", None))
      out.append(steps)
    return out

  def rollout(self, requests):
    self.calls.append(("rollout", len(requests)))
    out = []
    for r in requests:
      rows = []
      for j in range(r.n):
        rng, v, texts = np.random.default_rng(stable_seed(r.seed, r.key, j)), value_of(r.steps), []
        for _ in range(r.max_steps - 1):
          if rng.random() < 0.25:
            break
          op = ("+1", "x2")[rng.integers(2)]
          v = OPS[op](v)
          texts.append(op)
        texts.append(f"answer \\boxed{{{v}}}")
        rows.append(Rollout("\n\n".join(texts), [9] * 2 * len(texts), str(v), True))
      out.append(rows)
    return out


def puzzles(n: int) -> list[dict]:
  return [{"id": f"p{i}", "problem": f"reach {6 + i}", "answer": str(6 + i)} for i in range(n)]


def ops_of(tree: Tree, node: int) -> tuple[str, ...]:
  return tuple(normalize_step(s) for s in tree.steps(node)[:-1])


def check_invariants(tree: Tree) -> None:
  """Q of every node is the Eq. 4 value of its subtree; a terminal's R is its verdict and it has no children."""
  for i in range(len(tree)):
    assert tree.Q[i] == pytest.approx(backed_up_q(tree, i))
    if tree.terminal[i]:
      assert tree.R[i] == float(bool(tree.correct[i])) and not tree.children[i]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcts_finds_the_optimal_solution(seed):
  # 10 from 1 in the fewest steps: x2 x2 +1 x2 or +1 x2 +1 x2 (4 steps; 3 reach at most 8), then the answer step.
  # Within depth 6 longer solutions exist too (+1 +1 +1 +1 x2); exhausting the tree takes 63 expansions.
  optimal = {("x2", "x2", "+1", "x2"), ("+1", "x2", "+1", "x2")}
  cfg = SearchConfig(k=4, rollouts=8, iterations=30, max_depth=6, c_puct=1.0, seed=seed)
  (result,), _ = search([{"id": "ten", "problem": "reach 10", "answer": "10"}], PuzzlePolicy(), exact_judge(), cfg)
  tree = result.tree
  correct = [i for i in tree.terminals() if tree.correct[i]]
  assert correct, "no correct terminal"
  best = min(correct, key=lambda i: tree.depth[i])
  assert ops_of(tree, best) in optimal and tree.depth[best] == 5
  assert all(value_of(tree.steps(i)[:-1]) == 10 for i in correct)
  # The most visited root child is a real step (not the immediate, wrong answer) with some value.
  top = max(tree.children[0], key=lambda c: tree.N[c])
  assert normalize_step(tree.text[top]) in {"x2", "+1"} and tree.Q[top] > 0
  check_invariants(tree)
  assert tree.N[0] == result.iterations == 30


class Scripted:
  """Fixed proposals and rollout answers per root path (step texts)."""

  def __init__(self, proposals, rollouts):
    self.proposals, self.rollouts, self.requests = proposals, rollouts, []

  def propose(self, requests):
    self.requests += requests
    return [self.proposals[r.steps] for r in requests]

  def rollout(self, requests):
    self.requests += requests
    return [[Rollout(f"\\boxed{{{a}}}" if a else "...", [0, 0], a, True) for a in self.rollouts[r.steps]]
            for r in requests]


def step(text, answer=None, finish="stop", logprob=-1.0, n_tokens=1):
  return Step(text, [1] * n_tokens, logprob, finish, answer)


TINY = Scripted(
    proposals={(): [step("a"), step("b")],
               ("b",): [step("c", answer="1"), step("d")],
               ("b", "d"): [step("e", answer="0"), step(" E "), step("", finish="eos")],
               ("a",): [step("g", answer="1")]},
    rollouts={("a",): ["1", "0"], ("b",): ["1", "1"], ("b", "d"): ["0", None]})


def test_n_and_q_match_a_hand_computed_run():
  judge_calls = []
  cfg = SearchConfig(k=3, rollouts=2, iterations=3, max_depth=10, c_puct=1.0, prior="uniform")
  (result,), stats = search([{"id": 0, "problem": "p", "answer": "1"}], TINY, exact_judge(judge_calls), cfg)
  t = result.tree
  # Ids: 0 root, 1 a, 2 b, 3 c, 4 d, 5 e, 6 the empty EOS step (" E " is a duplicate of "e").
  # it 1: expand root -> a (R = mean(1, 0) = 0.5), b (R = mean(1, 1) = 1); N = 1, Q = R for both.
  #       root: N = 1, Q = (0.5*1 + 1*1) / 2 = 0.75.
  # it 2: PUCT at root (P = 1/2, sqrt(N(root)) = 1): a: 0.5 + 0.5*1/2 = 0.75, b: 1 + 0.5*1/2 = 1.25 -> b.
  #       b -> c (terminal, answer 1: R = Q = 1), d (rollouts 0, none: R = Q = 0).
  #       b: N = 2, Q = (1*1 + 0*1 + R(b)=1) / (1 + 1 + 1) = 2/3;  root: N = 2, Q = (0.5*1 + 2/3*2) / 3 = 11/18.
  # it 3: sqrt(2) = 1.41421: a: 0.5 + 0.5*1.41421/2 = 0.85355, b: 0.66667 + 0.5*1.41421/3 = 0.90237 -> b;
  #       at b, c is terminal (closed) -> d. d -> e (answer 0: wrong, R = 0), "" (EOS, no answer: R = 0).
  #       d: N = 2, Q = (0 + 0 + R(d)=0) / 3 = 0;  b: N = 3, Q = (1*1 + 0*2 + 1) / (1 + 2 + 1) = 0.5;
  #       root: N = 3, Q = (0.5*1 + 0.5*3) / (1 + 3) = 0.5.
  assert t.text == ["", "a", "b", "c", "d", "e", ""]
  assert t.parent == [-1, 0, 0, 2, 2, 4, 4]
  assert t.N == [3, 1, 3, 1, 2, 1, 1]
  assert t.Q == pytest.approx([0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0])
  assert t.R == pytest.approx([None, 0.5, 1.0, 1.0, 0.0, 0.0, 0.0])
  assert t.terminal == [False, False, False, True, False, True, True]
  assert t.correct == [None, None, None, True, None, False, False]
  assert t.answer == [None, None, None, "1", None, "0", None]
  assert t.closed[2] and t.closed[4] and not t.closed[0] and not t.closed[1]
  assert t.prior[5:] == [0.5, 0.5]  # uniform over the two distinct children of d
  assert result.iterations == 3 and len(stats) == 3
  # The answerless EOS step was never judged; every (answer, gold) pair was judged once.
  assert sorted(p for call in judge_calls for p in call) == [("0", "1"), ("1", "1")]
  check_invariants(t)


def test_exhausted_tree_finishes_early():
  cfg = SearchConfig(k=3, rollouts=2, iterations=10, max_depth=10, prior="uniform")
  (result,), stats = search([{"id": 0, "problem": "p", "answer": "1"}], TINY, exact_judge(), cfg)
  # it 4 expands a -> g (terminal): every branch then ends in a terminal, so the root is closed.
  assert result.iterations == 4 and len(stats) == 4 and result.tree.closed[0]
  assert result.tree.text[-1] == "g" and result.tree.correct[-1]
  check_invariants(result.tree)


def test_puct_picks_the_right_child():
  # Exploitation: with c = 0 the higher Q wins whatever the prior.
  assert np.argmax(puct_scores([0.2, 0.6], [5, 5], [0.9, 0.1], 10, 0.0)) == 1
  # Exploration: the rarely visited child wins once c is large enough: 0.2 + 2*0.5*3/2 = 1.7 > 0.6 + 2*0.5*3/11.
  assert np.argmax(puct_scores([0.2, 0.6], [1, 10], [0.5, 0.5], 9, 2.0)) == 0
  # Policy vs uniform prior on equal Q and N: the likelier step wins only under the policy prior.
  tree = Tree.new()
  tree.expanded[0], tree.N[0] = True, 1
  a, b = tree.add(0, "a", logprob=-2.0), tree.add(0, "b", logprob=-0.1)
  for mode, expect in (("policy", {b}), ("uniform", {a, b})):
    for c, p in zip((a, b), sibling_priors([-2.0, -0.1], mode)):
      tree.prior[c] = p
    picks = {select_leaf(tree, 1.0, np.random.default_rng(s)) for s in range(20)}
    assert picks == expect  # uniform: an exact tie, broken by the keyed RNG (both occur over 20 keys)
  assert sibling_priors([-2.0, -0.1], "policy") == pytest.approx(
      [np.exp(-2.0) / (np.exp(-2.0) + np.exp(-0.1)), np.exp(-0.1) / (np.exp(-2.0) + np.exp(-0.1))])
  # Closed and pending children are skipped; with everything blocked there is nothing to select.
  tree.terminal[b] = tree.closed[b] = True
  assert select_leaf(tree, 1.0, np.random.default_rng(0)) == a
  assert select_leaf(tree, 1.0, np.random.default_rng(0), pending={a}) is None
  # A virtual loss on the better child hands the next selection to its sibling.
  tree.terminal[b] = tree.closed[b] = False
  tree.Q[a], tree.Q[b], tree.prior[a], tree.prior[b] = 0.4, 0.5, 0.5, 0.5
  assert select_leaf(tree, 1.0, np.random.default_rng(0)) == b
  assert select_leaf(tree, 1.0, np.random.default_rng(0), virtual={0: 1, b: 1}) == a


def test_dedupe_collapses_normalised_duplicates():
  policy = Scripted(proposals={(): [step("Add  1", logprob=-1.0, n_tokens=2), step("add 1\n", logprob=-9.0),
                                    step(" x2", logprob=-0.2, n_tokens=2), step("X2 "), step(" \n", finish="stop"),
                                    step("\\boxed{3}", answer="3", logprob=-3.0)]},
                    rollouts={("Add  1",): ["2", "2"], (" x2",): ["3", "2"]})
  cfg = SearchConfig(k=6, rollouts=2, iterations=1, prior="policy")
  (result,), stats = search([{"id": 0, "problem": "p", "answer": "3"}], policy, exact_judge(), cfg)
  t = result.tree
  assert t.text == ["", "Add  1", " x2", "\\boxed{3}"]  # first spelling kept; the blank step dropped
  assert normalize_step(" Add\t1\n") == "add 1"
  # Priors: softmax of the first occurrences' per-token log-probs (-1/2, -0.2/2, -3/1); duplicates change nothing.
  e = np.exp([-0.5, -0.1, -3.0])
  assert t.prior[1:] == pytest.approx(list(e / e.sum()))
  assert stats[0].new_nodes == 3 and stats[0].propose_rows == 6 and stats[0].rollout_requests == 2
  assert result.tokens_sampled == (2 + 1 + 2 + 1 + 1 + 1) + 2 * 2 * 2  # all proposals + 2 rollouts of 2 tokens each


def test_an_expansion_without_usable_steps_closes_the_node():
  policy = Scripted(proposals={(): [step(" \n"), step("")]}, rollouts={})
  (result,), stats = search([{"id": 0, "problem": "p", "answer": "1"}], policy, exact_judge(), SearchConfig(k=2))
  assert len(result.tree) == 1 and result.tree.closed[0] and result.iterations == 1 and len(stats) == 1
  assert stats[0].rollout_calls == 0 and stats[0].judge_calls == 0
  assert sibling_priors([], "policy") == sibling_priors([], "uniform") == []


def test_terminal_and_depth_limit_handling():
  policy = Scripted(proposals={(): [step("s"), step("cut", finish="length"), step("end", finish="eos")],
                               ("s",): [step("t"), step("u", answer="7")]},
                    rollouts={("s",): ["7", "1"]})
  cfg = SearchConfig(k=3, rollouts=2, iterations=5, max_depth=2, prior="uniform")
  (result,), _ = search([{"id": 0, "problem": "p", "answer": "7"}], policy, exact_judge(), cfg)
  t = result.tree
  assert t.text == ["", "s", "cut", "end", "t", "u"]
  assert t.terminal == [False, False, True, True, True, True]  # length / EOS cut branches; depth 2 is the limit
  assert t.answer[4] is None and t.R[4] == 0.0 and t.correct[4] is False  # depth-limit child: scored, no rollouts
  assert t.correct[5] and t.R[5] == 1.0
  assert result.iterations == 2 and t.closed[0]  # exhausted after 2 expansions despite a budget of 5
  rollout_nodes = [r.node for r in policy.requests if hasattr(r, "max_steps")]
  assert rollout_nodes == [1]  # only the one open child was rolled out
  check_invariants(t)
  # With length_terminal off, a cut step is an ordinary step that gets rollouts and can be expanded.
  policy.rollouts[("cut",)] = ["1", "1"]
  policy.proposals[("cut",)] = [step("x", answer="7")]
  cfg = SearchConfig(k=3, rollouts=2, iterations=5, max_depth=2, prior="uniform", length_terminal=False)
  (result,), _ = search([{"id": 0, "problem": "p", "answer": "7"}], policy, exact_judge(), cfg)
  assert not result.tree.terminal[2] and result.tree.expanded[2]


def test_calls_per_round_do_not_depend_on_the_number_of_problems():
  cfg = SearchConfig(k=4, rollouts=3, iterations=6, max_depth=6, seed=1)
  per_round = {}
  for n in (1, 16):
    policy = PuzzlePolicy()
    results, stats = search(puzzles(n), policy, exact_judge(), cfg)
    assert len(policy.calls) == sum(s.policy_calls for s in stats)
    assert all(s.propose_calls == 1 and s.rollout_calls <= 1 and s.judge_calls <= 2 for s in stats)
    per_round[n] = max(s.policy_calls for s in stats), len(stats)
    assert stats[0].propose_requests == n and stats[0].expansions == n
  assert per_round[1] == per_round[16] == (2, 6)


@pytest.mark.parametrize("leaves", [1, 3])
def test_a_tree_does_not_depend_on_its_batch(leaves):
  cfg = SearchConfig(k=4, rollouts=4, iterations=7, max_depth=6, seed=5, leaves_per_tree=leaves)
  problems = puzzles(16)
  alone, _ = search([problems[3]], PuzzlePolicy(), exact_judge(), cfg)
  batch, stats = search(problems, PuzzlePolicy(), exact_judge(), cfg)
  staggered, _ = search(problems[::-1], PuzzlePolicy(), exact_judge(), cfg, max_active=5, overlap_judge=False)
  others = {r.problem_id: r for r in staggered}
  assert json.dumps(alone[0].record()) == json.dumps(batch[3].record()) == json.dumps(others["p3"].record())
  assert alone[0].tokens_sampled == batch[3].tokens_sampled == others["p3"].tokens_sampled
  if leaves > 1:
    # Round 0 can only expand the root; later rounds expand several leaves per tree.
    assert stats[0].expansions == 16 and max(s.expansions for s in stats) > 16
    assert sum(s.expansions for s in stats) == 16 * 7 and len(stats) < 7
  assert [r.problem_id for r in batch] == [p["id"] for p in problems]
  for r in batch:
    check_invariants(r.tree)


def test_finished_trees_are_reported_as_they_finish():
  cfg = SearchConfig(k=3, rollouts=2, iterations=4, max_depth=5)
  seen = []
  with BatchedSearch(PuzzlePolicy(), exact_judge(), cfg) as engine:
    engine.add(puzzles(1)[0])
    assert engine.step_round() == [] and engine.step_round() == []
    engine.add(puzzles(2)[1])  # joins late; runs its own 4 iterations
    while engine.active:
      seen.append([(r.problem_id, r.iterations) for r in engine.step_round()])
  assert seen == [[], [("p0", 4)], [], [("p1", 4)]]


def test_stop_after_correct():
  cfg = SearchConfig(k=6, rollouts=4, iterations=40, max_depth=6, seed=3, stop_after_correct=1)
  (result,), _ = search([{"id": "ten", "problem": "reach 10", "answer": "10"}], PuzzlePolicy(), exact_judge(), cfg)
  assert tree_summary(result.tree)["correct_terminals"] >= 1 and result.iterations < 40


def test_graft_rollouts():
  cfg = SearchConfig(k=4, rollouts=6, iterations=5, max_depth=6, seed=2, graft_rollouts=True)
  (result,), _ = search(puzzles(1), PuzzlePolicy(), exact_judge(), cfg)
  t = result.tree
  grafted = [i for i in range(1, len(t)) if not t.tokens[i]]
  assert grafted, "no rollout step was grafted"
  for i in range(len(t)):  # siblings are distinct; every leaf is terminal or not yet expanded
    keys = [normalize_step(t.text[c]) for c in t.children[i]]
    assert len(keys) == len(set(keys))
    assert t.children[i] or t.terminal[i] or not t.expanded[i]
    if t.terminal[i] and t.answer[i] is not None:
      assert t.correct[i] == (t.answer[i] == "6") and t.depth[i] <= 6
  check_invariants(t)
  # The same search without grafting keeps only sampled steps.
  plain, _ = search(puzzles(1), PuzzlePolicy(), exact_judge(), SearchConfig(k=4, rollouts=6, iterations=5,
                                                                            max_depth=6, seed=2))
  assert all(plain[0].tree.tokens[i] for i in range(1, len(plain[0].tree)))


class GraftScripted(Scripted):
  """Fixed proposals; rollouts as (text, answer) pairs per root path (text: steps joined by blank lines)."""

  def rollout(self, requests):
    self.requests += requests
    return [[Rollout(text, [0], answer, True) for text, answer in self.rollouts[r.steps]] for r in requests]


GRAFT = GraftScripted(
    proposals={(): [step("a"), step("b")], ("a",): [step(" P "), step("v")]},
    rollouts={("a",): [("p\n\nq\n\n\\boxed{1}", "1"), ("p\n\nr\n\n\\boxed{2}", "2"), ("s\n\n\\boxed{1}", "1")],
              ("b",): [("t\n\n\\boxed{1}", "1"), ("t\n\n\\boxed{3}", "3"), ("", None)],
              ("a", "v"): [("\\boxed{1}", "1"), ("\\boxed{2}", "2"), ("w\n\n\\boxed{2}", "2")]})


def test_grafted_rollouts_count_once_in_a_hand_computed_run():
  cfg = SearchConfig(k=2, rollouts=3, iterations=2, max_depth=10, c_puct=1.0, prior="uniform", graft_rollouts=True)
  (result,), _ = search([{"id": 0, "problem": "p", "answer": "1"}], GRAFT, exact_judge(), cfg)
  t = result.tree
  # it 1: root -> a (1), b (2). a's rollouts, grafted in order: p (3) q (4) [1] (5); p r (6) [2] (7); s (8) [1] (9).
  #       b's: t (10) [1] (11); t [3] (12); the empty rollout: an empty terminal (13), no answer.
  #       Each rollout counts once, at every node it passes: N(p) = 2, N(t) = 2, all other grafted nodes N = 1;
  #       grafted non-terminals (and a, b, whose rollouts they are) have no R of their own.
  #       Q(p) = (1*1 + 0*1) / 2 = 1/2, Q(s) = 1;  Q(a) = (1/2*2 + 1*1) / 3 = 2/3 = mean(1, 0, 1), N(a) = 1.
  #       Q(t) = (1 + 0) / 2 = 1/2;  Q(b) = (1/2*2 + 0*1) / 3 = 1/3 = mean(1, 0, 0), N(b) = 1.
  #       root: N = 1, Q = (2/3*1 + 1/3*1) / 2 = 1/2.
  # it 2: PUCT at the root (P = 1/2, sqrt(1) = 1): a: 2/3 + 1/2 * 1/2 = 0.917, b: 1/3 + 1/4 = 0.583 -> a, not yet
  #       expanded (its grafted children do not make it so) -> a is the leaf. Proposals " P " (a duplicate of the
  #       grafted p: dropped) and v (14); v's rollouts: [1] (15), [2] (16), w (17) [2] (18): Q(v) = 1/3, N(v) = 1.
  #       Backup: a: N = 2, Q = (1/2*2 + 1*1 + 1/3*1) / (2 + 1 + 1) = 7/12;  root: N = 2,
  #       Q = (7/12*2 + 1/3*1) / (2 + 1) = 1/2.
  assert t.text == ["", "a", "b", "p", "q", "\\boxed{1}", "r", "\\boxed{2}", "s", "\\boxed{1}", "t", "\\boxed{1}",
                    "\\boxed{3}", "", "v", "\\boxed{1}", "\\boxed{2}", "w", "\\boxed{2}"]
  assert t.parent == [-1, 0, 0, 1, 3, 4, 3, 6, 1, 8, 2, 10, 10, 2, 1, 14, 14, 14, 17]
  assert t.N == [2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1]
  assert t.Q == pytest.approx([1 / 2, 7 / 12, 1 / 3, 1 / 2, 1, 1, 0, 0, 1, 1, 1 / 2, 1, 0, 0, 1 / 3, 1, 0, 0, 0])
  terminal = [5, 7, 9, 11, 12, 13, 15, 16, 18]
  assert t.R == [1.0 if i in (5, 9, 11, 15) else 0.0 if i in terminal else None for i in range(len(t))]
  assert [i for i in range(len(t)) if t.terminal[i]] == terminal
  assert [t.correct[i] for i in terminal] == [True, False, True, True, False, False, True, False, False]
  assert t.answer[13] is None and result.iterations == 2
  for c in (1, 2, 14):  # each sampled child's M rollouts: once, through its grafted children
    assert sum(t.N[g] for g in t.children[c] if not t.tokens[g]) == cfg.rollouts
  check_invariants(t)


def test_every_grafted_rollout_ends_at_one_terminal():
  policy = GraftScripted(proposals={(): [step("a")]}, rollouts={("a",): [
      ("p\n\nq\n\n\\boxed{1}", "1"), ("p", None), ("p\n\nq\n\n\\boxed{1}\n\nso 1", "1")]})
  cfg = SearchConfig(k=1, rollouts=3, iterations=1, max_depth=10, prior="uniform", graft_rollouts=True)
  (result,), _ = search([{"id": 0, "problem": "p", "answer": "1"}], policy, exact_judge(), cfg)
  t = result.tree
  # a (1); p (2) q (3) [1] (4); "p" ends on p, which the first rollout went past: an empty terminal (5) under p;
  # the third reaches the terminal [1] and stops there. N: p = 3, q = 2, [1] = 2, "" = 1.
  # Q(p) = (1*2 + 0*1) / 3 = 2/3 = Q(a) = mean(1, 0, 1); root: N = 1, Q = 2/3.
  assert t.text == ["", "a", "p", "q", "\\boxed{1}", ""] and t.parent == [-1, 0, 1, 2, 3, 2]
  assert t.N == [1, 1, 3, 2, 2, 1] and t.Q == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1, 1, 0])
  assert t.R == [None, None, None, None, 1.0, 0.0] and t.terminal == [False] * 4 + [True, True]
  check_invariants(t)


@pytest.mark.parametrize("graft", [False, True])
def test_record_round_trip_is_exact(graft):
  cfg = SearchConfig(k=4, rollouts=3, iterations=6, max_depth=6, seed=7, graft_rollouts=graft)
  (result,), _ = search(puzzles(1), PuzzlePolicy(), exact_judge(), cfg)
  record = result.record()
  assert list(record) == ["id", "problem", "answer", "nodes"]
  assert list(record["nodes"][0]) == ["id", "parent", "depth", "text", "tokens", "N", "Q", "R", "prior", "terminal",
                                      "answer", "correct"]
  assert record["nodes"][0]["parent"] is None and record["nodes"][0]["R"] is None
  line = json.dumps(record)
  back = Tree.from_record(json.loads(line))
  assert json.dumps(back.to_record(record["id"], record["problem"], record["answer"])) == line
  for field in ("parent", "depth", "text", "tokens", "N", "Q", "R", "prior", "terminal", "answer", "correct",
                "children") + (() if graft else ("expanded", "closed")):  # grafted nodes have children unexpanded
    assert getattr(back, field) == getattr(result.tree, field), field
  with pytest.raises(ValueError, match="node 1"):
    Tree.from_record({**record, "nodes": [record["nodes"][0], {**record["nodes"][1], "parent": 5}]})


def test_tree_paths():
  t = Tree.new()
  a = t.add(0, "Let x = 2.", [1, 2])
  b = t.add(a, "Then 2x = 4.", [3])
  c = t.add(b, "So \\boxed{4}.", [4], terminal=True, answer="4")
  assert t.path(c) == [0, a, b, c] and t.depth[c] == 3
  assert t.prefix(c) == "Let x = 2.\n\nThen 2x = 4.\n\nSo \\boxed{4}."
  assert t.prefix(0) == "" and t.step_tokens(b) == [[1, 2], [3]]


def test_summary_on_a_constructed_tree():
  def tree_with(answers_correct):
    t = Tree.new()
    for answer, correct in answers_correct:
      node = t.add(t.add(0, "step"), f"\\boxed{{{answer}}}", [1, 2], terminal=True, answer=answer)
      t.correct[node] = correct
    return t
  solved = tree_with([("3", True), ("4", False), (" 4", False), ("5", False), (None, False), ("4.0", False)])
  unsolved = tree_with([("8", False)])
  assert tree_summary(solved) == {"nodes": 13, "terminals": 6, "correct_terminals": 1, "distinct_wrong_answers": 3}
  numeric = lambda a, b: float(a) == float(b)  # e.g. the judge's equivalence: "4.0" is "4"
  assert distinct_answers(["4", " 4", "5", "4.0"], numeric) == ["4", "5"]
  out = summarize([solved, unsolved], tokens_sampled=[100, 20], equal=numeric)
  assert out["problems"] == 2 and out["solved"] == 1 and out["solved_fraction"] == 0.5
  assert out["terminals_per_tree"] == 3.5 and out["distinct_wrong_answers_per_tree"] == (2 + 1) / 2
  assert out["tokens_sampled"] == 120 and out["nodes_per_tree"] == (13 + 3) / 2


def test_memo_judge_and_seeds():
  calls = []
  judge = MemoJudge(exact_judge(calls))
  assert judge([("1", "1"), ("2", "1"), ("1", "1")]) == [True, False, True]
  assert judge([("2", "1"), ("3", "1")]) == [False, False]
  assert judge([("1", "1")]) == [True]
  assert calls == [[("1", "1"), ("2", "1")], [("3", "1")]] and judge.calls == 2 and judge.pairs == 3
  # Seeds are a pure function of identities: pinned, so a resumed run under a new process draws the same.
  assert stable_seed(0, "select", "p0", 3) == stable_seed(0, "select", "p0", 3) != stable_seed(0, "select", "p0", 4)
  assert stable_seed(0, ["expand", "p0", 0, 0]) == 2303889713
  with pytest.raises(ValueError, match="prior"):
    SearchConfig(prior="learned")


def test_pool_judge():
  from astro_jax.verifier import VerifierPool
  with VerifierPool(workers=1) as pool:
    assert pool_judge(pool)([("1/2", "0.5"), ("3", "3"), ("4", "5")]) == [True, True, False]


def test_terminals_are_judged_while_rollouts_sample():
  import threading
  judging = threading.Event()
  overlapped = []

  class Waiting(Scripted):
    def rollout(self, requests):
      if requests[0].steps == ("b", "d"):  # round 2 (iteration 2) also made the terminal child c
        overlapped.append(judging.wait(timeout=10))
      return super().rollout(requests)

  def judge(pairs):
    if pairs == [("one", "1")]:  # c's answer: a pair no rollout produced, so the memo does not hide it
      judging.set()
    return [a == g for a, g in pairs]

  policy = Waiting({**TINY.proposals, ("b",): [step("c", answer="one"), step("d")]}, TINY.rollouts)
  cfg = SearchConfig(k=3, rollouts=2, iterations=3, prior="uniform")
  (result,), _ = search([{"id": 0, "problem": "p", "answer": "1"}], policy, judge, cfg)
  assert overlapped == [True] and result.tree.answer[3] == "one" and result.tree.correct[3] is False
