"""HF <-> Orbax: --config.direction=hf_to_orbax|orbax_to_hf --config.input=DIR --config.output=DIR."""
from astro_jax import stages


def get_config():
  return stages.defaults("convert")
