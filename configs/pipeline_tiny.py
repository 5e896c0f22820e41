"""The whole pipeline on the toy task (tests; seconds per stage on a CPU): a tiny random Llama, one-digit sums.

  python tools/make_toy_task.py /tmp/toy
  python -m astro_jax.main --config=configs/pipeline_tiny.py --config.checkpoint=/tmp/toy/model \\
      --config.problems=/tmp/toy/train.jsonl --config.test=/tmp/toy/test.jsonl --config.output_dir=/tmp/toy_run

The toy's tokenizer is word-level (digits, "+", "=", one token per boxed answer) and its chat template renders user
turns only, so the prompt is the bare problem (no instruction, no example), a search step is one token, and the SFT
rows train on their prompts alone (the traces' words are not in the vocabulary): every stage runs its real code on
shapes of a few tokens. The search finds correct one-token answers by chance (~1/32 a sample), grafting its
rollouts' paths so a tree has wrong answers to backtrack from; RL is configs/rl_tiny.py, shorter, with Adam's eps at
1e-6: the RL gradient has elements that are zero up to rounding, which eps 1e-8 would turn into whole +-lr steps signed
by the rounding (so runs on other meshes would differ by ~lr); the evals and difficulty sample 8 responses per
problem in 128 rows, as rl does, so their programs are rl's (one compile for all of them).
"""
from astro_jax import stages


def get_config():
  c = stages.defaults("pipeline")
  c.arms = "astro,direct"
  c.prompt.instruction = ""
  c.prompt.example_problem = ""
  c.prompt.example_solution = ""

  m = c.mcts
  m.limit = 12
  m.batch_problems = 12
  m.search.k = 4
  m.search.rollouts = 2
  m.search.iterations = 3
  m.search.max_depth = 3
  m.search.step_max_tokens = 1
  m.search.rollout_max_tokens = 3
  m.search.length_terminal = False
  m.search.graft_rollouts = True
  m.self_eval.enabled = False
  m.verifier.workers = 1

  s = c.sft
  s.batch_size = 8
  s.seq_len = 64
  s.loss_chunk = 32
  s.steps = 8
  s.save_every = 2
  s.keep = 2
  s.async_checkpoint = False
  s.optimizer.lr = 3e-3
  s.optimizer.warmup_fraction = 0.0
  s.optimizer.schedule = "constant"

  d = c.difficulty
  d.samples = 8
  d.batch_size = 128
  d.sampling.max_new_tokens = 1
  d.verifier.workers = 1

  r = c.rl
  r.steps = 6
  r.batch_prompts = 16
  r.group_size = 8
  r.max_prompt_tokens = 8
  r.loss_chunk = 16
  r.save_every = 2
  r.keep = 2
  r.async_checkpoint = False
  r.sampler.max_batch = 128
  r.sampling.max_new_tokens = 1
  r.optimizer.lr = 3e-3
  r.optimizer.eps = 1e-6
  r.verifier.workers = 1

  e = c.eval
  e.samples = 8
  e.batch_size = 128
  e.sampling.max_new_tokens = 1
  e.verifier.workers = 1
  return c
