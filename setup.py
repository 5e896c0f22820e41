from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2", "flax>=0.12.8", "optax>=0.2.8", "orbax-checkpoint>=0.12.8", "grain>=0.2.18",
    "ml-collections>=1.1.0", "absl-py>=2.1", "numpy>=2.0", "safetensors>=0.6", "tokenizers>=0.22",
    "transformers>=5.0", "sentencepiece>=0.2", "jinja2>=3.1", "sympy>=1.13", "math-verify[antlr4_13_2]>=0.9.0",
    "tqdm>=4.66", "tensorboardX>=2.6", "matplotlib>=3.9",
]

setup(
    name="astro_jax",
    version="0.1.0",
    description="ASTRO (Autoregressive Search-Taught Reasoner) in JAX: MCTS traces, SFT and RL for Llama 3",
    packages=find_packages(include=["astro_jax", "astro_jax.*"]),
    package_data={"astro_jax": ["datasets/*.jsonl", "datasets/*.md"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        # torch is the reference implementation in tests and loads the GGUF asset; 2.13.0 is the CPU build.
        "test": ["torch==2.13.0", "gguf>=0.17", "accelerate>=1.0", "trl==1.16.0", "pytest>=8.0", "pytest-xdist>=3.5"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
    },
)
