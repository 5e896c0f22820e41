r"""Linearization (Algorithm 1) and procedure cloning to language on constructed tree records."""
from __future__ import annotations

import itertools
import random
import re
from fractions import Fraction

import pytest

from astro_jax import prompts, verifier
from astro_jax.search import linearize, render
from astro_jax.search.linearize import Backtrack, LinearizeConfig, Step
from tests.conftest import with_depths

_FRAC = re.compile(r"\\frac\{(-?\d+)\}\{(-?\d+)\}")


def scripted_equal(a: str, b: str) -> bool:
  """Numeric equality of simple answers (integers, decimals, a/b, \\frac{a}{b}): fast and deterministic."""
  def value(s: str) -> Fraction | None:
    s = _FRAC.sub(r"\1/\2", s.strip())
    try:
      return Fraction(s)
    except (ValueError, ZeroDivisionError):
      return None
  va, vb = value(a), value(b)
  return a.strip() == b.strip() or (va is not None and va == vb)


def real_equal(a: str, b: str) -> bool:
  return verifier.compare_answers(a, b)


def node(i, parent, text, q=0.5, terminal=False, answer=None, correct=None):
  return {"id": i, "parent": parent, "depth": 0, "text": text, "tokens": len(text.split()), "N": 1, "Q": q, "R": q,
          "prior": 0.5, "terminal": terminal, "answer": answer, "correct": correct}


def tree_a():
  """Two correct paths, wrong answers 1/6, 9 (twice: "9" and "9.0"), 2, one truncated terminal, tricky step texts."""
  return with_depths({"id": "A", "problem": "Simplify $\\frac{3}{6}$.", "answer": "\\frac{1}{2}", "nodes": [
      node(0, None, "", q=0.6),
      node(1, 0, "Let us revisit the fraction $\\frac{3}{6}$ first; it has a common factor of 3.", q=0.9),
      node(2, 1, "Dividing top and bottom by 3 gives $\\frac{1}{2}$.", q=0.95),
      node(3, 2, "The final answer is $\\boxed{\\frac{1}{2}}$.", q=1.0, terminal=True, answer="\\frac{1}{2}",
           correct=True),
      node(4, 1, "Dividing only the top by 3 gives $\\frac{1}{6}$, which we note as \\boxed{1/6} for now.", q=0.3),
      node(5, 4, "The final answer is \\boxed{\\frac{1}{6}}.", q=0.0, terminal=True, answer="\\frac{1}{6}",
           correct=False),
      node(6, 4, "The final answer is \\boxed{", q=0.0, terminal=True, answer=None, correct=False),
      node(7, 0, "Adding numerator and denominator gives $3 + 6 = 9$.", q=0.0),
      node(8, 7, "So the answer is \\boxed{9}.", q=0.0, terminal=True, answer="9", correct=False),
      node(9, 7, "So the answer is \\boxed{9.0}.", q=0.0, terminal=True, answer="9.0", correct=False),
      node(10, 0, "Let's go back to the definition: a fraction is a quotient, so we compute $3 \\div 6$.", q=0.85),
      node(11, 10, "We get $3 \\div 6 = 0.5$.", q=0.9),
      node(12, 11, "Hence the answer is \\boxed{0.5}.", q=1.0, terminal=True, answer="0.5", correct=True),
      node(13, 10, "We get $3 \\div 6 = 2$, so \\boxed{2}.", q=0.0, terminal=True, answer="2", correct=False),
  ]})


def tree_b():
  """Gold 3; wrong answers 1/2, 0.5 and \\frac{1}{2} (all equivalent) and 7: at most two distinct."""
  return with_depths({"id": "B", "problem": "What is $1 + 2$?", "answer": "3", "nodes": [
      node(0, None, ""),
      node(1, 0, "We add 1 and 2 to get 3.", q=0.9),
      node(2, 1, "The final answer is \\boxed{3}.", q=1.0, terminal=True, answer="3", correct=True),
      node(3, 0, "We halve the sum instead.", q=0.1),
      node(4, 3, "The final answer is \\boxed{1/2}.", terminal=True, answer="1/2", correct=False),
      node(5, 3, "The final answer is \\boxed{0.5}.", terminal=True, answer="0.5", correct=False),
      node(6, 0, "We divide 1 by 2.", q=0.2),
      node(7, 6, "The final answer is \\boxed{\\frac{1}{2}}.", terminal=True, answer="\\frac{1}{2}", correct=False),
      node(8, 6, "The final answer is \\boxed{7}.", terminal=True, answer="7", correct=False),
  ]})


