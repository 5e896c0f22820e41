"""Evaluation: --config.checkpoint=CKPT --config.benchmarks=math500,amc23,aime24 [--config.samples=k]."""
from astro_jax import stages


def get_config():
  return stages.defaults("eval")
