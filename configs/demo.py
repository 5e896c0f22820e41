"""The whole ASTRO recipe on a CPU: the real SmolLM2-135M-Instruct, the astro arm, a few easy arithmetic problems.

  python -m astro_jax.main --config=configs/demo.py [--config.output_dir=RUN --config.arms=astro,direct ...]

mcts on the train problems -> SFT on the linearized search traces -> eval -> difficulty filter -> RL -> eval, and
the base model's eval, in outputs/demo (layout: astro_jax/stages/pipeline.py; RUN/report.md at the end). Each stage
is sized like its own *_smollm2 config (see those for the measurements behind the values); not yet timed end to end
(the RL stage alone is ~2 min a step on 2 CPU cores).
* Problems: configs/data/easy_arith_train.jsonl (8 of the 12 easy_arith problems) and, held out for every eval,
  configs/data/easy_arith_test.jsonl (the other 4: easy/2, 5, 8, 11).
  TODO: generated level-1/2 problems (astro_jax/datasets/arith.py, `tools/make_arith.py --levels 1,2`) once it lands.
* One prompt for search, difficulty, RL and eval: the pipeline's default, the ASTRO instruction with one worked example
  as an earlier chat turn (SmolLM2 writes \\boxed{} only after one); the SFT rows' user turn is the instruction alone.
* difficulty samples as rl does (T = 0.7, 128 new tokens): its pass rates are of rl's own sampling.
"""
import os

from astro_jax import stages

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config():
  c = stages.defaults("pipeline")
  c.checkpoint = "asset:smollm2"
  c.problems = os.path.join(_DATA, "easy_arith_train.jsonl")
  c.test = os.path.join(_DATA, "easy_arith_test.jsonl")
  c.arms = "astro"
  c.output_dir = "outputs/demo"

  m = c.mcts  # configs/mcts_smollm2.py, on all 8 problems at once
  m.batch_problems = 8
  m.search.k = 4
  m.search.rollouts = 2
  m.search.iterations = 5
  m.search.max_depth = 6
  m.search.graft_rollouts = True
  m.search.temperature = 0.7
  m.search.step_max_tokens = 64
  m.search.rollout_max_tokens = 128
  m.self_eval.enabled = False

  s = c.sft  # configs/sft_smollm2.py
  s.seq_len = 512
  s.batch_size = 2
  s.steps = 16
  s.save_every = 8
  s.keep = 2
  s.async_checkpoint = False
  s.optimizer.lr = 3e-5
  s.optimizer.warmup_fraction = 0.1

  d = c.difficulty  # configs/difficulty_smollm2.py
  d.samples = 8
  d.batch_size = 64
  d.sampling.temperature = 0.7
  d.sampling.max_new_tokens = 128

  r = c.rl  # configs/rl_smollm2.py, 4 steps
  r.steps = 4
  r.batch_prompts = 4
  r.group_size = 4
  r.max_prompt_tokens = 256
  r.loss_chunk = 384
  r.model.remat = "full"
  r.save_every = 2
  r.keep = 2
  r.async_checkpoint = False
  r.sampler.max_batch = 16
  r.sampling.temperature = 0.7
  r.sampling.max_new_tokens = 128
  r.optimizer.lr = 1e-5

  e = c.eval
  e.samples = 4
  e.sampling.max_new_tokens = 256
  return c