def tree_single():
  """One correct and one wrong terminal: every k>=1 draw is the same trace."""
  return with_depths({"id": "S", "problem": "What is $2 \\times 2$?", "answer": "4", "nodes": [
      node(0, None, ""),
      node(1, 0, "Two times two is four.", q=0.9),
      node(2, 1, "The final answer is \\boxed{4}.", terminal=True, answer="4", correct=True),
      node(3, 0, "Two plus two plus two is six.", q=0.1),
      node(4, 3, "The final answer is \\boxed{6}.", terminal=True, answer="6", correct=False),
  ]})


def tree_unsolved():
  return with_depths({"id": "U", "problem": "What is $5 - 1$?", "answer": "4", "nodes": [
      node(0, None, ""),
      node(1, 0, "Five minus one is three.", q=0.0),
      node(2, 1, "The final answer is \\boxed{3}.", terminal=True, answer="3", correct=False),
      node(3, 0, "Five minus one is", q=0.0, terminal=True, answer=None, correct=False),
  ]})


MANY = LinearizeConfig(ks=(0, 1, 1, 2, 2, 2, 1, 2), attempts=8)


def rows(record, lin=MANY, **kwargs):
  kwargs.setdefault("equal", scripted_equal)
  return render.tree_rows(record, lin, **kwargs)


def boxed(text):
  return [c for _, _, c in render._box_spans(text)]


def check_walk(tree, trace):
  """The events are a walk in the tree: each step is a child of the previous step or of the backtrack target, a
  target is a node narrated before (or the root), and no node is narrated twice."""
  at, narrated = tree.root, {tree.root}
  wrong = list(trace.wrong)
  for event in trace.events:
    if isinstance(event, Step):
      assert tree.parent(event.node) == at and event.node not in narrated
      at = event.node
      narrated.add(at)
    else:
      assert event.failed == at == wrong.pop(0) and tree.nodes[at]["correct"] is False and tree.nodes[at]["answer"]
      assert event.to in narrated and not tree.nodes[event.to].get("terminal")
      assert event.restart == (event.to == tree.root)
      at = event.to
  assert at == trace.correct and not wrong and tree.nodes[at]["correct"] is True


# ----------------------------------------------------------------------------------------------------------------
# Linearization
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_traces_are_walks_ending_correct_with_distinct_wrong_answers(seed):
  tree = linearize.TreeIndex(tree_a())
  lin = linearize.linearize_tree(tree_a(), LinearizeConfig(seed=seed, ks=MANY.ks, attempts=8), equal=scripted_equal)
  assert lin.search and [t.k for t in lin.search][0] == 0
  for trace in lin.search:
    check_walk(tree, trace)
    answers = [tree.nodes[n]["answer"] for n in trace.wrong]
    assert all(not scripted_equal(a, b) for a, b in itertools.combinations(answers, 2))
    assert 6 not in trace.wrong  # the truncated terminal has no answer: never narrated
    assert {8, 9} & set(trace.wrong) != {8, 9}
  assert len({t.events for t in lin.search}) == len(lin.search)  # deduplicated


def test_k0_is_the_plain_root_path():
  tree = linearize.TreeIndex(tree_a())
  for correct in (3, 12):
    trace = linearize.merge_paths(tree, [], correct)
    assert trace.k == 0 and trace.events == tuple(Step(n) for n in tree.path(correct)[1:])


