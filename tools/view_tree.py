#!/usr/bin/env python3
r"""One search tree of a `trees.jsonl` as a self-contained HTML page (inline CSS, JS and SVG; no network).

  python tools/view_tree.py OUT/trees.jsonl --id ID -o tree.html [--trace N] [--sft PATH] [--equal string|verifier]
  python tools/view_tree.py OUT/trees.jsonl --list

The page shows the tree top-down (a tidy layout computed here), nodes coloured by Q and sized by N, terminals
marked (green check: correct; red cross: wrong; grey dash: no final answer), the linearized trace highlighted
(step numbers along its path, backtracks as dashed arrows from the failed terminal to the step the trace returns
to) and the rendered chain of thought beside it. Clicking a node shows its text, depth, N, Q, R, prior, answer and
verdict; `page.html#node=7` opens with node 7 selected. Drag to pan, wheel to zoom, "fit" to see all.

Which trace: the tree's rows of `sft.jsonl` (beside trees.jsonl, or --sft): by default its first `kind == "search"`
row (else its first row, the direct one); `--trace N` picks the tree's N-th row (0-based, file order). Without an
sft.jsonl the rows are computed with `render.tree_rows` and the default Linearize/Render configs (which may differ
from the run's); answers are grouped by normalised string equality (`verifier.normalize_answer`) unless
`--equal verifier` asks for the verifier's equivalence (slower: a process pool).

Errors (missing file, malformed JSONL or non-UTF-8 text as file:line, unknown id, bad --trace) are one line on
stderr, exit 2.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from typing import Any, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

PROG = "view_tree"
LEVEL_H = 92     # vertical distance between depths
GAP = 14         # least horizontal gap between two nodes' extents
R_MIN, R_MAX = 9.0, 26.0
MARGIN = 48


class UsageError(Exception):
  """A one-line error for the user (exit 2)."""


# ----------------------------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[tuple[int, dict]]:
  """(line number, object) for every non-blank line; UsageError naming file:line on malformed lines (not UTF-8
  text, not JSON, not an object)."""
  from astro_jax.data import decode_line
  if not os.path.isfile(path):
    raise UsageError(f"no such file: {path}")
  out = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        line = decode_line(raw)
      except ValueError as e:
        raise UsageError(f"{path}:{lineno}: {e}") from None
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(obj, dict):
        raise UsageError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
      out.append((lineno, obj))
  return out


def read_trees(path: str) -> list[dict]:
  records = []
  for lineno, rec in read_jsonl(path):
    missing = [k for k in ("id", "problem", "answer", "nodes") if k not in rec]
    if missing or not isinstance(rec["nodes"], list):
      raise UsageError(f"{path}:{lineno}: not a tree record (needs id, problem, answer and a nodes list; "
                       f"missing {', '.join(missing) or 'a nodes list'})")
    for j, n in enumerate(rec["nodes"]):
      if not isinstance(n, dict) or "id" not in n or "parent" not in n:
        raise UsageError(f"{path}:{lineno}: node {j} needs an id and a parent")
    rec["_line"] = lineno
    records.append(rec)
  if not records:
    raise UsageError(f"{path}: no tree records")
  return records


def pick_tree(records: Sequence[dict], tree_id: str | None, path: str) -> dict:
  if tree_id is None:
    return records[0]
  for rec in records:
    if str(rec["id"]) == tree_id:
      return rec
  ids = [str(r["id"]) for r in records]
  shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
  raise UsageError(f"no tree with id {tree_id!r} in {path} ({len(ids)} trees; ids include {shown})")


def string_equal(a: str, b: str) -> bool:
  """Fast answer grouping for the viewer: equal after the verifier's string clean-up."""
  from astro_jax import verifier
  return a.strip() == b.strip() or verifier.normalize_answer(a) == verifier.normalize_answer(b)


def trace_rows(record: dict, trees_path: str, sft_path: str | None, equal: str) -> tuple[list[dict], str]:
  """The tree's sft rows and where they came from."""
  tid = str(record["id"])
  if sft_path is None:
    beside = os.path.join(os.path.dirname(os.path.abspath(trees_path)), "sft.jsonl")
    sft_path = beside if os.path.isfile(beside) else None
  if sft_path is not None:
    rows = [row for _, row in read_jsonl(sft_path) if str(row.get("tree_id")) == tid]
    for row in rows:
      if not isinstance(row.get("events"), list):
        raise UsageError(f"{sft_path}: row {row.get('id')!r} has no events list")
    return rows, os.path.basename(sft_path)
  from astro_jax import verifier
  from astro_jax.search import render
  clean = {k: v for k, v in record.items() if k != "_line"}
  try:
    rows, _ = render.tree_rows(clean, equal=verifier.answers_equal if equal == "verifier" else string_equal)
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f"{trees_path}:{record['_line']}: cannot linearize tree {tid!r}: {e}") from None
  return rows, f"computed by view_tree (default configs, {equal} answer equality)"


def pick_row(rows: Sequence[dict], trace: int | None, tid: str) -> int | None:
  if trace is not None:
    if not 0 <= trace < len(rows):
      raise UsageError(f"--trace {trace} out of range: tree {tid!r} has {len(rows)} trace rows"
                       + (f" (0..{len(rows) - 1})" if rows else ""))
    return trace
  if not rows:
    return None
  return next((i for i, r in enumerate(rows) if r.get("kind") == "search"), 0)


