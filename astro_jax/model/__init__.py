"""Llama-architecture model: config and presets, RoPE, the Flax NNX decoder."""
from astro_jax.model.config import (PRESETS, REMAT_POLICIES, Execution, ModelConfig, RopeScaling, from_hf_config,
                                    preset, to_hf_config)
from astro_jax.model.llama import KVCache, Llama, abstract_model, count_params, init_model, weight_specs