def test_backtrack_to_the_deepest_narrated_node_and_restart_at_root():
  tree = linearize.TreeIndex(tree_a())
  # Algorithm 1: L = [1, 4, 5]; path(8) - L = [7, 8], 7's parent is the root (a restart); path(3) - L = [2, 3]:
  # node 1 was narrated on the way to 5, so the trace returns to it, not to the root (it never repeats step 1).
  trace = linearize.merge_paths(tree, [5, 8], 3)
  assert trace.events == (Step(1), Step(4), Step(5), Backtrack(failed=5, to=0, restart=True),
                          Step(7), Step(8), Backtrack(failed=8, to=1, restart=False), Step(2), Step(3))
  trace = linearize.merge_paths(tree, [5], 3)
  assert trace.events == (Step(1), Step(4), Step(5), Backtrack(failed=5, to=1, restart=False), Step(2), Step(3))
  assert trace.to_json() == [["step", 1], ["step", 4], ["step", 5], ["backtrack", 1], ["step", 2], ["step", 3]]


def tree_lca():
  """Wrong A->B->X, wrong A->C->Y, correct A->B->Z: after Y the LCA with Z is A, but B was already narrated."""
  return with_depths({"id": "L", "problem": "What is $3 + 4$?", "answer": "7", "nodes": [
      node(0, None, ""), node(1, 0, "A: we add the two numbers."), node(2, 1, "B: three plus four."),
      node(3, 2, "X: so \\boxed{8}.", terminal=True, answer="8", correct=False),
      node(4, 1, "C: four plus four."), node(5, 4, "Y: so \\boxed{9}.", terminal=True, answer="9", correct=False),
      node(6, 2, "Z: so \\boxed{7}.", terminal=True, answer="7", correct=True)]})


def test_backtrack_returns_to_an_already_narrated_node_not_the_lca():
  tree = linearize.TreeIndex(tree_lca())
  # Algorithm 1 by hand: L = [A, B, X]; path(Y) - L = [C, Y] (C's parent A: back to A); path(Z) - L = [Z], whose
  # parent B is in L: back to B. The LCA of Y and Z is A, which would narrate B a second time.
  trace = linearize.merge_paths(tree, [3, 5], 6)
  assert trace.events == (Step(1), Step(2), Step(3), Backtrack(failed=3, to=1, restart=False), Step(4), Step(5),
                          Backtrack(failed=5, to=2, restart=False), Step(6))
  check_walk(tree, trace)
  text = render.render_trace(tree, trace, linearize.derived_rng(0, "t"), render.RenderConfig()).text
  assert text.count("B: three plus four") == 2  # the step and the second backtrack's quote of it
  jumps = [p for p in text.split("\n\n") if prompts.count_backtracks(p)]
  assert '"A: we add the two numbers"' in jumps[0] and '"B: three plus four"' in jumps[1]


def algorithm1(record, terminals):
  """Brute-force Algorithm 1 on a raw record: L <- L + (path(n) - L) for each terminal; each new suffix is entered
  from the parent of its first node (a backtrack after every terminal but the last)."""
  parent = {n["id"]: n["parent"] for n in record["nodes"]}
  root = next(i for i, p in parent.items() if p is None)
  L, events = [root], []
  for n in terminals:
    path = [n]
    while parent[path[-1]] is not None:
      path.append(parent[path[-1]])
    new = [x for x in reversed(path) if x not in L]
    if len(L) > 1:
      events.append(["backtrack", parent[new[0]]])
    events += [["step", x] for x in new]
    L += new
  return events


def random_tree(seed, n_nodes=40):
  """A random tree record: terminals are leaves (the search never descends below one), answers from a small pool."""
  rng = random.Random(seed)
  nodes, open_ = [node(0, None, "")], [0]
  for i in range(1, n_nodes):
    parent = rng.choice(open_)
    if rng.random() < 0.45:
      answer = rng.choice(["1", "2", "3", "4", "5", None])
      nodes.append(node(i, parent, f"step {i}: \\boxed{{{answer}}}", q=rng.random(), terminal=True, answer=answer,
                        correct=answer == "1"))
    else:
      nodes.append(node(i, parent, f"step {i}.", q=rng.random()))
      open_.append(i)
  return with_depths({"id": f"R{seed}", "problem": "p", "answer": "1", "nodes": nodes})


