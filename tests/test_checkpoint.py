"""HF safetensors -> Orbax -> HF: bit-exact round trips, loadability by transformers, and atomic failure on bad input.

Round trips run on the real SmolLM2-135M-Instruct (fp32, tied head, 538 MB, once) and on random tiny
Llama-3.1-style checkpoints (fp32 and bf16, untied head) that the converters have never seen.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from astro_jax import checkpoint
from astro_jax.checkpoint import CheckpointError, convert_hf_to_orbax, convert_orbax_to_hf, load_orbax_model
from tests.conftest import PROMPTS, REPO, make_tiny_llama31_hf

TOKENS = np.random.default_rng(0).integers(3, 512, size=(2, 40))


# --- helpers ----------------------------------------------------------------------------------------------------

def read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
  """All tensors of a HF checkpoint directory, read with the reference `safetensors` library."""
  tensors = {}
  for path in sorted(Path(hf_dir).glob("*.safetensors")):
    with safe_open(path, framework="pt") as f:
      for name in f.keys():
        assert name not in tensors, f"{name} is stored twice"
        tensors[name] = f.get_tensor(name)
  return tensors


def assert_bit_identical(a_dir: Path, b_dir: Path) -> int:
  """Same tensor names, dtypes, shapes and bytes; returns the number of tensors."""
  a, b = read_tensors(a_dir), read_tensors(b_dir)
  assert sorted(a) == sorted(b)
  for name in a:
    assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
    assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name
  return len(a)


def hf_model(hf_dir: Path) -> transformers.PreTrainedModel:
  return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto", attn_implementation="eager").eval()


def hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> torch.Tensor:
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(np.asarray(tokens)).long()).logits


def assert_same_hf_model(src: Path, out: Path, tokens: np.ndarray) -> None:
  """`out` loads in transformers with the same config, dtype and logits as `src`."""
  a, b = hf_model(src), hf_model(out)
  assert b.dtype == a.dtype
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
              "bos_token_id", "eos_token_id", "max_position_embeddings"):
    assert getattr(b.config, key) == getattr(a.config, key), key
  assert torch.equal(hf_logits(a, tokens), hf_logits(b, tokens))
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert generation.eos_token_id == a.config.eos_token_id


def assert_same_tokenizer(src: Path, out: Path) -> None:
  a, b = transformers.AutoTokenizer.from_pretrained(src), transformers.AutoTokenizer.from_pretrained(out)
  assert len(a) == len(b)
  assert a(PROMPTS)["input_ids"] == b(PROMPTS)["input_ids"]


def listing(path: Path) -> dict[str, bytes]:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, llama3_tokenizer_dir) -> dict[str, Path]:
  """Random Llama-3.1-style HF checkpoints, fp32 and bf16, with the Llama 3 tokenizer files alongside."""
  dirs = {}
  for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    path = tmp_path_factory.mktemp(f"tiny_{name}")
    make_tiny_llama31_hf(path, dtype=dtype, seed=1)
    checkpoint.copy_tokenizer(llama3_tokenizer_dir, path)
    dirs[name] = path
  return dirs


# --- round trips -----------------------------------------------------------------------------------------------

def test_smollm2_round_trip_is_bit_identical(smollm2_dir, tmp_path):
  ckpt = convert_hf_to_orbax(smollm2_dir, tmp_path / "ckpt")
  assert checkpoint.is_orbax_checkpoint(ckpt) and (ckpt / "tokenizer" / "tokenizer.json").exists()
  out = convert_orbax_to_hf(ckpt, tmp_path / "hf")
  assert sorted(os.listdir(out)) == sorted(os.listdir(smollm2_dir))  # one file: 538 MB < 5 GB
  n = assert_bit_identical(smollm2_dir, out)
  assert n == 2 + 9 * 30  # tied: no lm_head.weight, as transformers writes it
  assert_same_hf_model(smollm2_dir, out, TOKENS)
  assert_same_tokenizer(smollm2_dir, out)
  src_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  out_tok = transformers.AutoTokenizer.from_pretrained(out)
  chat = [{"role": "user", "content": PROMPTS[0]}]
  assert out_tok.apply_chat_template(chat, tokenize=False) == src_tok.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_llama31_round_trip_is_bit_identical(tiny_dirs, tmp_path, dtype):
  src = tiny_dirs[dtype]
  ckpt = convert_hf_to_orbax(src, tmp_path / "ckpt")
  model = load_orbax_model(ckpt)
  assert model.cfg.param_dtype == dtype and model.wq[...].dtype == jnp.dtype(dtype)
  assert model.cfg.rope_scaling is not None and not model.cfg.tie_embeddings
  out = convert_orbax_to_hf(ckpt, tmp_path / "hf")
  assert assert_bit_identical(src, out) == 3 + 9 * 3
  with open(out / "config.json") as f:
    assert json.load(f)["torch_dtype"] == dtype
  assert_same_hf_model(src, out, TOKENS)
  assert_same_tokenizer(src, out)


def test_multi_shard_export_loads_in_transformers(tiny_dirs, tmp_path):
  src = tiny_dirs["float32"]
  ckpt = convert_hf_to_orbax(src, tmp_path / "ckpt")
  out = convert_orbax_to_hf(ckpt, tmp_path / "hf", max_shard_bytes=100_000)
  files = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  with open(out / "model.safetensors.index.json") as f:
    index = json.load(f)
  tensors = read_tensors(out)
  assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
  for name, fname in index["weight_map"].items():
    with safe_open(out / fname, framework="pt") as f:
      assert name in f.keys()
  assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
  for fname in files:  # no file exceeds the limit unless it holds a single larger tensor
    with safe_open(out / fname, framework="pt") as f:
      names = list(f.keys())
    assert len(names) == 1 or sum(tensors[n].numel() * 4 for n in names) <= 100_000
  assert_bit_identical(src, out)
  assert_same_hf_model(src, out, TOKENS)


def test_dtype_conversion_matches_torch_rounding(tiny_dirs, tmp_path):
  """fp32 HF -> bf16 Orbax (--dtype) -> HF: each tensor equals torch's own fp32 -> bf16 cast."""
  ckpt = convert_hf_to_orbax(tiny_dirs["float32"], tmp_path / "ckpt", dtype="bfloat16")
  out = convert_orbax_to_hf(ckpt, tmp_path / "hf")
  src, got = read_tensors(tiny_dirs["float32"]), read_tensors(out)
  for name, t in src.items():
    assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.to(torch.bfloat16)), name


