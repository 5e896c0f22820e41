"""RL of a tiny random model on CPU (tests; the toy task of tools/make_toy_task.py):

  python tools/make_toy_task.py /tmp/toy
  python -m astro_jax.main --config=configs/rl_tiny.py --config.checkpoint=/tmp/toy/model \
      --config.prompts=/tmp/toy/prompts.jsonl --config.output_dir=/tmp/toy_rl

A response is one token (the boxed answer), so a step is one prefill + one decode of 16 x 8 rows and one update:
well under a second after the first step's compiles. Adam at 3e-3 moves a 2-layer model of width 64 within steps.
"""
from astro_jax import stages


def get_config():
  c = stages.defaults("rl")
  c.steps = 30
  c.batch_prompts = 16
  c.group_size = 8
  c.max_prompt_tokens = 8
  c.loss_chunk = 16
  c.max_sampling_rounds = 3
  c.save_every = 10
  c.export_hf = False
  c.sampler.max_batch = 128
  c.sampling.max_new_tokens = 1
  c.sampling.temperature = 1.0
  c.prompt.instruction = ""
  c.optimizer.lr = 3e-3
  c.optimizer.clip_norm = 1.0
  c.verifier.workers = 1
  c.mesh.fsdp = -1
  c.compile_cache_dir = ""
  return c