@pytest.mark.parametrize("seed", range(40))
def test_merge_equals_brute_force_algorithm1_and_never_repeats_a_step(seed):
  record = random_tree(seed)
  tree = linearize.TreeIndex(record)
  terminals = tree.terminals()
  correct = [t for t in terminals if tree.nodes[t]["correct"]]
  wrong = [t for t in terminals if not tree.nodes[t]["correct"] and tree.nodes[t]["answer"]]
  if not correct:
    return
  rng = random.Random(seed)
  for _ in range(20):
    picked = rng.sample(wrong, rng.randint(0, min(4, len(wrong))))  # any order, not only DFS order
    trace = linearize.merge_paths(tree, picked, rng.choice(correct))
    assert trace.to_json() == algorithm1(record, [*picked, trace.correct])
    check_walk(tree, trace)
  lin = linearize.linearize_tree(record, LinearizeConfig(seed=seed, ks=MANY.ks, attempts=8), equal=str.__eq__)
  for trace in lin.search + lin.direct:
    check_walk(tree, trace)
  sft, _ = rows(record, LinearizeConfig(seed=seed, ks=MANY.ks, attempts=8), equal=str.__eq__)
  for r in sft:  # each node's text appears once as a step (backtrack quotes aside)
    steps = [n for kind, n in r["events"] if kind == "step"]
    assert len(steps) == len(set(steps))


@pytest.mark.parametrize("equal", [scripted_equal, real_equal], ids=["scripted", "compare_answers"])
def test_equivalent_wrong_answers_are_one_class(equal):
  tree = linearize.TreeIndex(tree_b())
  classes = linearize.wrong_answer_classes(tree, equal)
  assert sorted(map(sorted, classes)) == [[4, 5, 7], [8]]
  for seed in range(8):
    for trace in linearize.linearize_tree(tree_b(), LinearizeConfig(seed=seed, ks=(0, 2, 2, 2, 1)), equal=equal).search:
      assert len(set(trace.wrong) & {4, 5, 7}) <= 1 and trace.k <= 2


def test_wrong_answer_equal_to_gold_is_not_narrated():
  record = tree_single()
  record["nodes"].append(node(5, 3, "The final answer is \\boxed{4.0}.", terminal=True, answer="4.0", correct=False))
  tree = linearize.TreeIndex(record)
  assert linearize.wrong_answer_classes(tree, scripted_equal) == [[4]]


def test_k_is_clipped_duplicates_dropped_and_unsolved_trees_yield_nothing():
  lin = linearize.linearize_tree(tree_single(), LinearizeConfig(), equal=scripted_equal)
  assert [t.k for t in lin.search] == [0, 1] and len(lin.direct) == 2
  assert linearize.linearize_tree(tree_unsolved(), equal=scripted_equal).search == []
  assert rows(tree_unsolved()) == ([], [])
  no_wrong = tree_single()
  no_wrong["nodes"] = no_wrong["nodes"][:3]
  assert [t.k for t in linearize.linearize_tree(no_wrong, equal=scripted_equal).search] == [0]


def test_default_mix_is_one_direct_and_three_search_traces():
  sft, direct = rows(tree_a(), LinearizeConfig())
  assert [r["k"] for r in sft] == [0, 1, 1, 2] and [r["kind"] for r in sft] == ["direct"] + ["search"] * 3
  assert len(direct) == len(sft)


def test_seeded_choices_are_reproducible_and_independent_of_tree_order():
  records = [tree_a(), tree_b(), tree_single()]
  kwargs = {"lin_config": MANY, "equal": scripted_equal}
  first = render.dataset_rows(records, **kwargs)
  again = render.dataset_rows([tree_single(), tree_b(), tree_a()], **kwargs)
  by_id = lambda rs: {r["id"]: r for r in rs}  # noqa: E731
  assert by_id(first[0]) == by_id(again[0]) and by_id(first[1]) == by_id(again[1])
  assert len(by_id(first[0]) | by_id(first[1])) == len(first[0]) + len(first[1])  # ids unique across files
  other = render.dataset_rows(records, lin_config=LinearizeConfig(seed=1, ks=MANY.ks, attempts=8),
                              equal=scripted_equal)
  assert [r["events"] for r in other[0]] != [r["events"] for r in first[0]]


