r"""Writes docs/example/trees.jsonl (and sft.jsonl beside it): a hand-made, realistic step-level search tree.

The tree is what a 17-iteration run of `astro_jax.search.mcts` with k <= 3 and M = 8 rollouts could produce on a
one-step word problem: every expanded node's children are listed in expansion order (so ids are creation order),
non-terminal R values are rollout means in eighths, terminals are scored by the verifier, and N / Q follow the
module's definitions exactly (N = 1 + expansions in the subtree, the root's N = iterations; Q by Eq. 4 via
`mcts.backed_up_q`). Priors are the sibling softmax of made-up step log-probs. Token ids are placeholders.

  .venv/bin/python docs/example_tree.py            # then: python tools/view_tree.py docs/example/trees.jsonl ...
"""
from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from astro_jax import verifier  # noqa: E402
from astro_jax.search import render  # noqa: E402
from astro_jax.search.mcts import backed_up_q, sibling_priors  # noqa: E402
from astro_jax.search.tree import Tree  # noqa: E402

PROBLEM = ("Maya buys 4 muffins that cost $3 each and some cookies that cost $2 each. She spends $20 in total. "
           "How many cookies does she buy?")
GOLD = "4"

# (parent, text, rollout mean R for a non-terminal | None for a terminal, answer of a terminal, step log-prob)
EXPANSIONS: list[tuple[int, list[tuple[str, float | None, str | None, float]]]] = [
    (0, [("The 4 muffins cost $4 \\times 3 = 12$ dollars.", 6 / 8, None, -0.21),
         ("Each cookie costs $2, so with $20 she could buy $20 \\div 2 = 10$ cookies.", 1 / 8, None, -0.35),
         ("Let $c$ be the number of cookies. The total cost is $4 + 3 + 2c = 20$.", 2 / 8, None, -0.42)]),
    (1, [("That leaves $20 - 12 = 8$ dollars for the cookies.", 7 / 8, None, -0.18),
         ("With $c$ cookies the total is $12 + 2c = 20$.", 6 / 8, None, -0.30),
         ("So the answer is $\\boxed{12}$.", None, "12", -0.95)]),
    (4, [("Each cookie costs $2, so she buys $8 \\div 2 = 4$ cookies.", 8 / 8, None, -0.15),
         ("She buys $8 \\times 2 = 16$ cookies.", 0 / 8, None, -0.55),
         ("The final answer is $\\boxed{8}$.", None, "8", -0.80)]),
    (7, [("The final answer is $\\boxed{4}$.", None, "4", -0.12),
         ("Check: $4 \\times 3 + 4 \\times 2 = 12 + 8 = 20$, which matches the total.", 8 / 8, None, -0.40)]),
    (2, [("So the answer is $\\boxed{10}$.", None, "10", -0.30),
         ("But the muffins also cost money: $4 \\times 3 = 12$ dollars.", 5 / 8, None, -0.50)]),
    (5, [("Subtracting 12 from both sides gives $2c = 8$.", 8 / 8, None, -0.20),
         ("So $2c = 32$ and $c = 16$.", 0 / 8, None, -0.70)]),
    (3, [("So $2c = 13$, which gives $c = 6.5$.", 0 / 8, None, -0.25),
         ("Wait, the muffins cost $4 \\times 3 = 12$, not $4 + 3$. So $12 + 2c = 20$.", 6 / 8, None, -0.60),
         ("Solving, $7 + 2c = 20$, so $2c = 13$ and $c = \\frac{13}{", None, None, -0.90)]),
    (8, [("The final answer is $\\boxed{16}$.", None, "16", -0.10),
         ("So Maya buys 16 cookies, and the answer is $\\boxed{16}$.", None, "16", -0.33)]),
    (14, [("Then $c = 8 \\div 2 = 4$. The final answer is $\\boxed{4}$.", None, "4", -0.14),
          ("Then $c = 8 - 2 = 6$.", 0 / 8, None, -0.66)]),
    (16, [("She cannot buy half a cookie, so rounding up she buys $\\boxed{7}$.", None, "7", -0.45),
          ("The final answer is $\\boxed{6.5}$.", None, "6.5", -0.20)]),
    (13, [("That leaves $20 - 12 = 8$ dollars, so she buys $8 \\div 2 = 4$ cookies.", 8 / 8, None, -0.17),
          ("So she buys $10 - 4 = 6$ cookies, and the answer is $\\boxed{6}$.", None, "6", -0.48)]),
    (11, [("So the answer is $\\boxed{4}$.", None, "4", -0.09)]),
    (22, [("The final answer is $\\boxed{6}$.", None, "6", -0.11)]),
    (17, [("Subtracting, $2c = 8$, so $c = 4$.", 8 / 8, None, -0.19),
          ("Then $2c = 20 - 12 = 6$, so $c = 3$.", 0 / 8, None, -0.52)]),
    (25, [("The final answer is $\\boxed{4}$.", None, "4", -0.08)]),
    (30, [("The final answer is $\\boxed{3}$.", None, "3", -0.10)]),
    (15, [("The final answer is $\\boxed{16}$.", None, "16", -0.12)]),
]


def build() -> dict:
  tree, rng = Tree.new(), random.Random(0)
  for parent, children in EXPANSIONS:
    assert not tree.terminal[parent] and not tree.children[parent], parent
    tree.expanded[parent] = True
    ids, logprobs = [], []
    for text, r, answer, logprob in children:
      terminal = r is None
      tokens = [rng.randrange(100, 49152) for _ in range(max(2, int(len(text.split()) * 1.6)))]
      node = tree.add(parent, text, tokens, terminal=terminal, answer=answer, logprob=logprob)
      if terminal:
        tree.correct[node] = answer is not None and verifier.compare_answers(answer, GOLD)
        tree.R[node] = float(tree.correct[node])
      else:
        tree.R[node] = r
      ids.append(node)
      logprobs.append(logprob)
    for node, p in zip(ids, sibling_priors(logprobs, "policy")):
      tree.prior[node] = round(p, 4)
  for i in range(1, len(tree)):  # N = 1 + expansions in the subtree; the root's N = the number of iterations
    tree.N[i] = 1 + sum(1 for j in range(len(tree)) if tree.expanded[j] and i in tree.path(j))
  tree.N[0] = sum(tree.expanded)
  for i in reversed(range(len(tree))):
    tree.Q[i] = backed_up_q(tree, i)
  return tree.to_record("maya-cookies", PROBLEM, GOLD)


def main() -> None:
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "example")
  os.makedirs(out, exist_ok=True)
  record = build()
  sft, _ = render.tree_rows(record, equal=verifier.compare_answers)
  with open(os.path.join(out, "trees.jsonl"), "w") as f:
    f.write(json.dumps(record) + "\n")
  with open(os.path.join(out, "sft.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in sft)
  print(f"{len(record['nodes'])} nodes, {len(sft)} sft rows (k = {[r['k'] for r in sft]}) in {out}")


if __name__ == "__main__":
  main()
