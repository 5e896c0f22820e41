"""astro_jax: ASTRO (Autoregressive Search-Taught Reasoner) in JAX."""
__version__ = "0.1.0"
