"""RL on a CPU: the real SmolLM2-135M-Instruct, GRPO-style, on one/two-step arithmetic word problems.

  python -m astro_jax.main --config=configs/rl_smollm2.py [--config.output_dir=OUT --config.steps=N ...]

The paper's RL recipe (§3.2: reward +1 / -1, G = 4 responses per prompt) at smoke-test size for 2 CPU cores. Every
value is the stage default scaled down, for these reasons:
* Prompts: configs/data/easy_arith.jsonl (12 problems at this model's level: with the one-example prompt it gets
  ~15% of samples right at T = 0.7, so groups of 4 often carry signal). The worked example is an earlier chat turn
  (the same prompt as configs/mcts_smollm2.py): zero-shot this model never writes \\boxed{}. In the real pipeline
  the SFT model has learned the format and the prompt is zero-shot (the stage default).
* Sampling: T = 0.7 (T = 1 makes this model's arithmetic mostly noise), top-p 1 (the sampler's log-probs are then
  the trainer's: the importance ratio starts at 1), 128 new tokens (its solutions are 2-4 sentences).
* Batch: 4 prompts x 4 responses = 16 responses a step, one update (on-policy); dynamic sampling with up to 3
  rounds of 4 prompts refills groups whose 4 rewards are equal. The update (fwd + remat + bwd of 135M params)
  dominates a CPU step (see benchmarks/rl_step.py for the measured split).
* Optimizer: constant lr 1e-5 (a 135M model takes larger steps than the 1e-6 of big-model recipes), clip 1.0,
  fp32 weights and matmuls (this CPU has no faster bf16 path). remat "full": without it the update's saved
  activations (30 layers x 16 x 384 positions, plus the 49152-entry head's chunks) peaked at 20.7 GiB and the
  process was killed on a 23 GiB machine; with it 9.4 GiB (benchmarks/rl_step.py).
* Measured (benchmarks/results/rl_step.json, 2-core AMD EPYC, idle, 2026-12-05): ~52 s a step after the first
  (~88 s with its compiles): sampling 44% (decoding 16 rows of <= 128 tokens; 35% of the decoded row-steps on rows
  already finished), the update 56%.
* Update layout: train_tokens 704 with share_prompts (the default): each group's prompt once in a row, its 4
  responses after it (a prompt of ~210 tokens + 4 responses of ~110 fill a row): 4 rows of 704 instead of 16 padded
  rows of 384, the same loss and gradients; the update 29.5 s vs 49.7 s padded (0.59x) and 46.8 s packed without
  sharing (rows of 640), on 2 idle EPYC cores (benchmarks/rl_step.py --layouts padded,packed:640,shared:704).
* Checkpoints every 4 steps, written synchronously; no compilation cache.
* A whole run (8 steps, 2-core AMD EPYC, idle; padded rows, before issue 20): 16 min; accuracy over each step's 16-48 samples 0.08, 0.19, 0.19,
  0.13, 0.19, 0.16, 0.25, 0.31 (too few samples to call it a trend), logprob_gap ~3e-6 per token, no clipped
  tokens (one update a step), ~100 s a step after the first (sampling ~30%), HF export in hf/.
"""
import os

from astro_jax import stages
from astro_jax.search import policy

_CONFIGS = os.path.dirname(os.path.abspath(__file__))


def get_config():
  c = stages.defaults("rl")
  c.checkpoint = "asset:smollm2"
  c.prompts = os.path.join(_CONFIGS, "data", "easy_arith.jsonl")
  c.output_dir = "outputs/rl_smollm2"
  c.steps = 8
  c.batch_prompts = 4
  c.group_size = 4
  c.minibatches = 1
  c.max_prompt_tokens = 256
  c.loss_chunk = 384
  c.train_tokens = 704
  c.model.remat = "full"
  c.dynamic_sampling = True
  c.max_sampling_rounds = 3
  c.save_every = 4
  c.keep = 2
  c.async_checkpoint = False
  c.sampler.dtype = "float32"
  c.sampler.max_batch = 16
  c.sampling.temperature = 0.7
  c.sampling.max_new_tokens = 128
  c.prompt.example_problem = policy.EXAMPLE_PROBLEM
  c.prompt.example_solution = policy.EXAMPLE_SOLUTION
  c.optimizer.lr = 1e-5
  c.optimizer.schedule = "constant"
  c.mesh.fsdp = -1
  c.compile_cache_dir = ""
  return c