# ----------------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------------


class Layout:
  """A tidy top-down layout: children left to right in id order, each subtree pushed right just far enough that
  its contour clears its left siblings' at every depth, the parent centred over its first and last child."""

  def __init__(self, nodes: dict[int, dict], children: dict[int, list[int]], root: int):
    self.nodes, self.children, self.root = nodes, children, root
    n_max = max(max(float(n.get("N") or 0) for n in nodes.values()), 1.0)
    self.r = {i: R_MIN + (R_MAX - R_MIN) * math.sqrt(max(float(n.get("N") or 0), 0.0) / n_max)
              for i, n in nodes.items()}
    self.half = {i: max(self.r[i], 3.4 * len(self.label(i)) + 2) for i in nodes}  # half-width incl. label
    self.depth: dict[int, int] = {root: 0}
    order, stack = [], [root]
    while stack:  # preorder without recursion
      i = stack.pop()
      order.append(i)
      for c in children[i]:
        self.depth[c] = self.depth[i] + 1
      stack.extend(reversed(children[i]))
    offset: dict[int, float] = {}
    contour: dict[int, dict[int, tuple[float, float]]] = {}
    for i in reversed(order):  # children before parents
      kids = children[i]
      acc: dict[int, tuple[float, float]] = {}
      pos = []
      for c in kids:
        shift = 0.0
        if acc:
          shift = max((acc[d][1] - contour[c][d][0] + GAP for d in contour[c] if d in acc), default=0.0)
        pos.append(shift)
        for d, (lo, hi) in contour.pop(c).items():
          lo, hi = lo + shift, hi + shift
          acc[d] = (min(acc[d][0], lo), max(acc[d][1], hi)) if d in acc else (lo, hi)
      mid = (pos[0] + pos[-1]) / 2 if pos else 0.0
      for c, p in zip(kids, pos):
        offset[c] = p - mid
      mine = {d: (lo - mid, hi - mid) for d, (lo, hi) in acc.items()}
      mine[self.depth[i]] = (-self.half[i], self.half[i])
      contour[i] = mine
    x = {root: 0.0}
    for i in order[1:]:
      x[i] = x[int(nodes[i]["parent"])] + offset[i]
    left = min(lo for lo, _ in contour[root].values())
    self.x = {i: v - left + MARGIN for i, v in x.items()}
    self.y = {i: MARGIN + 20 + self.depth[i] * LEVEL_H for i in nodes}
    self.width = max(hi for _, hi in contour[root].values()) - left + 2 * MARGIN
    self.height = MARGIN * 2 + 40 + max(self.depth.values()) * LEVEL_H

  def label(self, i: int) -> str:
    """Text under a terminal: its answer (shortened), or "no answer"."""
    n = self.nodes[i]
    if not n.get("terminal"):
      return ""
    a = n.get("answer")
    if a is None or not str(a).strip():
      return ""  # the grey dash says it
    a = " ".join(str(a).split())
    return a if len(a) <= 12 else a[:11] + "\u2026"


# ----------------------------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------------------------

Q_STOPS = [(0.0, (238, 244, 251)), (0.25, (198, 219, 239)), (0.5, (107, 174, 214)), (0.75, (33, 113, 181)),
           (1.0, (8, 48, 107))]


def q_colour(q: float) -> str:
  q = min(max(q, 0.0), 1.0)
  for (a, ca), (b, cb) in zip(Q_STOPS, Q_STOPS[1:]):
    if q <= b:
      t = (q - a) / (b - a)
      return "#%02x%02x%02x" % tuple(round(x + (y - x) * t) for x, y in zip(ca, cb))
  return "#%02x%02x%02x" % Q_STOPS[-1][1]


def esc(s: Any) -> str:
  return html.escape(str(s), quote=True)


def fmt(v: Any) -> str:
  if v is None:
    return "null"
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    return f"{v:.3f}".rstrip("0").rstrip(".") if v == v else "nan"
  return str(v)


