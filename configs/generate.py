"""Sampling from a checkpoint: --config.checkpoint=CKPT --config.input=prompts.jsonl --config.output=out.jsonl."""
from astro_jax import stages


def get_config():
  return stages.defaults("generate")