def test_direct_set_is_count_matched_over_distinct_correct_paths():
  sft, direct = rows(tree_a())
  assert len(direct) == len(sft) and all(r["kind"] == "direct" and r["k"] == 0 for r in direct)
  ends = [r["events"][-1][1] for r in direct]
  assert set(ends) == {3, 12} and abs(ends.count(3) - ends.count(12)) <= 1  # both paths, then repeated
  for r in direct:
    text = r["messages"][1]["content"]
    assert prompts.count_reflections(text) == 0 and prompts.count_backtracks(text) == 0 and len(boxed(text)) == 1


# ----------------------------------------------------------------------------------------------------------------
# Self-evaluation
# ----------------------------------------------------------------------------------------------------------------


def scripted_voter(prompts_: list[str], n: int) -> list[list[str]]:
  """Unanimous yes for the fraction path, 5 of 8 for the division path."""
  out = []
  for p in prompts_:
    assert "Simplify" in p and "Solution:" in p
    yes = n if "Dividing top and bottom" in p else 5
    out.append(["Looks fine.\nVerdict: Yes"] * yes + ["verdict: no"] * (n - yes))
  return out


def test_vote_verdict_rules():
  assert linearize.parse_vote("I think so. Verdict: **Yes**") is True
  assert linearize.parse_vote("Verdict: yes ... on reflection, Verdict: No") is False
  assert linearize.parse_vote("yes, clearly") is True and linearize.parse_vote("hard to say") is None
  votes = ["Verdict: Yes"] * 5 + ["Verdict: No", "???", "Verdict: No"]
  assert not linearize.vote_verdict(votes, "unanimous") and linearize.vote_verdict(votes, "majority")
  assert not linearize.vote_verdict(["Verdict: Yes"] * 4 + ["?"] * 4, "majority")  # unparseable counts as no
  assert linearize.vote_verdict(["Verdict: Yes"] * 8) and not linearize.vote_verdict([])
  with pytest.raises(ValueError):
    linearize.make_self_eval(scripted_voter, rule="plurality")


@pytest.mark.parametrize("rule,kept", [("unanimous", [3]), ("majority", [3, 12]), (None, [3, 12])])
def test_self_eval_filter(rule, kept):
  self_eval = None if rule is None else linearize.make_self_eval(scripted_voter, n_votes=8, rule=rule)
  tree = linearize.TreeIndex(tree_a())
  assert linearize.passing_correct(tree, self_eval) == kept
  sft, direct = rows(tree_a(), self_eval=self_eval)
  assert {r["events"][-1][1] for r in sft + direct} == set(kept)


def test_self_eval_rejecting_all_yields_no_rows():
  never = linearize.make_self_eval(lambda ps, n: [["Verdict: No"] * n for _ in ps])
  assert rows(tree_a(), self_eval=never) == ([], [])


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree_fn", [tree_a, tree_b, tree_single])
@pytest.mark.parametrize("seed", range(4))
def test_rendered_traces_keep_the_invariants(tree_fn, seed):
  record = tree_fn()
  tree = linearize.TreeIndex(record)
  sft, _ = rows(record, LinearizeConfig(seed=seed, ks=MANY.ks, attempts=8),
                render_config=render.RenderConfig(seed=seed))
  assert sft
  for r in sft:
    text = r["messages"][1]["content"]
    assert r["messages"][0]["content"] == prompts.math_messages(record["problem"])[-1]["content"]
    assert prompts.count_backtracks(text) == r["k"] == r["n_backtracks"]
    answers = boxed(text)
    assert len(answers) == r["k"] + 1
    wrong = [e for e in r["events"] if e[0] == "backtrack"]
    assert len(wrong) == r["k"]
    assert all(not real_equal(a, b) and not real_equal(b, a) for a, b in itertools.combinations(answers[:-1], 2))
    final = verifier.extract_answer(text)
    assert final == answers[-1] and real_equal(final, record["answer"])
    assert all(not real_equal(a, record["answer"]) for a in answers[:-1])
    assert "Let us revisit the fraction" not in text and "Let's go back to the definition" not in text
    # One marker per reflection paragraph with the default templates: k negative + the positive ones.
    positives = text.count("?") - r["k"]
    assert prompts.count_reflections(text) == r["k"] + positives
    assert text.rstrip().endswith(tuple(render.Templates().positive))
    jumps = [p for p in text.split("\n\n") if prompts.count_backtracks(p)]
    assert len(jumps) == r["k"]
    for paragraph, (_, to) in zip(jumps, wrong):
      if to == tree.root:
        assert paragraph.endswith(render.Templates().restart)
      else:
        assert f'"{render.step_gist(tree.text(to))}"' in paragraph


