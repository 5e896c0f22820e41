"""Bundled benchmark files (JSONL, see README.md; loaded by `astro_jax.data.load_benchmark`) and `arith`, the
generator of arithmetic word problems to learn on."""
