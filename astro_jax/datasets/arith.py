r"""Arithmetic word problems of 1-4 steps: problems a small model can learn on, in a seeded train/test split.

  python tools/make_arith.py --out DIR --train 2000 --test 200 --levels 1,2,3,4 --seed 0

A level-k problem starts from one quantity and applies k operations (+, -, x, /), one sentence each, then asks for
the result. Every intermediate result is a whole number >= 1 (no remainders, nothing negative). Sentences come
from several templates per operation, two domains (countable objects with their containers; dollars), and lists of
names. Rows: id (`arith/L<k>/<split>/<index>`, e.g. arith/L2/train/00017), problem, answer (the integer, as text),
level (k), expression (the computation with the numbers in the order the text gives them, e.g. "((3 * 4) - 3)":
what the tests check the answer and the text against). Every stage reads them (`data.load_jsonl`: `level` is a
`Problem` field, `expression` lands in `Problem.extra`).

Each level draws from its own stream, seeded by (seed, level): a level's problems do not depend on which other
levels are made. The test problems are drawn first, then the train problems, so the test set does not change with
the train size. No problem text occurs twice, in or across the splits (nor any text in `exclude`).

Measured with the difficulty stage as configs/difficulty_smollm2.py runs it (the real SmolLM2-135M-Instruct, one
worked example, T = 0.7, 8 samples of <= 128 new tokens per problem) on the first 24 test problems per level of
seed 0: mean pass rate 0.057 at level 1 (11 of 192 samples right, 8 of 24 problems solved by some sample), 0.026 at
level 2 (5 / 192, 5 problems), 0.010 at level 3 (2 / 192, 2), 0.000 at level 4 (0 / 192); 17.4 min of wall time on
2 shared vCPUs of an AMD EPYC (Zen 4). See README "Problems to learn on".
"""
from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Iterator

LEVELS = (1, 2, 3, 4)
SPLITS = ("train", "test")

NAMES = (("Sam", "he"), ("Mia", "she"), ("Ben", "he"), ("Lily", "she"), ("Tom", "he"), ("Anna", "she"),
         ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Emma", "she"), ("Omar", "he"), ("Nina", "she"),
         ("Raj", "he"), ("Lucy", "she"), ("Ivan", "he"), ("Sara", "she"), ("Kai", "he"), ("Ava", "she"))
# countable objects and what holds several of them (the "x" opening: 3 bags with 4 marbles in each)
OBJECTS = (("marbles", "bags"), ("stickers", "sheets"), ("apples", "baskets"), ("pencils", "boxes"),
           ("cards", "packs"), ("coins", "jars"), ("shells", "buckets"), ("stamps", "albums"), ("beads", "strings"),
           ("cookies", "trays"), ("eggs", "cartons"), ("flowers", "vases"))
THINGS = ("book", "toy", "ticket", "lunch", "game", "hat")

# Per domain: the opening (a quantity; "x" fuses the opening with a first multiplication), one sentence per
# operation, the question. Fields: {n} name, {S} name or He/She, {o} his/her, {f} another name,
# {obj} objects, {c} containers, {t} a thing to buy, {a} the opening number, {x} the operand.
TEMPLATES = {
    "items": {
        "start": ("{n} has {a} {obj}.", "{n} starts with {a} {obj}.", "{n} collects {a} {obj}."),
        "x_start": ("{n} has {a} {c} with {x} {obj} in each.", "{n} buys {a} {c} of {obj}, and each holds {x} {obj}.",
                    "{n} fills {a} {c} with {x} {obj} each."),
        "+": ("{S} then buys {x} more {obj}.", "{S} then finds {x} more {obj}.", "Then {f} gives {n} {x} more {obj}.",
              "{S} then wins {x} more {obj} in a game."),
        "-": ("{S} then gives {x} {obj} to {f}.", "{S} then loses {x} {obj}.", "{S} then sells {x} of the {obj}.",
              "Then {f} takes {x} of {o} {obj}."),
        "*": ("{S} then ends up with {x} times as many {obj} as before.",
              "After a trade, {n} has {x} times as many {obj} as before.",
              "Then the number of {obj} {n} has becomes {x} times as large."),
        "/": ("{S} then splits the {obj} into {x} equal piles and keeps only one pile.",
              "{S} then shares the {obj} equally among {x} children, {n} included, and keeps {o} share.",
              "{S} then packs the {obj} equally into {x} boxes and keeps only one box."),
        "question": ("How many {obj} does {n} have now?", "How many {obj} does {n} have at the end?",
                     "How many {obj} does {n} end up with?"),
    },
    "money": {
        "start": ("{n} has {a} dollars.", "{n} has saved {a} dollars.", "{n}'s wallet holds {a} dollars."),
        "x_start": ("{n} works {a} hours and earns {x} dollars each hour.",
                    "{n} sells {a} cups of lemonade for {x} dollars each.",
                    "{n} mows {a} lawns and is paid {x} dollars for each."),
        "+": ("{S} then earns {x} more dollars.", "Then {f} gives {n} {x} dollars.",
              "{S} then saves {x} more dollars."),
        "-": ("{S} then spends {x} dollars on a {t}.", "{S} then pays {x} dollars for a {t}.",
              "{S} then gives {x} dollars to {f}."),
        "*": ("After a month, {n} has {x} times as many dollars as before.",
              "Then {o} money grows to {x} times as much.",
              "{S} then ends up with {x} times as many dollars as before."),
        "/": ("{S} then splits the money equally into {x} envelopes and keeps only one envelope.",
              "{S} then shares the money equally among {x} people, {n} included, and keeps {o} share.",
              "Then {n} keeps only one of {x} equal parts of the money."),
        "question": ("How many dollars does {n} have now?", "How many dollars does {n} have at the end?",
                     "How much money, in dollars, does {n} have in the end?"),
    },
}
OPS = ("+", "-", "*", "/")
MAX_VALUE = 200    # no intermediate result above this
MAX_ADDEND = 20    # + and - operands are 2-20, x operands 2-5, / operands 2-10