def test_backtrack_sentence_names_the_target_step():
  tree = linearize.TreeIndex(tree_a())
  trace = linearize.merge_paths(tree, [5], 3)
  for seed in range(10):
    text = render.render_trace(tree, trace, linearize.derived_rng(seed, "t"), render.RenderConfig()).text
    gist = render.step_gist(tree.text(1))
    assert gist == "Revisiting the fraction $\\frac{3}{6}$ first; it has a common factor of 3"
    paragraph = next(p for p in text.split("\n\n") if prompts.count_backtracks(p) == 1)
    assert f'"{gist}"' in paragraph and paragraph.startswith(render.Templates().reflection)
    assert text.count("Revisiting the fraction") == 2  # the step itself (defused) and its quote
  # Restart when the LCA is the root.
  trace = linearize.merge_paths(tree, [8], 3)
  text = render.render_trace(tree, trace, linearize.derived_rng(0, "t"), render.RenderConfig()).text
  paragraph = next(p for p in text.split("\n\n") if prompts.count_backtracks(p) == 1)
  assert paragraph.endswith(render.Templates().restart) and '"' not in paragraph


def test_step_gist_quotes_a_first_clause_outside_math():
  assert render.step_gist("First we compute the area. Then the perimeter.") == "First we compute the area"
  long = "We multiply the two numbers $a, b, c, d$ together and then add the remaining value of twelve to it."
  assert render.step_gist(long, 10) == "We multiply the two numbers $a, b, c, d$ together..."
  assert render.step_gist(long, 8) == "We multiply the two numbers..."
  assert render.step_gist("Note that $3.5 + 1 = 4.5$. So x.") == "Note that $3.5 + 1 = 4.5$"
  assert render.step_gist("Let's restart from x = 2, then y.") == "Restarting from x = 2, then y"
  assert render.step_gist('It is "big" and \\boxed{5} wide.') == "It is 'big' and 5 wide"
  assert render.step_gist("") == "the previous step"


def test_boxes_in_steps():
  assert render.unbox("so $\\boxed{\\frac{1}{2}}$ and \\fbox{3}") == "so $\\frac{1}{2}$ and 3"
  assert render.final_answer_step("We get \\boxed{1} or \\boxed{2}.", "2") == "We get 1 or \\boxed{2}."
  assert render.final_answer_step("So it is 9.", "9") == "So it is 9. The final answer is $\\boxed{9}$."
  assert render.defuse_backtracks("Hmm, let me go back. LET US start over.") == "Hmm, going back. Starting over."


