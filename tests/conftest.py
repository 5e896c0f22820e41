"""Shared fixtures. Every test runs offline on CPU; the real assets come from pip packages (tools/install_assets.sh)."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_cache() -> str:
  """One JAX persistent compilation cache for the whole test run: this process's programs and those of every stage
  run in a subprocess (the JAX_* variables below, and `CACHE_FLAG` for configs that name a cache of their own) land
  in it, so a program compiled once (a stage's step, the sampler's prefill/decode) loads in the later tests and
  processes that build it again. A fresh directory per run (removed at exit) unless ASTRO_JAX_TEST_COMPILE_CACHE
  names one to keep."""
  path = os.environ.get("ASTRO_JAX_TEST_COMPILE_CACHE")
  if path:
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)
  path = tempfile.mkdtemp(prefix="astro_jax_test_compile_cache_")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ["ASTRO_JAX_TEST_COMPILE_CACHE"] = path  # a subprocess importing this module joins it (and keeps it)
  return path


COMPILE_CACHE = _compile_cache()
CACHE_FLAG = f"--config.compile_cache_dir={COMPILE_CACHE}"  # for a stage run on the command line
os.environ.update(JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _pin_compile_cache() -> None:
  """Make COMPILE_CACHE this process's cache now: JAX opens its cache at the first compile and keeps it, so stage
  runs in this process (whatever their `compile_cache_dir`) share it too."""
  import jax
  from astro_jax import sharding
  sharding.enable_compilation_cache(COMPILE_CACHE)
  jax.jit(lambda x: x + 1)(0).block_until_ready()


_pin_compile_cache()

# The slowest test files, slowest first (seconds in a 2-worker run on 2 EPYC cores, 2026-12-05: mcts_stage 235,
# hardening 199, pipeline 157, rl_stage 156, sampler 144, train 121, run_safety 113, rl_packing 91, sft_real 88,
# sft_stage 81, stages 67, model_parity 57; the suite 1806 s in all). `--dist loadfile` hands files to the workers
# in collection order, so collecting these first lets the two workers end together (longest first); xdist's own
# reorder (by the number of tests in a file) is turned off for it.
SLOW_FILES_FIRST = ("test_mcts_stage.py", "test_hardening.py", "test_pipeline.py", "test_rl_stage.py",
                    "test_sampler.py", "test_engine.py", "test_train.py", "test_run_safety.py", "test_rl_packing.py",
                    "test_sft_real.py", "test_sft_stage.py", "test_stages.py", "test_model_parity.py")


def pytest_configure(config) -> None:
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist present
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items) -> None:
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept

PROMPTS = [
    "What is 17 times 23? Let's think step by step.",
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
]

TINY_ORIGINAL_CTX = 32


def make_tiny_llama31_hf(out_dir, dtype: torch.dtype = torch.float32, seed: int = 0,
                         vocab_size: int = 512) -> transformers.LlamaForCausalLM:
  """A random Llama-3.1-style HF checkpoint (llama3 rope scaling, GQA 4:1, untied head) saved to `out_dir`."""
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
      rope_theta=500_000.0, tie_word_embeddings=False, initializer_range=0.08, bos_token_id=1, eos_token_id=2,
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": TINY_ORIGINAL_CTX})
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # non-trivial norm weights, so a mix-up of norms cannot go unnoticed
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  model = model.to(dtype).eval()
  model.save_pretrained(out_dir)
  return model


def stage_config(name: str, **values):
  """A stage's defaults with `values` set (dotted keys for groups: `sampling.n`)."""
  from astro_jax import stages
  return set_values(stages.defaults(name), values)


def set_values(config, values: dict):
  """`config` with `values` set (dotted keys for groups: `sampling.n`)."""
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def with_depths(record: dict) -> dict:
  """A tree record (trees.jsonl format) whose nodes get their depth from the parent links."""
  parents = {n["id"]: n["parent"] for n in record["nodes"]}
  for n in record["nodes"]:
    d, p = 0, n["parent"]
    while p is not None:
      d, p = d + 1, parents[p]
    n["depth"] = d
  return record


@pytest.fixture(scope="session")
def smollm2_dir():
  """HF checkpoint of the real SmolLM2-135M-Instruct (exported once from the GGUF asset and cached)."""
  from astro_jax import assets
  return assets.smollm2_hf_dir()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_dir):
  """A tiny random Llama-3.1-style HF checkpoint with SmolLM2's vocabulary and tokenizer files (256 positions):
  stages run on it in seconds, on text prompts."""
  import shutil
  from astro_jax import checkpoint
  out = tmp_path_factory.mktemp("tiny_checkpoint")
  make_tiny_llama31_hf(out, seed=5, vocab_size=49152)
  for name in checkpoint.TOKENIZER_FILES:
    if (smollm2_dir / name).exists():
      shutil.copy2(smollm2_dir / name, out / name)
  return out


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
  from astro_jax import assets
  return assets.llama3_tokenizer_dir()


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 600) -> str:
  """Run `code` in a fresh Python with `n_devices` simulated CPU devices; return its stdout (fails on error)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return proc.stdout
