"""The README's main command: the whole ASTRO recipe on a CPU, on the real SmolLM2-135M-Instruct.

  python -m astro_jax.main        # this config (main's default); or --config=configs/demo.py [--config.key=value]

mcts on 8 generated arithmetic word problems -> SFT on the linearized search traces -> eval -> difficulty filter ->
RL -> eval, and the base model's eval, in outputs/demo (layout: astro_jax/stages/pipeline.py); it ends by printing
the report's table (outputs/demo/report.html has the rest). Sized to finish in about a quarter of an hour on 2 CPU
cores from a fresh setup (README: the measured time, split by stage and compile vs run).
* Problems: `python tools/make_arith.py --out configs/data/arith_demo --train 4 --test 4 --levels 1,2 --seed 0`:
  4 one-step and 4 two-step problems to search and to RL on, and 8 others held out for every eval.
* One prompt for search, difficulty, RL and eval: the pipeline's default, the ASTRO instruction with one worked example
  as an earlier chat turn (SmolLM2 writes \\boxed{} only after one); the SFT rows' user turn is the instruction alone.
* Shared compiled programs: difficulty, rl and both evals sample 16 rows of <= 128 new tokens at a time, so the
  sampler's programs compiled by the first of them (one cache for the pipeline: compile_cache_dir) serve the rest.
* Each stage's other values as in its *_smollm2 config (the measurements behind them are there), scaled down.
"""
import os

from astro_jax import stages

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arith_demo")


def get_config():
  c = stages.defaults("pipeline")
  c.checkpoint = "asset:smollm2"
  c.problems = os.path.join(_DATA, "train.jsonl")
  c.test = os.path.join(_DATA, "test.jsonl")
  c.arms = "astro"
  c.output_dir = "outputs/demo"

  m = c.mcts  # configs/mcts_smollm2.py, smaller: all 8 problems at once
  m.batch_problems = 8
  m.search.k = 3
  m.search.rollouts = 2
  m.search.iterations = 3
  m.search.max_depth = 5
  m.search.graft_rollouts = True
  m.search.temperature = 0.7
  m.search.step_max_tokens = 64
  m.search.rollout_max_tokens = 128
  m.self_eval.enabled = False

  s = c.sft  # configs/sft_smollm2.py
  s.seq_len = 512
  s.batch_size = 2
  s.steps = 8
  s.save_every = 8
  s.keep = 1
  s.async_checkpoint = False
  s.optimizer.lr = 3e-5
  s.optimizer.warmup_fraction = 0.1

  d = c.difficulty  # configs/difficulty_smollm2.py
  d.samples = 8
  d.batch_size = 16
  d.sampling.temperature = 0.7
  d.sampling.max_new_tokens = 128

  r = c.rl  # configs/rl_smollm2.py, 2 steps
  r.steps = 2
  r.batch_prompts = 4
  r.group_size = 4
  r.max_prompt_tokens = 256
  r.loss_chunk = 384
  r.train_tokens = 704  # a group's prompt once + its 4 responses a row (configs/rl_smollm2.py)
  r.model.remat = "full"
  r.save_every = 2
  r.keep = 1
  r.async_checkpoint = False
  r.sampler.max_batch = 16
  r.sampling.temperature = 0.7
  r.sampling.max_new_tokens = 128
  r.optimizer.lr = 1e-5

  e = c.eval
  e.samples = 4
  e.batch_size = 16
  e.sampling.max_new_tokens = 128
  return c