# --- bad input --------------------------------------------------------------------------------------------------

def _corrupt(src: Path, dst: Path, edit) -> Path:
  shutil.copytree(src, dst)
  tensors = read_tensors(dst)
  edit(tensors)
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


BAD_HF = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
                r"model\.layers\.1\.mlp\.up_proj\.weight is missing \(expected shape \(128, 64\)\)"),
    "shape": (lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(16, 64)}),
              r"model\.layers\.2\.self_attn\.k_proj\.weight: expected shape \(32, 64\), found \(16, 64\)"),
    "dtype": (lambda t: t.update({"model.layers.0.mlp.down_proj.weight":
                                  t["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16)}),
              r"model\.layers\.0\.mlp\.down_proj\.weight: expected dtype float32 .*found bfloat16"),
}


@pytest.mark.parametrize("kind", sorted(BAD_HF))
def test_bad_hf_checkpoint_fails_and_writes_nothing(tiny_dirs, tmp_path, kind):
  edit, message = BAD_HF[kind]
  bad = _corrupt(tiny_dirs["float32"], tmp_path / "bad", edit)
  out_parent = tmp_path / "outputs"
  out_parent.mkdir()
  with pytest.raises(CheckpointError, match=message):
    convert_hf_to_orbax(bad, out_parent / "ckpt")
  assert not (out_parent / "ckpt").exists() and not os.listdir(out_parent)  # no temp dirs left either
  existing = out_parent / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("precious")
  before = listing(existing)
  with pytest.raises(CheckpointError, match=message):  # even when asked to overwrite, a failure keeps it
    convert_hf_to_orbax(bad, existing, overwrite=True)
  assert listing(existing) == before and os.listdir(out_parent) == ["existing"]


def test_bad_orbax_checkpoint_fails_and_writes_nothing(tiny_dirs, tmp_path):
  ckpt = convert_hf_to_orbax(tiny_dirs["float32"], tmp_path / "ckpt")
  with open(ckpt / "model_config.json") as f:
    cfg = json.load(f)
  with open(ckpt / "model_config.json", "w") as f:  # the stored weights no longer match the config
    json.dump({**cfg, "d_ff": 96}, f)
  out_parent = tmp_path / "outputs"
  out_parent.mkdir()
  with pytest.raises(CheckpointError, match=r"w_down: expected shape \(3, 96, 64\), found \(3, 128, 64\)|"
                                            r"w_gate: expected shape \(3, 64, 96\), found \(3, 64, 128\)"):
    convert_orbax_to_hf(ckpt, out_parent / "hf")
  assert not os.listdir(out_parent)
  with pytest.raises(FileNotFoundError):
    convert_orbax_to_hf(tmp_path / "does_not_exist", out_parent / "hf")
  assert not os.listdir(out_parent)


# --- command-line tools -----------------------------------------------------------------------------------------

def _tool(name: str, *args) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_conversion_tools_cli(tiny_dirs, tmp_path, llama3_tokenizer_dir):
  src = tiny_dirs["bfloat16"]
  proc = _tool("convert_hf_to_orbax.py", "--hf_dir", src, "--out", tmp_path / "ckpt")
  assert proc.returncode == 0, proc.stderr
  assert str(tmp_path / "ckpt") in proc.stdout
  proc = _tool("convert_orbax_to_hf.py", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "hf",
               "--tokenizer_dir", llama3_tokenizer_dir, "--max_shard_size", "50KB")
  assert proc.returncode == 0, proc.stderr
  assert str(tmp_path / "hf") in proc.stdout
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  assert_bit_identical(src, tmp_path / "hf")
  assert_same_tokenizer(llama3_tokenizer_dir, tmp_path / "hf")

  # A bad checkpoint: exit 2, one error line naming the tensor, no traceback, nothing written.
  bad = _corrupt(src, tmp_path / "bad", BAD_HF["shape"][0])
  proc = _tool("convert_hf_to_orbax.py", "--hf_dir", bad, "--out", tmp_path / "bad_ckpt")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "model.layers.2.self_attn.k_proj.weight: expected shape (32, 64), found (16, 64)" in proc.stderr
  assert not (tmp_path / "bad_ckpt").exists()