@dataclasses.dataclass(frozen=True)
class ArithProblem:
  problem: str
  answer: int
  level: int
  expression: str  # e.g. "((3 * 4) - 3)": the numbers in the text's order

  def row(self, split: str, index: int) -> dict:
    return {"id": f"arith/L{self.level}/{split}/{index:05d}", "problem": self.problem, "answer": str(self.answer),
            "level": self.level, "expression": self.expression}


def _operand(rng: random.Random, op: str, value: int) -> int | None:
  """An operand for `value op x` with a whole result in [1, MAX_VALUE], or None if there is none."""
  if op == "+":
    top = min(MAX_ADDEND, MAX_VALUE - value)
    return rng.randint(2, top) if top >= 2 else None
  if op == "-":
    top = min(MAX_ADDEND, value - 1)
    return rng.randint(2, top) if top >= 2 else None
  if op == "*":
    choices = [x for x in range(2, 6) if value * x <= MAX_VALUE]
  else:
    choices = [x for x in range(2, 11) if value % x == 0]
  return rng.choice(choices) if choices else None


def generate_one(rng: random.Random, level: int) -> ArithProblem:
  """One problem of `level` operations, drawn from `rng`."""
  if level < 1:
    raise ValueError(f"level must be >= 1, got {level}")
  domain = rng.choice(sorted(TEMPLATES))
  T = TEMPLATES[domain]
  (name, he), friend = rng.choice(NAMES), None
  while friend is None or friend == name:
    friend = rng.choice(NAMES)[0]
  obj, container = rng.choice(OBJECTS)
  his = "his" if he == "he" else "her"
  fields = {"n": name, "o": his, "f": friend, "obj": obj, "c": container,
            "t": rng.choice(THINGS)}
  value = rng.randint(2, MAX_ADDEND)
  expression, sentences = str(value), []
  first = True
  for _ in range(level):
    while True:  # an operation that keeps the result whole and in range
      op = rng.choice(OPS)
      x = _operand(rng, op, value)
      if x is not None:
        break
    subject = name if rng.random() < 0.5 else he.capitalize()
    if first and op == "*" and rng.random() < 0.5:  # "3 bags with 4 marbles in each": opening and x in one sentence
      sentences.append(rng.choice(T["x_start"]).format(**fields, a=value, x=x, S=subject))
    else:
      if first:
        sentences.append(rng.choice(T["start"]).format(**fields, a=value))
      sentences.append(rng.choice(T[op]).format(**fields, x=x, S=subject))
    first = False
    value = {"+": value + x, "-": value - x, "*": value * x, "/": value // x}[op]
    expression = f"({expression} {op} {x})"
  sentences.append(rng.choice(T["question"]).format(**fields))
  return ArithProblem(" ".join(sentences), value, level, expression)


def level_stream(seed: int, level: int) -> Iterator[ArithProblem]:
  """Problems of one level, forever, from a stream seeded by (seed, level) only."""
  rng = random.Random(f"arith/{seed}/{level}")
  while True:
    yield generate_one(rng, level)


def make_split(n_train: int, n_test: int, levels: Iterable[int] = LEVELS, seed: int = 0,
               exclude: Iterable[str] = (), max_tries: int = 100) -> dict[str, list[dict]]:
  """{"train": rows, "test": rows}: n_train and n_test problems per level, levels in order, no text twice (in or
  across splits, nor any of `exclude`). ValueError if a level cannot give that many distinct problems."""
  seen = set(exclude)
  out: dict[str, list[dict]] = {"train": [], "test": []}
  for level in levels:
    stream = level_stream(seed, level)
    for split, n in (("test", n_test), ("train", n_train)):  # test first: it does not depend on n_train
      for index in range(n):
        for _ in range(max_tries):
          p = next(stream)
          if p.problem not in seen:
            break
        else:
          raise ValueError(f"level {level}: no new problem text in {max_tries} draws after {len(seen)} problems")
        seen.add(p.problem)
        out[split].append(p.row(split, index))
  return out
