"""The RL pre-filter on a CPU: pass rates of the real SmolLM2-135M-Instruct on configs/data/easy_arith.jsonl.

  python -m astro_jax.main --config=configs/difficulty_smollm2.py [--config.output_dir=OUT]

Measured (3.0 min wall on 2 CPU cores shared with other jobs, 2.8 min of it sampling incl. compilation; a rerun
that finds every problem done only re-derives prompts.jsonl / summary.json, ~13 s): of the 12 problems 8 are kept
(0 < pass rate < 1: easy/0, 1, 2, 4, 5, 6, 9, 10), 4 are too hard (0 of 8 right), none too easy; n_correct
histogram 0/8: 4, 1/8: 5, 2/8: 2, 3/8: 1, 4/8-8/8: 0; mean pass rate 0.125 (pass@8 0.667, maj@8 0.333); 26% of
responses have no final answer, 26% are cut at the 128-token budget (at 192 tokens: 7% cut, mean pass rate 0.135,
the same 8 + 4 split), 92 tokens per response on average. That matches configs/mcts_smollm2.py's measurement (15%
right, 8 of 12 solved by one of 8 samples).
* Prompt and sampling as configs/rl_smollm2.py samples (the estimate is of the RL run's own sampling): the
  search's one-example prompt (search.policy EXAMPLE_PROBLEM / EXAMPLE_SOLUTION, the ASTRO instruction; SmolLM2
  writes \\boxed{} only after a worked example; rl's defaults are zero-shot), T = 0.7 (T = 1.0 makes this model's
  arithmetic mostly noise), 128 new tokens. An rl run on the kept prompts must use the same prompt.* and sampling.*.
* n = 8 samples per problem: our choice. The paper gives no number (§3.2 only says RL uses "moderately difficult"
  prompts; how they were picked is not stated).
* batch_size 96: all 12 x 8 rows in one sampler call.
"""
import os

from astro_jax import stages
from astro_jax.search.policy import EXAMPLE_PROBLEM, EXAMPLE_SOLUTION


def get_config():
  c = stages.defaults("difficulty")
  c.checkpoint = "asset:smollm2"
  c.input = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "easy_arith.jsonl")
  c.output_dir = "outputs/difficulty_smollm2"
  c.samples = 8
  c.batch_size = 96
  c.sampling.temperature = 0.7
  c.sampling.max_new_tokens = 128
  c.prompt.example_problem = EXAMPLE_PROBLEM
  c.prompt.example_solution = EXAMPLE_SOLUTION
  return c