def test_positive_reflections_after_high_q_steps():
  chain = with_depths({"id": "C", "problem": "What is $2 + 2 + 2$?", "answer": "6", "nodes": [
      node(0, None, ""), node(1, 0, "Two plus two is four.", q=0.9), node(2, 1, "Four plus two is six.", q=0.95),
      node(3, 2, "So we have six in total.", q=0.85),
      node(4, 3, "The final answer is \\boxed{6}.", q=1.0, terminal=True, answer="6", correct=True)]})
  tree = linearize.TreeIndex(chain)
  trace = linearize.merge_paths(tree, [], 4)
  after = lambda **kw: render._positive_after(tree, trace, render.RenderConfig(**kw))  # noqa: E731
  assert after() == {1}  # the best step over the threshold; not step 3, right before the final answer
  assert after(max_positive_per_segment=2) == {0, 1} and after(q_threshold=0.95) == {1}
  assert after(q_threshold=0.96) == set() and after(max_positive_per_segment=0) == set()
  out = render.render_trace(tree, trace, linearize.derived_rng(0, "x"), render.RenderConfig())
  assert out.n_positive == 2 and prompts.count_reflections(out.text) == 2
  assert out.text.split("\n\n")[2].endswith(render.Templates().positive)  # after "Four plus two is six."
  tree = linearize.TreeIndex(tree_a())
  trace = linearize.merge_paths(tree, [5], 3)  # segments 1-4-5 and 2-3: only step 1 (Q .9, not before a terminal)
  assert render._positive_after(tree, trace, render.RenderConfig()) == {0}
  out = render.render_trace(tree, trace, linearize.derived_rng(0, "x"), render.RenderConfig())
  assert out.n_positive == 2 and prompts.count_reflections(out.text) == 1 + 2
  none = render.render_trace(tree, trace, linearize.derived_rng(0, "x"),
                             render.RenderConfig(max_positive_per_segment=0, positive_final=False))
  assert none.n_positive == 0 and prompts.count_reflections(none.text) == 1


def graft_chain(both_through_b: bool):
  """A tree searched with grafting and M = 2: A's two rollouts are the grafted nodes below it (non-terminals have no
  R of their own, N = the rollouts through a node). Rollouts "B, D, 6" and either "B, E, 6" or "C, 9"."""
  nodes = [node(0, None, ""), node(1, 0, "A: we add three and three."), node(2, 1, "B: three plus three is six."),
           node(3, 2, "D: so we have six."),
           node(4, 3, "The answer is \\boxed{6}.", terminal=True, answer="6", correct=True)]
  if both_through_b:
    nodes += [node(5, 2, "E: six it is."),
              node(6, 5, "The answer is \\boxed{6}.", terminal=True, answer="6", correct=True)]
  else:
    nodes += [node(5, 1, "C: three times three is nine."),
              node(6, 5, "The answer is \\boxed{9}.", terminal=True, answer="9", correct=False)]
  q = [1.0] * 7 if both_through_b else [0.5, 0.5, 1.0, 1.0, 1.0, 0.0, 0.0]  # Q(A) = (1*1 + 0*1) / 2 with C
  for n in nodes:
    n["R"], n["Q"] = float(n["correct"]) if n["terminal"] else None, q[n["id"]]
  nodes[2]["N"] = 2 if both_through_b else 1
  return with_depths({"id": "G", "problem": "What is $3 + 3$?", "answer": "6", "nodes": nodes})


def test_q_samples_by_hand():
  one, both = linearize.TreeIndex(graft_chain(False)), linearize.TreeIndex(graft_chain(True))
  assert [render.q_samples(one, i, rollouts=2) for i in range(1, 7)] == [2, 1, 1, 1, 1, 1]
  assert [render.q_samples(both, i, rollouts=2) for i in range(1, 7)] == [2, 2, 1, 1, 1, 1]
  # Without grafting a non-terminal's own R is M rollouts: node 2 of tree A is 8 + its terminal 3 (N = 1); node 1
  # is 8 + node 2 (9) + node 4 (8 + two terminals) = 27.
  a = linearize.TreeIndex(tree_a())
  assert [render.q_samples(a, i, rollouts=8) for i in (1, 2, 4, 10)] == [27, 9, 10, 18]


