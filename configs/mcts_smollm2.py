"""MCTS on a CPU: the real SmolLM2-135M-Instruct searching a handful of one/two-step arithmetic word problems.

  python -m astro_jax.main --config=configs/mcts_smollm2.py [--config.output_dir=OUT]

Sized to finish in a few minutes on 2 CPU cores (measured: 4.1 min on an idle machine, 3 of the 4 problems solved,
12 sft rows); every value below is the stage default scaled down, for these reasons:
* Problems: configs/data/easy_arith.jsonl, twelve one/two-step word problems written for this project (kept beside
  the configs rather than bundled as a benchmark: they are a smoke-test set, not data). SmolLM2-135M solves almost
  nothing at GSM8K level, and search needs problems where some samples are right: with the one-example prompt it
  gets 15% of samples right on these at T=0.7 (8 of the 12 solved by at least one of 8 samples; measured while
  writing this config), so a small tree finds correct and wrong terminals to linearize. `limit` = 4 keeps it short.
* Search: k=4 proposals, M=2 rollouts, 5 iterations, depth 6. This model's solutions are 2-4 one-sentence steps, so
  depth 6 is no real limit; each round samples <= batch_problems x k = 16 step rows and <= 16 x M = 32 rollout
  rows: one sampler call (one program at batch_size 64) each. Rollouts dominate the time (a batch decodes until its
  longest row stops).
* graft_rollouts on: with so few proposals a tree has few terminals of its own; grafting keeps the rollouts' paths
  (and their correct and wrong final answers) as nodes, so there are wrong answers to backtrack from (measured: 25
  terminals and 9.5 distinct wrong answers per tree with it, docs/smollm2_run/ (3 of 4 solved, 387 s); 4 and 1.2
  without, measured before grafted rollouts were counted once in Q).
* T=0.7 as measured above (T=1.0 makes this model's arithmetic mostly noise); 64 tokens per step and 128 per
  rollout cover a whole solution of this model (its sentences are ~20-40 tokens).
* Self-evaluation off: SmolLM2 rarely ends a vote with "Verdict: Yes/No" (2 of 8 votes on a correct solution were
  parseable within 128 tokens), so an 8-vote unanimous filter would drop every tree. A stronger policy turns it on.
"""
import os

from astro_jax import stages


def get_config():
  c = stages.defaults("mcts")
  c.checkpoint = "asset:smollm2"
  c.input = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "easy_arith.jsonl")
  c.limit = 4
  c.output_dir = "outputs/mcts_smollm2"
  c.batch_problems = 4
  c.batch_size = 64
  c.search.k = 4
  c.search.rollouts = 2
  c.search.iterations = 5
  c.search.max_depth = 6
  c.search.graft_rollouts = True
  c.search.temperature = 0.7
  c.search.step_max_tokens = 64
  c.search.rollout_max_tokens = 128
  c.self_eval.enabled = False
  return c