def script_json(obj: Any) -> str:
  """JSON safe inside a <script> element (no `<`, `>`, `&` characters)."""
  return (json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
          .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def terminal_kind(n: dict) -> str | None:
  if not n.get("terminal"):
    return None
  if n.get("correct") is True:
    return "correct"
  return "wrong" if n.get("answer") is not None and str(n.get("answer")).strip() else "noanswer"


def _events(row: dict | None, nodes: dict[int, dict], children: dict[int, list[int]], root: int) -> list[tuple]:
  """Validated events as ("step", node, number) / ("backtrack", failed, to, number)."""
  if row is None:
    return []
  out, at, steps, backs = [], root, 0, 0
  for e in row["events"]:
    if not (isinstance(e, list) and len(e) == 2 and e[0] in ("step", "backtrack") and isinstance(e[1], int)
            and e[1] in nodes):
      raise UsageError(f"trace row {row.get('id')!r}: bad event {e!r} (want [\"step\"|\"backtrack\", node id])")
    if e[0] == "step":
      if e[1] not in children[at]:
        raise UsageError(f"trace row {row.get('id')!r}: step to node {e[1]} is not a child of node {at}")
      steps += 1
      out.append(("step", e[1], steps))
    else:
      backs += 1
      out.append(("backtrack", at, e[1], backs))
    at = e[1]
  return out


def _cot_html(text: str) -> str:
  """The chain of thought as paragraphs: reflections with a negative verdict (backtracks) and positive ones styled,
  final answers boxed; everything escaped."""
  from astro_jax import prompts
  from astro_jax.search import render
  out = []
  for para in text.split("\n\n"):
    if not para.strip():
      continue
    cls = "p"
    if prompts.count_backtracks(para):
      cls = "p neg"
    elif "are we solving" in para.lower():
      cls = "p pos"
    pieces, pos = [], 0
    for start, end, content in render._box_spans(para):
      pieces += [esc(para[pos:start]), f'<span class="boxed">{esc(para[start:end])}</span>']
      pos = end
    pieces.append(esc(para[pos:]))
    out.append(f'<div class="{cls}">{"".join(pieces)}</div>')
  return "\n".join(out)


def build_page(record: dict, rows: Sequence[dict], row_index: int | None, source: str) -> str:
  from astro_jax.search.linearize import TreeIndex
  clean = {k: v for k, v in record.items() if k != "_line"}
  try:
    index = TreeIndex(clean)
    for i in index.nodes:
      index.path(i)
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f"tree {record['id']!r}: {e}") from None
  nodes, children, root = index.nodes, index.children, index.root
  row = rows[row_index] if row_index is not None else None
  events = _events(row, nodes, children, root)
  lay = Layout(nodes, children, root)
  order: dict[int, list[int]] = {}  # node -> its step numbers (a node recurs when the trace restarts through it)
  for e in events:
    if e[0] == "step":
      order.setdefault(e[1], []).append(e[2])
  path_edges = {(int(nodes[e[1]]["parent"]), e[1]) for e in events if e[0] == "step"}

  svg: list[str] = []
  # edges
  for i in sorted(nodes):
    if i == root:
      continue
    p = int(nodes[i]["parent"])
    x1, y1, x2, y2 = lay.x[p], lay.y[p] + lay.r[p], lay.x[i], lay.y[i] - lay.r[i]
    my = (y1 + y2) / 2
    on = (p, i) in path_edges
    svg.append(f'<path class="edge{" on-path" if on else ""}" data-from="{p}" data-to="{i}" '
               f'd="M{x1:.1f},{y1:.1f} C{x1:.1f},{my:.1f} {x2:.1f},{my:.1f} {x2:.1f},{y2:.1f}"/>')
  # backtrack arrows (their number labels go on top of everything, last)
  labels: list[str] = []
  for ei, e in enumerate(events):
    if e[0] != "backtrack":
      continue
    _, a, b, num = e
    xa, ya, xb, yb = lay.x[a], lay.y[a], lay.x[b], lay.y[b]
    dx, dy = xb - xa, yb - ya
    dist = math.hypot(dx, dy) or 1.0
    side = -1.0 if xa < xb or (xa == xb and a < b) else 1.0  # bulge outward, away from the target's side
    bend = min(0.22 * dist, 120.0) * side
    cx, cy = (xa + xb) / 2 + bend * abs(dy) / dist + 16 * side, (ya + yb) / 2 - bend * dx / dist * 0.2
    sa = _toward(xa, ya, cx, cy, lay.r[a] + 3)
    sb = _toward(xb, yb, cx, cy, lay.r[b] + 7)
    lx, ly = 0.25 * sa[0] + 0.5 * cx + 0.25 * sb[0], 0.25 * sa[1] + 0.5 * cy + 0.25 * sb[1]
    restart = b == root
    svg.append(f'<g class="backtrack-g"><path class="backtrack" data-event="{ei}" data-from="{a}" data-to="{b}" '
               f'data-restart="{str(restart).lower()}" marker-end="url(#arrow)" '
               f'd="M{sa[0]:.1f},{sa[1]:.1f} Q{cx:.1f},{cy:.1f} {sb[0]:.1f},{sb[1]:.1f}">'
               f'<title>{"restart" if restart else "backtrack"} {num}: node {a} \u2192 node {b}</title></path>')
    svg.append("</g>")
    what = "restart" if restart else "backtrack"
    labels.append(f'<g class="bt-label" transform="translate({lx:.1f},{ly:.1f})"><title>{what} {num}: node {a} '
                  f'\u2192 node {b}</title><rect x="-15" y="-9" width="30" height="18" rx="9"/>'
                  f'<text y="4">\u21a9{num}</text></g>')
  # nodes
  for i in sorted(nodes):
    n = nodes[i]
    x, y, r = lay.x[i], lay.y[i], lay.r[i]
    kind = terminal_kind(n)
    q = float(n.get("Q") or 0.0)
    classes = ["node", "root" if i == root else ("terminal " + kind if kind else "inner")]
    if i in order:
      classes.append("on-path")
    attrs = (f'class="{" ".join(classes)}" data-id="{i}" data-n="{esc(fmt(n.get("N")))}" '
             f'data-q="{esc(fmt(n.get("Q")))}" data-r="{esc(fmt(n.get("R")))}" data-depth="{esc(fmt(n.get("depth")))}"'
             f' transform="translate({x:.1f},{y:.1f})"')
    text = " ".join(str(n.get("text") or "").split())
    tip = f"node {i} \u00b7 N={fmt(n.get('N'))} Q={fmt(n.get('Q'))}" + (f"\n{text[:160]}" if text else "")
    parts = [f"<g {attrs}><title>{esc(tip)}</title>"]
    if i in order:
      parts.append(f'<circle class="halo" r="{r + 5:.1f}"/>')
    if kind is None:
      dark = q > 0.55
      parts.append(f'<circle class="body" r="{r:.1f}" fill="{q_colour(q)}"/>')
      parts.append(f'<text class="nid{" light" if dark else ""}" y="3.5">{i}</text>')
    else:
      parts.append(f'<circle class="body" r="{r:.1f}"/>')
      s = r * 0.45
      glyph = {"correct": f"M{-s:.1f},{0.05 * s:.1f} L{-0.3 * s:.1f},{0.7 * s:.1f} L{s:.1f},{-0.6 * s:.1f}",
               "wrong": f"M{-s * .75:.1f},{-s * .75:.1f} L{s * .75:.1f},{s * .75:.1f} M{s * .75:.1f},{-s * .75:.1f} "
                        f"L{-s * .75:.1f},{s * .75:.1f}",
               "noanswer": f"M{-s * .7:.1f},0 L{s * .7:.1f},0"}[kind]
      parts.append(f'<path class="glyph" d="{glyph}"/>')
      parts.append(f'<text class="ans" y="{r + 14:.1f}">{esc(lay.label(i))}</text>')
    if i == root:
      parts.append(f'<text class="rootlbl" y="{-r - 9:.1f}">problem</text>')
    parts.append("</g>")
    svg.append("".join(parts))
  # step numbers along the path
  for ei, e in enumerate(events):
    if e[0] == "step":
      i, num = e[1], e[2]
      bx, by = lay.x[i] + lay.r[i] * 0.78 + 5 + 19 * order[i].index(num), lay.y[i] - lay.r[i] * 0.78 - 5
      svg.append(f'<g class="order-badge" data-event="{ei}" data-node="{i}" transform="translate({bx:.1f},{by:.1f})">'
                 f'<circle r="9"/><text y="3.5">{num}</text></g>')
  svg.extend(labels)

  # side panel pieces
  terms = [i for i in nodes if nodes[i].get("terminal")]
  kinds = [terminal_kind(nodes[i]) for i in terms]
  wrong_answers = {" ".join(str(nodes[i]["answer"]).split()) for i, k in zip(terms, kinds) if k == "wrong"}
  stats = [("nodes", len(nodes)), ("iterations (N root)", fmt(nodes[root].get("N"))),
           ("max depth", max(lay.depth.values())), ("correct terminals", kinds.count("correct")),
           ("wrong terminals", kinds.count("wrong")), ("no answer", kinds.count("noanswer")),
           ("distinct wrong answers", len(wrong_answers))]
  stats_html = "".join(f'<div class="stat"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in stats)
  if row is None:
    trace_head = ('<p class="muted">No linearized trace: the tree has no correct terminal'
                  f' (or no rows for it in {esc(source)}).</p>')
    chips = cot = ""
  else:
    kinds_of = " \u00b7 ".join(f"{j}: {r.get('kind', '?')} k={r.get('k', '?')}" for j, r in enumerate(rows))
    trace_head = (f'<div class="trace-meta"><span class="pill">{esc(row.get("kind", "?"))}</span> '
                  f'<span class="pill">k = {esc(row.get("k", "?"))}</span> '
                  f'<span class="mono">{esc(row.get("id", ""))}</span> &middot; '
                  f'row {row_index} of 0&ndash;{len(rows) - 1} '
                  f'&middot; from {esc(source)}</div><div class="muted small">'
                  f'rows (--trace N): {esc(kinds_of)}</div>')
    chip = []
    for e in events:
      if e[0] == "step":
        kind = terminal_kind(nodes[e[1]])
        chip.append(f'<button class="chip{" " + kind if kind else ""}" data-chip-node="{e[1]}" '
                    f'title="node {e[1]}">{e[2]}</button>')
      else:
        chip.append(f'<button class="chip jump" data-chip-node="{e[2]}" title="{"restart" if e[2] == root else "back"}'
                    f' to node {e[2]}">\u21a9 {e[2]}</button>')
    chips = '<div class="chips">' + "".join(chip) + "</div>"
    assistant = next((m.get("content", "") for m in row.get("messages", []) if m.get("role") == "assistant"), "")
    cot = f'<div class="cot">{_cot_html(str(assistant))}</div>'

  data = {str(i): {"text": str(n.get("text") or ""), "depth": n.get("depth"), "N": n.get("N"), "Q": n.get("Q"),
                   "R": n.get("R"), "prior": n.get("prior"), "terminal": n.get("terminal"),
                   "answer": n.get("answer"), "correct": n.get("correct"), "parent": n.get("parent"),
                   "tokens": len(n.get("tokens") or []) if isinstance(n.get("tokens"), list) else n.get("tokens"),
                   "children": children[i], "path": index.path(i), "order": order.get(i)}
          for i, n in nodes.items()}
  title = f"ASTRO search tree \u00b7 {record['id']}"
  return PAGE.format(
      title=esc(title), tree_id=esc(record["id"]), problem=esc(record["problem"]), gold=esc(record["answer"]),
      stats=stats_html, trace_head=trace_head, chips=chips, cot=cot, width=f"{lay.width:.0f}",
      height=f"{lay.height:.0f}", svg="\n".join(svg), data=script_json(data), css=CSS, js=JS,
      legend=_legend())


def _toward(x: float, y: float, tx: float, ty: float, d: float) -> tuple[float, float]:
  dx, dy = tx - x, ty - y
  L = math.hypot(dx, dy) or 1.0
  return x + dx / L * d, y + dy / L * d


def _legend() -> str:
  stops = "".join(f'<stop offset="{a:.2f}" stop-color="{q_colour(a)}"/>' for a, _ in Q_STOPS)
  return (
      '<svg class="legend-svg" width="760" height="34" viewBox="0 0 760 34">'
      f'<defs><linearGradient id="qgrad">{stops}</linearGradient></defs>'
      '<text x="0" y="21" class="lg-h">Q</text><text x="14" y="21" class="lg-s">0</text>'
      '<rect x="24" y="12" width="90" height="11" rx="3" fill="url(#qgrad)" stroke="#94a3b8" stroke-width=".6"/>'
      '<text x="118" y="21" class="lg-s">1</text>'
      '<text x="146" y="21" class="lg-h">size = N</text>'
      '<circle cx="210" cy="17" r="5" class="lg-c"/><circle cx="228" cy="17" r="8" class="lg-c"/>'
      '<circle cx="252" cy="17" r="11" class="lg-c"/>'
      '<g transform="translate(292,17)" class="node terminal correct lg"><circle class="body" r="8"/>'
      '<path class="glyph" d="M-3.6,0.2 L-1.1,2.8 L3.6,-2.4"/></g><text x="305" y="21" class="lg-s">correct</text>'
      '<g transform="translate(365,17)" class="node terminal wrong lg"><circle class="body" r="8"/>'
      '<path class="glyph" d="M-2.7,-2.7 L2.7,2.7 M2.7,-2.7 L-2.7,2.7"/></g>'
      '<text x="378" y="21" class="lg-s">wrong</text>'
      '<g transform="translate(430,17)" class="node terminal noanswer lg"><circle class="body" r="8"/>'
      '<path class="glyph" d="M-2.6,0 L2.6,0"/></g><text x="443" y="21" class="lg-s">no answer</text>'
      '<line x1="516" y1="17" x2="540" y2="17" class="lg-path"/>'
      '<g class="order-badge lg" transform="translate(552,17)">'
      '<circle r="8"/><text y="3.2">n</text></g><text x="566" y="21" class="lg-s">trace, step n</text>'
      '<path d="M650,24 Q668,4 688,16" class="backtrack" marker-end="url(#arrow)"/>'
      '<text x="696" y="21" class="lg-s">backtrack</text>'
      '</svg>')


CSS = r"""
:root { --path: #f59e0b; --path-dark: #b45309; --ink: #0f172a; --muted: #64748b; --line: #e2e8f0;
  --good: #16a34a; --bad: #dc2626; --none: #9ca3af; --bg: #f8fafc; }
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", sans-serif;
  color: var(--ink); background: var(--bg); display: flex; flex-direction: column; }
header { padding: 10px 18px; background: #0f172a; color: #e2e8f0; display: flex; gap: 18px; align-items: baseline; }
header h1 { font-size: 16px; margin: 0; font-weight: 650; white-space: nowrap; color: #fff; }
header .problem { color: #cbd5e1; flex: 1; min-width: 0; }
header .gold { white-space: nowrap; color: #86efac; }
main { flex: 1; display: flex; min-height: 0; }
#treebox { flex: 1; position: relative; overflow: hidden; background:
  radial-gradient(circle, #e2e8f0 1px, transparent 1px) 0 0 / 22px 22px, #fff; cursor: grab; }
#treebox.dragging { cursor: grabbing; }
#tree { display: block; width: 100%; height: 100%; user-select: none; }
#treecol { flex: 1; display: flex; flex-direction: column; min-width: 0; }
.legend { display: flex; align-items: center; gap: 16px; padding: 4px 14px; border-top: 1px solid var(--line);
  background: #fff; font-size: 12px; color: var(--muted); flex-wrap: wrap; }
.legend .help { margin-left: auto; }
.tools { position: absolute; right: 12px; top: 12px; display: flex; gap: 6px; }
.tools button { font: inherit; font-size: 13px; border: 1px solid var(--line); background: #fff; border-radius: 8px;
  padding: 3px 10px; cursor: pointer; box-shadow: 0 1px 3px rgba(15,23,42,.08); }
.tools button:hover { background: #f1f5f9; }
aside { width: 500px; max-width: 45vw; border-left: 1px solid var(--line); overflow-y: auto; padding: 14px 16px 30px;
  background: var(--bg); }
section { background: #fff; border: 1px solid var(--line); border-radius: 12px; padding: 12px 14px;
  margin-bottom: 12px; }
section h2 { font-size: 12px; letter-spacing: .06em; text-transform: uppercase; color: var(--muted); margin: 0 0 8px; }
.stats { display: grid; grid-template-columns: repeat(4, 1fr); gap: 6px 10px; }
.stat b { display: block; font-size: 17px; }
.stat span { font-size: 11px; color: var(--muted); }
.muted { color: var(--muted); }
.small { font-size: 12px; }
.mono, .cot, .ntext { font-family: "DejaVu Sans Mono", ui-monospace, Menlo, Consolas, monospace; }
.mono { font-size: 12px; }
.pill { display: inline-block; font-size: 12px; background: #fef3c7; color: var(--path-dark); border-radius: 999px;
  padding: 0 8px; font-weight: 600; }
.trace-meta { margin-bottom: 2px; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; margin: 10px 0; }
.chip { font: 600 12px/1 system-ui, sans-serif; border: 0; border-radius: 999px; min-width: 24px; height: 24px;
  padding: 0 7px; background: var(--path); color: #fff; cursor: pointer; }
.chip.correct { background: var(--good); } .chip.wrong { background: var(--bad); }
.chip.noanswer { background: var(--none); }
.chip.jump { background: #fff; color: var(--path-dark); border: 1.5px dashed var(--path-dark); }
.cot { font-size: 12.5px; line-height: 1.5; }
.cot .p { margin: 0 0 8px; white-space: pre-wrap; overflow-wrap: anywhere; }
.cot .neg { background: #fef2f2; border-left: 3px solid var(--bad); padding: 4px 8px; border-radius: 0 6px 6px 0; }
.cot .pos { background: #f0fdf4; border-left: 3px solid var(--good); padding: 4px 8px; border-radius: 0 6px 6px 0; }
.boxed { border: 1.5px solid var(--ink); border-radius: 4px; padding: 0 3px; font-weight: 600; }
#detail .hint { color: var(--muted); }
#detail table { border-collapse: collapse; width: 100%; margin: 6px 0 8px; font-size: 13px; }
#detail td { padding: 2px 6px 2px 0; vertical-align: top; }
#detail td:first-child { color: var(--muted); width: 90px; }
#detail .ntext { white-space: pre-wrap; overflow-wrap: anywhere; background: #f8fafc; border: 1px solid var(--line);
  border-radius: 8px; padding: 8px 10px; font-size: 12.5px; }
#detail .crumbs a { color: #1d4ed8; cursor: pointer; text-decoration: none; }
#detail .verdict-correct { color: var(--good); font-weight: 600; }
#detail .verdict-wrong { color: var(--bad); font-weight: 600; }
/* tree */
.edge { fill: none; stroke: #cbd5e1; stroke-width: 1.6; }
.edge.on-path { stroke: var(--path); stroke-width: 4.5; stroke-linecap: round; }
.backtrack { fill: none; stroke: var(--path-dark); stroke-width: 2.2; stroke-dasharray: 7 5; }
.bt-label rect { fill: #fff; stroke: var(--path-dark); stroke-width: 1.3; stroke-dasharray: 3 2; }
.bt-label text { font: 600 11px system-ui, sans-serif; fill: var(--path-dark); text-anchor: middle; }
.node { cursor: pointer; }
.node .body { stroke: #475569; stroke-width: 1.2; }
.node.inner .body, .node.root .body { stroke: #1e3a8a; }
.node.root .body { stroke-width: 2; }
.node.correct .body { fill: var(--good); stroke: #14532d; }
.node.wrong .body { fill: var(--bad); stroke: #7f1d1d; }
.node.noanswer .body { fill: #e5e7eb; stroke: var(--none); stroke-dasharray: 3 2; }
.glyph { fill: none; stroke: #fff; stroke-width: 2.6; stroke-linecap: round; stroke-linejoin: round; }
.node.noanswer .glyph { stroke: #6b7280; }
.halo { fill: none; stroke: var(--path); stroke-width: 3.5; }
.nid { font: 600 10px system-ui, sans-serif; text-anchor: middle; fill: #1e293b; pointer-events: none; }
.nid.light { fill: #fff; }
.ans { font: 600 11px "DejaVu Sans Mono", monospace; text-anchor: middle; fill: #334155; }
.node.correct .ans { fill: #15803d; } .node.wrong .ans { fill: #b91c1c; }
.node.noanswer .ans { fill: #6b7280; font-weight: 400; }
.rootlbl { font: 600 11px system-ui, sans-serif; text-anchor: middle; fill: #475569; }
.order-badge circle { fill: var(--path); stroke: #fff; stroke-width: 1.5; }
.order-badge text { font: 700 10px system-ui, sans-serif; fill: #fff; text-anchor: middle; pointer-events: none; }
.order-badge { pointer-events: none; }
.node:hover .body { stroke-width: 2.5; }
.node.selected .body { stroke: #0f172a; stroke-width: 3.2; }
.selring { fill: rgba(15,23,42,.06); stroke: #0f172a; stroke-width: 1.6; stroke-dasharray: 4 3; }
.chip.active { box-shadow: 0 0 0 2px #fff, 0 0 0 4px #0f172a; }
.node.dim, .edge.dim { opacity: .35; }
.lg-h { font: 600 11px system-ui, sans-serif; fill: #334155; }
.lg-s { font: 11px system-ui, sans-serif; fill: #475569; }
.lg-c { fill: #6baed6; stroke: #1e3a8a; stroke-width: 1; }
.lg-path { stroke: var(--path); stroke-width: 4.5; stroke-linecap: round; }
"""

JS = r"""
(function () {
  var DATA = JSON.parse(document.getElementById('tree-data').textContent);
  var box = document.getElementById('treebox'), svg = document.getElementById('tree');
  var vp = document.getElementById('viewport');
  var W = +svg.getAttribute('data-w'), H = +svg.getAttribute('data-h');
  var view = {s: 1, x: 0, y: 0};
  function apply() { vp.setAttribute('transform', 'translate(' + view.x + ',' + view.y + ') scale(' + view.s + ')'); }
  function pos(g) { var t = g.transform.baseVal.consolidate().matrix; return [t.e, t.f]; }
  function frame(x0, y0, x1, y1, smax) {  // show the box [x0,x1] x [y0,y1] (tree units), centred
    var bw = box.clientWidth, bh = box.clientHeight;
    view.s = Math.min(bw / (x1 - x0), bh / (y1 - y0), smax);
    view.x = (bw - (x0 + x1) * view.s) / 2; view.y = Math.max((bh - (y0 + y1) * view.s) / 2, -y0 * view.s);
    apply();
  }
  function fit() { frame(0, 0, W, H, 1.6); }
  function initial() {  // the whole tree when it is legible at that scale, else the trace (and root) at >= 0.6
    if (Math.min(box.clientWidth / W, box.clientHeight / H) >= 0.55) { fit(); return; }
    var pts = [];
    document.querySelectorAll('.node.on-path, .node.root').forEach(function (g) { pts.push(pos(g)); });
    var xs = pts.map(function (p) { return p[0]; }), ys = pts.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs) - 60, x1 = Math.max.apply(null, xs) + 60;
    var y0 = Math.min.apply(null, ys) - 60, y1 = Math.max.apply(null, ys) + 60;
    var s = Math.max(Math.min(box.clientWidth / (x1 - x0), box.clientHeight / (y1 - y0), 1), 0.6);
    var cx = (x0 + x1) / 2, bw = box.clientWidth, bh = box.clientHeight;
    view.s = s; view.x = bw / 2 - cx * s; view.y = Math.max((bh - (y0 + y1) * s) / 2, -y0 * s + 10);
    apply();
  }
  function zoom(f, cx, cy) {
    var s = Math.min(Math.max(view.s * f, 0.1), 5);
    if (cx === undefined) { cx = box.clientWidth / 2; cy = box.clientHeight / 2; }
    view.x = cx - (cx - view.x) * s / view.s; view.y = cy - (cy - view.y) * s / view.s; view.s = s; apply();
  }
  box.addEventListener('wheel', function (ev) {
    ev.preventDefault();
    var r = box.getBoundingClientRect();
    zoom(Math.exp(-ev.deltaY * 0.0015), ev.clientX - r.left, ev.clientY - r.top);
  }, {passive: false});
  var drag = null, moved = false;
  box.addEventListener('mousedown', function (ev) {
    if (ev.target.closest('.tools')) return;
    drag = {x: ev.clientX, y: ev.clientY, vx: view.x, vy: view.y}; moved = false;
  });
  window.addEventListener('mousemove', function (ev) {
    if (!drag) return;
    var dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) { moved = true; box.classList.add('dragging'); }
    view.x = drag.vx + dx; view.y = drag.vy + dy; apply();
  });
  window.addEventListener('mouseup', function () { drag = null; box.classList.remove('dragging'); });
  document.getElementById('zin').onclick = function () { zoom(1.25); };
  document.getElementById('zout').onclick = function () { zoom(0.8); };
  document.getElementById('zfit').onclick = fit;
  document.getElementById('z1').onclick = function () { view.s = 1; view.x = 0; view.y = 0; apply(); };

  function fmt(v) {
    if (v === null || v === undefined) return 'null';
    if (typeof v === 'number' && !Number.isInteger(v)) return String(Math.round(v * 1000) / 1000);
    return String(v);
  }
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text; return e; }
  var detail = document.getElementById('detail-body');
  function select(id, scroll) {
    var n = DATA[id];
    if (!n) return;
    document.querySelectorAll('.node.selected').forEach(function (g) { g.classList.remove('selected'); });
    var g = document.querySelector('.node[data-id="' + id + '"]');
    document.querySelectorAll('.chip.active').forEach(function (c) { c.classList.remove('active'); });
    document.querySelectorAll('[data-chip-node="' + id + '"]').forEach(function (c) { c.classList.add('active'); });
    var old = document.getElementById('selring');
    if (old) old.parentNode.removeChild(old);
    if (g) {
      g.classList.add('selected');
      var ring = document.createElementNS(svg.namespaceURI, 'circle');
      ring.setAttribute('id', 'selring'); ring.setAttribute('class', 'selring');
      ring.setAttribute('r', +g.querySelector('.body').getAttribute('r') + 9);
      g.insertBefore(ring, g.firstChild.nextSibling);
      if (scroll) {
        var p = pos(g), bw = box.clientWidth, bh = box.clientHeight;
        var px = view.x + p[0] * view.s, py = view.y + p[1] * view.s;
        if (px < 40 || px > bw - 40 || py < 40 || py > bh - 40) {
          view.x = bw / 2 - p[0] * view.s; view.y = bh / 2 - p[1] * view.s; apply(); }
      }
    }
    detail.innerHTML = '';
    var head = el('div', 'nhead');
    var kind = n.terminal ? (n.correct === true ? 'correct terminal' : (n.answer ? 'wrong terminal' :
      'terminal without an answer')) : (n.parent === null ? 'root (the problem)' : 'step');
    head.appendChild(el('b', '', 'Node ' + id)); head.appendChild(document.createTextNode(' \u00b7 ' + kind +
      (n.order ? ' \u00b7 trace step ' + n.order.join(', ') : '')));
    detail.appendChild(head);
    var tb = el('table');
    var rows = [['depth', n.depth], ['N', n.N], ['Q', n.Q], ['R', n.R], ['prior', n.prior], ['tokens', n.tokens],
      ['terminal', n.terminal], ['answer', n.answer], ['correct', n.correct], ['children', n.children.length ?
      n.children.join(', ') : 'none']];
    rows.forEach(function (r) {
      var tr = el('tr'); tr.appendChild(el('td', '', r[0]));
      var cls = r[0] === 'correct' && n.terminal ? (n.correct ? 'verdict-correct' : 'verdict-wrong') : '';
      var td = el('td', cls, fmt(r[1]));
      tr.appendChild(td); tb.appendChild(tr);
    });
    detail.appendChild(tb);
    var crumbs = el('div', 'crumbs small'); crumbs.appendChild(el('span', 'muted', 'root path: '));
    n.path.forEach(function (p, j) {
      if (j) crumbs.appendChild(document.createTextNode(' \u203a '));
      var a = el('a', '', String(p)); a.onclick = function () { select(String(p), true); }; crumbs.appendChild(a);
    });
    detail.appendChild(crumbs);
    detail.appendChild(el('div', 'ntext', n.text ||
      (n.parent === null ? '(the root: the problem itself)' : '(empty step)')));
    if (history.replaceState) history.replaceState(null, '', '#node=' + id);
  }
  document.querySelectorAll('.node[data-id]').forEach(function (g) {
    g.addEventListener('click', function (ev) {
      if (!moved) select(g.getAttribute('data-id'), false);
      ev.stopPropagation();
    });
  });
  document.querySelectorAll('[data-chip-node]').forEach(function (b) {
    b.addEventListener('click', function () { select(b.getAttribute('data-chip-node'), true); });
  });
  initial();
  var m = /node=(\d+)/.exec(location.hash);
  if (m) select(m[1], true);
  window.addEventListener('resize', initial);
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header><h1>{title}</h1><div class="problem">{problem}</div><div class="gold">gold answer: <b>{gold}</b></div></header>
<main>
<div id="treecol">
<div id="treebox">
<svg id="tree" data-w="{width}" data-h="{height}" aria-label="search tree {tree_id}">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="8" refY="5" markerWidth="7" markerHeight="7"
orient="auto-start-reverse">
<path d="M0,0 L10,5 L0,10 z" fill="#b45309"/></marker></defs>
<g id="viewport">
{svg}
</g>
</svg>
<div class="tools"><button id="zin" title="zoom in">+</button><button id="zout" title="zoom out">&minus;</button>
<button id="zfit" title="fit the tree">fit</button><button id="z1" title="actual size">1:1</button></div>
</div>
<div class="legend">{legend}<span class="help">drag to pan &middot; wheel to zoom &middot; click a node</span></div>
</div>
<aside>
<section id="stats"><h2>Tree</h2><div class="stats">{stats}</div></section>
<section id="detail"><h2>Selected node</h2><div id="detail-body"><p class="hint">Click a node to see its step text,
depth, N, Q, R, prior, answer and verdict.</p></div></section>
<section id="trace"><h2>Linearized trace &amp; chain of thought</h2>{trace_head}{chips}{cot}</section>
</aside>
</main>
<script type="application/json" id="tree-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog=PROG, description="One search tree of a trees.jsonl as a self-contained HTML page.")
  ap.add_argument("trees", help="trees.jsonl written by the mcts stage")
  ap.add_argument("--id", help="the tree's id (default: the first tree)")
  ap.add_argument("-o", "--output", default="-", help="output HTML file (default: stdout)")
  ap.add_argument("--trace", type=int, help="which of the tree's sft rows to show (0-based; default: first search row)")
  ap.add_argument("--sft", help="sft.jsonl to take the trace from (default: the one beside trees.jsonl, if any)")
  ap.add_argument("--equal", choices=("string", "verifier"), default="string",
                  help="answer equality when computing traces without an sft.jsonl (default: string)")
  ap.add_argument("--list", action="store_true", help="list the trees (id, nodes, correct/wrong terminals) and exit")
  args = ap.parse_args(argv)
  try:
    records = read_trees(args.trees)
    if args.list:
      for rec in records:
        nodes = rec["nodes"]
        good = sum(1 for n in nodes if n.get("terminal") and n.get("correct") is True)
        bad = sum(1 for n in nodes if n.get("terminal") and n.get("correct") is not True)
        print(f"{rec['id']}\t{len(nodes)} nodes\t{good} correct\t{bad} wrong terminals")
      return 0
    record = pick_tree(records, args.id, args.trees)
    if args.sft is not None and not os.path.isfile(args.sft):
      raise UsageError(f"no such file: {args.sft}")
    rows, source = trace_rows(record, args.trees, args.sft, args.equal)
    row_index = pick_row(rows, args.trace, str(record["id"]))
    page = build_page(record, rows, row_index, source)
    if args.output == "-":
      sys.stdout.write(page)
    else:
      with open(args.output, "w", encoding="utf-8") as f:
        f.write(page)
      print(f"wrote {args.output} (tree {record['id']}, {len(record['nodes'])} nodes, "
            f"trace {'none' if row_index is None else row_index})", file=sys.stderr)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"{PROG}: error: {e.strerror}: {e.filename}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
