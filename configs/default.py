"""The README's demo: greedy generation with the real SmolLM2-135M-Instruct on a few MATH-500 problems (CPU)."""
from astro_jax import stages


def get_config():
  config = stages.defaults("generate")
  config.checkpoint = "asset:smollm2"
  config.num_prompts = 4
  config.sampling.temperature = 0.0
  config.sampling.max_new_tokens = 128
  config.output = "outputs/demo_generate.jsonl"
  return config