def test_positive_reflection_needs_min_visits_samples():
  for both in (False, True):
    tree = linearize.TreeIndex(graft_chain(both))
    trace = linearize.merge_paths(tree, [], 4)  # A, B, D, answer: D is right before the answer (never)
    after = lambda **kw: render._positive_after(tree, trace, render.RenderConfig(**kw))  # noqa: E731
    if not both:  # B's Q = 1 rests on one grafted rollout: no "this holds up" after it; A's Q = 0.5 is too low
      assert after(rollouts=2) == set() and after() == set() and after(rollouts=2, min_visits=2) == set()
      assert after(rollouts=2, min_visits=1) == {1}
      out = render.render_trace(tree, trace, linearize.derived_rng(0, "x"), render.RenderConfig(rollouts=2))
      assert out.n_positive == 1 and out.text.split("\n\n")[2].startswith("D: so we have six")  # only the final
    else:  # both rollouts went through B: A and B rest on 2 = M samples (A first on the tie)
      assert after(rollouts=2) == {0} and after(rollouts=2, max_positive_per_segment=2) == {0, 1}
      assert after(rollouts=2, min_visits=3) == set() and after() == set()  # default M = 16 > 2 samples
  tree = linearize.TreeIndex(tree_a())  # without grafting every non-terminal rests on >= M samples (its own R)
  trace = linearize.merge_paths(tree, [5], 3)
  assert render._positive_after(tree, trace, render.RenderConfig()) == {0}
  assert render._positive_after(tree, trace, render.RenderConfig(rollouts=8, min_visits=28)) == set()  # 27 < 28


def test_template_combinations_count_once():
  t = render.Templates()
  for q, neg, jump in itertools.product(t.reflection, t.negative, t.backtrack + t.restart):
    block = f"{q} {neg} {jump.replace('{step}', 'we add the numbers')}"
    assert prompts.count_backtracks(block) == 1 and prompts.count_reflections(block) == 1, block
  for q, pos in itertools.product(t.reflection, t.positive):
    assert prompts.count_backtracks(f"{q} {pos}") == 0 and prompts.count_reflections(f"{q} {pos}") == 1


def test_templates_are_validated():
  with pytest.raises(ValueError, match="restart"):
    render.Templates.from_config({"restart": ["Now from the top."]})
  with pytest.raises(ValueError, match="positive"):
    render.Templates.from_config({"positive": ["Fine, let's go back later."]})
  with pytest.raises(ValueError, match="box"):
    render.Templates.from_config({"negative": ["Not \\boxed{1}."]})
  with pytest.raises(ValueError, match="step"):
    render.Templates.from_config({"backtrack": ["Let's go back."]})
  custom = render.Templates.from_config({"positive": ["Good."]})
  assert custom.positive == ("Good.",) and custom.restart == render.Templates().restart


def test_rewrite_hook_cannot_break_the_invariants():
  calls = []

  def rewrite(context: str, step: str) -> str:
    calls.append(context)
    return f"Let me restart. {step} \\boxed{{42}}"

  sft, direct = rows(tree_a(), rewrite=rewrite)
  assert calls and calls[0] == ""
  for r in sft + direct:
    text = r["messages"][1]["content"]
    assert prompts.count_backtracks(text) == r["k"] and len(boxed(text)) == r["k"] + 1
    assert real_equal(verifier.extract_answer(text), "\\frac{1}{2}") and "Restarting." in text
  prompt = render.rewrite_prompt("We add.", "so 2+2=4 \\boxed{4}")
  assert prompt.endswith("Text so far:\nWe add.\n\nStep:\nso 2+2=4 \\boxed{4}\n\nEdited step:\n")
  assert "\\boxed{55}" in prompt and "{" + "context}" not in prompt
  assert "{problem}" in linearize.SELF_EVAL_PROMPT and "{solution}" in linearize.SELF_EVAL_PROMPT


def test_custom_user_prompt():
  sft, direct = rows(tree_single(), user_prompt=lambda p: f"Q: {p}")
  assert {r["messages"][0]["content"] for r in sft + direct} == {"Q: What is $2 \\times 2$?"}
  assert [r["id"] for r in sft] == ["S/sft-0", "S/sft-1"] and [r["id"] for r in direct] == ["S/direct-0", "S/direct-1"]
