"""tools/view_tree.py: the page's structure (checked with html.parser, no browser) and the CLI's errors."""
from __future__ import annotations

import html
import importlib.util
import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from astro_jax.search import render
from astro_jax.search.linearize import TreeIndex
from tests.conftest import with_depths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "view_tree.py")


def _load(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


view_tree = _load("view_tree", TOOL)

EVIL = "Let <script>alert('x')</script> & \"c\" be the cost; then 2c = 8 & c > 3."


def node(i, parent, text, *, n=1, q=0.5, r=0.5, terminal=False, answer=None, correct=None, prior=0.5):
  return {"id": i, "parent": parent, "depth": 0, "text": text, "tokens": [1, 2, 3], "N": n, "Q": q,
          "R": None if parent is None else r, "prior": 1.0 if parent is None else prior, "terminal": terminal,
          "answer": answer, "correct": correct}


def tree_t(tree_id="T"):
  """Gold 4: wrong answers 10 (under the root) and 6 (under node 1), one terminal without an answer, and a correct
  path whose middle step holds markup that must be escaped."""
  return with_depths({"id": tree_id, "problem": "Cookies cost $2 & muffins <b>$3</b>. How many?", "answer": "4",
                      "nodes": [
      node(0, None, "", n=6, q=0.4),
      node(1, 0, "The muffins cost $4 \\times 3 = 12$.", n=4, q=0.6),
      node(2, 1, EVIL, n=2, q=1.0, r=1.0),
      node(3, 2, "The final answer is $\\boxed{4}$.", q=1.0, r=1.0, terminal=True, answer="4", correct=True),
      node(4, 1, "So $c = 6$.", q=0.0, r=0.0),
      node(5, 4, "The final answer is \\boxed{6}.", q=0.0, r=0.0, terminal=True, answer="6", correct=False),
      node(6, 0, "She buys $20 / 2 = 10$ cookies.", n=2, q=0.0, r=0.0),
      node(7, 6, "The answer is \\boxed{10}.", q=0.0, r=0.0, terminal=True, answer="10", correct=False),
      node(8, 6, "The final answer is \\boxed{", q=0.0, r=0.0, terminal=True, answer=None, correct=False),
  ]})


def tree_unsolved():
  return with_depths({"id": "U", "problem": "1 + 1?", "answer": "2", "nodes": [
      node(0, None, "", n=1, q=0.0),
      node(1, 0, "The answer is \\boxed{3}.", q=0.0, r=0.0, terminal=True, answer="3", correct=False)]})


class Page(HTMLParser):
  """Start tags with their attributes, and the text under each element id / class of interest."""

  def __init__(self, text: str):
    super().__init__(convert_charrefs=True)
    self.tags: list[tuple[str, dict[str, str]]] = []
    self.scripts: list[str] = []
    self.cot: list[str] = []
    self._in_script = self._in_cot = 0
    self._depth = 0
    self.feed(text)
    self.close()

  def handle_starttag(self, tag, attrs):
    a = {k: (v or "") for k, v in attrs}
    self.tags.append((tag, a))
    if tag == "script":
      self._in_script = 1
      self.scripts.append("")
    if self._in_cot and tag == "div":
      self._in_cot += 1
    if tag == "div" and "cot" in a.get("class", "").split():
      self._in_cot = 1

  def handle_endtag(self, tag):
    if tag == "script":
      self._in_script = 0
    if self._in_cot and tag == "div":
      self._in_cot -= 1

  def handle_data(self, data):
    if self._in_script:
      self.scripts[-1] += data
    elif self._in_cot:
      self.cot.append(data)

  def with_class(self, cls: str, tag: str | None = None) -> list[dict[str, str]]:
    return [a for t, a in self.tags if cls in a.get("class", "").split() and (tag is None or t == tag)]


def rows_of(record):
  sft, _ = render.tree_rows(record, equal=view_tree.string_equal)
  return sft


def page_of(record, trace=None):
  rows = rows_of(record)
  index = view_tree.pick_row(rows, trace, str(record["id"]))
  return view_tree.build_page({**record, "_line": 1}, rows, index, "test"), rows, index


def cli(*args, cwd=None):
  return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# Page structure
# ---------------------------------------------------------------------------------------------------------------


def test_one_node_element_per_tree_node_with_its_values():
  record = tree_t()
  text, _, _ = page_of(record)
  nodes = Page(text).with_class("node", "g")
  nodes = [a for a in nodes if "data-id" in a]  # the legend's sample glyphs carry no data-id
  assert sorted(int(a["data-id"]) for a in nodes) == [n["id"] for n in record["nodes"]]
  for a in nodes:
    n = record["nodes"][int(a["data-id"])]
    assert int(a["data-n"]) == n["N"] and float(a["data-q"]) == pytest.approx(n["Q"], abs=1e-3)
    assert int(a["data-depth"]) == n["depth"]


def test_terminal_classes():
  text, _, _ = page_of(tree_t())
  page = Page(text)
  ids = lambda cls: sorted(int(a["data-id"]) for a in page.with_class(cls, "g") if "data-id" in a)  # noqa: E731
  assert ids("terminal") == [3, 5, 7, 8]
  assert ids("correct") == [3] and ids("wrong") == [5, 7] and ids("noanswer") == [8]
  assert ids("root") == [0] and ids("inner") == [1, 2, 4, 6]


@pytest.mark.parametrize("trace", [0, 1, 2])
def test_path_highlights_equal_the_trace_events(trace):
  record = tree_t()
  text, rows, index = page_of(record, trace)
  events = rows[index]["events"]
  if trace == 2:  # k = 2: wrong 5 (under node 1), restart, wrong 7, back to node 1 (narrated), to the correct 3
    assert events == [["step", 1], ["step", 4], ["step", 5], ["backtrack", 0], ["step", 6], ["step", 7],
                      ["backtrack", 1], ["step", 2], ["step", 3]]
  page = Page(text)
  marks = sorted((int(a["data-event"]), t, a) for t, a in page.tags if "data-event" in a)
  assert [i for i, _, _ in marks] == list(range(len(events)))
  got = [["step", int(a["data-node"])] if "order-badge" in a["class"] else ["backtrack", int(a["data-to"])]
         for _, _, a in marks]
  assert got == events
  steps = [a for _, _, a in marks if "order-badge" in a["class"]]
  backs = [a for _, _, a in marks if "backtrack" in a["class"].split()]
  assert len(backs) == rows[index]["k"]
  # backtracks start at the wrong terminal just narrated; step badges carry 1, 2, ... (checked via on-path nodes)
  for i, (_, _, a) in enumerate(marks):
    if "backtrack" in a["class"].split():
      assert int(a["data-from"]) == events[i - 1][1] and record["nodes"][int(a["data-from"])]["correct"] is False
  on_path_nodes = sorted(int(a["data-id"]) for a in page.with_class("on-path", "g"))
  assert on_path_nodes == sorted(int(a["data-node"]) for a in steps)  # no node is narrated twice
  on_path_edges = {(int(a["data-from"]), int(a["data-to"])) for a in page.with_class("on-path", "path")}
  assert on_path_edges == {(record["nodes"][n]["parent"], n) for kind, n in events if kind == "step"}
  chips = [a["data-chip-node"] for t, a in page.tags if "data-chip-node" in a]
  assert len(chips) == len(events)


def test_trace_text_present_and_escaped():
  record = tree_t()
  text, rows, index = page_of(record, 0)  # the direct trace runs through the step with markup
  assistant = rows[index]["messages"][1]["content"]
  assert "<script>alert" in assistant
  page = Page(text)
  assert "".join(page.cot).replace("\n", "") == assistant.replace("\n", "")  # every character, once, as text
  assert html.escape(EVIL, quote=True) in text and EVIL not in text
  assert text.count("<script") == 2  # the page's own two: the node data and the code
  assert "&lt;b&gt;$3&lt;/b&gt;" in text  # the problem in the header
  data = json.loads(page.scripts[0])
  assert data["2"]["text"] == EVIL and data["3"]["answer"] == "4"


def test_no_network_references():
  for record in (tree_t(), tree_unsolved()):
    text, _, _ = page_of(record)
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    for tag, attrs in Page(text).tags:
      assert "src" not in attrs, tag
      assert attrs.get("href", "#").startswith("#"), attrs
      assert tag not in ("link", "img", "iframe", "object", "embed"), tag


def test_unsolved_tree_has_no_trace():
  text, rows, index = page_of(tree_unsolved())
  assert rows == [] and index is None
  page = Page(text)
  assert not [a for _, a in page.tags if "data-event" in a] and "No linearized trace" in text
  assert len([a for a in page.with_class("node", "g") if "data-id" in a]) == 2


def test_layout_keeps_nodes_apart():
  record = tree_t()
  index = TreeIndex(record)
  lay = view_tree.Layout(index.nodes, index.children, index.root)
  by_depth: dict[int, list[int]] = {}
  for i in index.nodes:
    by_depth.setdefault(lay.depth[i], []).append(i)
    if index.parent(i) is not None:
      assert lay.y[i] > lay.y[index.parent(i)]
  for ids in by_depth.values():
    ids.sort(key=lay.x.get)
    for a, b in zip(ids, ids[1:]):
      assert lay.x[b] - lay.x[a] >= lay.r[a] + lay.r[b]
  for i in index.nodes:  # a parent is centred over its children
    kids = index.children[i]
    if kids:
      assert lay.x[i] == pytest.approx((lay.x[kids[0]] + lay.x[kids[-1]]) / 2)
  assert lay.r[0] == pytest.approx(view_tree.R_MAX) and lay.r[3] < lay.r[1]  # sized by N


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_uses_sft_beside_trees_and_trace(tmp_path):
  record = tree_t()
  write_jsonl(tmp_path / "trees.jsonl", [tree_unsolved(), record])
  rows = rows_of(record)
  assert [r["kind"] for r in rows][:2] == ["direct", "search"]
  marked = [dict(r, messages=[r["messages"][0], {"role": "assistant", "content": f"ROW {i} " + r["messages"][1]
                                                                                    ["content"]}])
            for i, r in enumerate(rows)]
  write_jsonl(tmp_path / "sft.jsonl", marked)
  out = tmp_path / "t.html"
  p = cli(tmp_path / "trees.jsonl", "--id", "T", "-o", out)
  assert p.returncode == 0, p.stderr
  text = out.read_text()
  assert "ROW 1 " in text and "ROW 0 " not in text  # the first search row, from the file
  assert "T/sft-1" in text
  p = cli(tmp_path / "trees.jsonl", "--id", "T", "--trace", "0", "-o", out)
  assert p.returncode == 0 and "ROW 0 " in out.read_text()
  p = cli(tmp_path / "trees.jsonl", "--list")
  assert p.returncode == 0 and [line.split("\t")[0] for line in p.stdout.splitlines()] == ["U", "T"]
  p = cli(tmp_path / "trees.jsonl")  # no --id: the first tree (unsolved: no trace), to stdout
  assert p.returncode == 0 and "search tree \u00b7 U" in p.stdout and "No linearized trace" in p.stdout


def test_cli_computes_traces_without_sft(tmp_path):
  record = tree_t()
  write_jsonl(tmp_path / "trees.jsonl", [record])
  out = tmp_path / "t.html"
  p = cli(tmp_path / "trees.jsonl", "-o", out)
  assert p.returncode == 0, p.stderr
  row = rows_of(record)[1]
  assert html.escape(row["messages"][1]["content"].split("\n\n")[0]) in out.read_text()
  assert "computed by view_tree" in out.read_text()


def test_docs_example_renders(tmp_path):
  trees = os.path.join(REPO, "docs", "example", "trees.jsonl")
  p = cli(trees, "--id", "maya-cookies", "--trace", "3", "-o", tmp_path / "x.html")
  assert p.returncode == 0, p.stderr
  page = Page((tmp_path / "x.html").read_text())
  assert len([a for a in page.with_class("backtrack", "path") if "data-event" in a]) == 2


def one_line_error(p, *needles):
  assert p.returncode == 2, (p.returncode, p.stderr)
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("view_tree: error: "), p.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def test_cli_missing_file(tmp_path):
  one_line_error(cli(tmp_path / "nope.jsonl"), "no such file", "nope.jsonl")
  write_jsonl(tmp_path / "trees.jsonl", [tree_t()])
  one_line_error(cli(tmp_path / "trees.jsonl", "--sft", tmp_path / "gone.jsonl"), "no such file", "gone.jsonl")


def test_cli_malformed_line(tmp_path):
  path = tmp_path / "trees.jsonl"
  path.write_text(json.dumps(tree_t()) + "\n\n" + '{"id": "B", "nodes": [\n')
  one_line_error(cli(path), f"{path}:3:", "malformed JSON")
  path.write_text(json.dumps({"id": "C", "problem": "x"}) + "\n")
  one_line_error(cli(path), f"{path}:1:", "not a tree record")
  write_jsonl(path, [tree_t()])
  (tmp_path / "sft.jsonl").write_text("not json\n")
  one_line_error(cli(path), "sft.jsonl:1:", "malformed JSON")


def test_cli_unknown_id_and_trace(tmp_path):
  path = tmp_path / "trees.jsonl"
  write_jsonl(path, [tree_t(f"t{i}") for i in range(8)])
  line = one_line_error(cli(path, "--id", "zzz"), "'zzz'", "8 trees", "t0, t1, t2")
  assert "t7" not in line
  one_line_error(cli(path, "--id", "t3", "--trace", "9"), "--trace 9", "out of range")
