"""ASTRO vs Direct at small scale (issue 22): one replicate of both arms per run, the search shared.

  python -m astro_jax.main --config=experiments/astro_vs_direct/config.py --config.seed=N     # N = 0, 1, 2

Design, sizes and the reasons for them: README.md beside this file (written before any run). The first run
(any seed) searches the train problems and evaluates the base model; every run then fine-tunes, filters, trains
and evaluates both arms under outputs/astro_vs_direct/<arm>/seed<N>/ with every seed of those stages N. Each stage
resumes, so a run may be killed and rerun with the same command.
* Data (tools/make_arith.py --out experiments/astro_vs_direct/data --train 48 --test 50 --levels 1,2,3,4 --seed 0):
  192 train problems (search and RL prompt pool), 200 test problems (every eval); test_curve.jsonl is every 4th test
  problem (50, all levels), the RL stage's in-run eval.
* Equal budgets: both arms take the same SFT steps x rows x seq_len, the same difficulty filter, RL steps, prompts,
  group size, sampling and optimizer, and the same eval.
* Sizes marked PILOT are provisional: the pilot (seed 0, 2 RL steps) fixes them, and README.md records the change
  before the seeds run.
"""
import os

from astro_jax import stages

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config():
  c = stages.defaults("pipeline")
  c.checkpoint = "asset:smollm2"
  c.problems = os.path.join(_DATA, "train.jsonl")
  c.test = os.path.join(_DATA, "test.jsonl")
  c.arms = "astro,direct"
  c.seed = 0
  c.output_dir = "outputs/astro_vs_direct"

  m = c.mcts  # shared by every replicate
  m.batch_problems = 64
  m.search.k = 3
  m.search.rollouts = 2
  m.search.iterations = 4
  m.search.max_depth = 6
  m.search.graft_rollouts = True
  m.search.temperature = 0.7
  m.search.step_max_tokens = 64
  m.search.rollout_max_tokens = 128
  m.self_eval.enabled = False

  s = c.sft  # the same steps for both arms (the ASTRO traces' 2 epochs: PILOT)
  s.seq_len = 512
  s.batch_size = 4
  s.steps = 60
  s.save_every = 20
  s.keep = 1
  s.async_checkpoint = False
  s.optimizer.lr = 3e-5
  s.optimizer.warmup_fraction = 0.1

  d = c.difficulty  # the paper's band: solved by some samples, not all (keep_below: PILOT)
  d.samples = 4
  d.batch_size = 64
  d.sampling.temperature = 0.7
  d.sampling.max_new_tokens = 128

  r = c.rl  # configs/rl_smollm2.py at 20 steps x 4 prompts x G = 8
  r.steps = 20
  r.batch_prompts = 4
  r.group_size = 8
  r.max_prompt_tokens = 320  # the longest train prompt (level 4) is 261 tokens
  r.loss_chunk = 384
  r.train_tokens = 1344  # a group's prompt once + its 8 responses a row
  r.model.remat = "full"
  r.dynamic_sampling = True
  r.max_sampling_rounds = 3
  r.save_every = 5
  r.keep = 1
  r.async_checkpoint = False
  r.sampler.max_batch = 32
  r.sampling.temperature = 0.7
  r.sampling.max_new_tokens = 128
  r.optimizer.lr = 1e-5
  r.optimizer.schedule = "constant"
  r.eval.every = 5
  r.eval.benchmarks = os.path.join(_DATA, "test_curve.jsonl")
  r.eval.samples = 4
  r.eval.temperature = 0.7
  r.eval.top_p = 1.0
  r.eval.max_new_tokens = 192

  e = c.eval  # every model the same: 200 problems x 8 samples
  e.samples = 8
  e.batch_size = 64
  e.sampling.temperature = 0.7
  e.sampling.top_p = 1.0
  e.sampling.max_new_tokens = 192
  return c
