"""Shared fixtures. Every test runs offline on CPU; the real assets come from pip packages (tools/install_assets.sh)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smollm2_dir():
  """HF checkpoint of the real SmolLM2-135M-Instruct (exported once from the GGUF asset and cached)."""
  from astro_jax import assets
  return assets.smollm2_hf_dir()


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
