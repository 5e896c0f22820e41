"""Llama-family architecture config: presets and conversion to/from Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 frequency scaling ("rope_type": "llama3")."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each decoder layer in the backward pass: keep nothing of the layer but its input ("full"),
# keep the matmul outputs ("save_dots": recompute only the cheap elementwise work), or keep the normed inputs
# of attention and of the MLP ("save_layer_inputs": the projections are recomputed, not the norms).
REMAT_POLICIES = ("none", "full", "save_dots", "save_layer_inputs")


def _check_dtype(name: str, value: str) -> None:
  if value not in DTYPES:
    raise ValueError(f"{name}={value!r}; expected one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class Execution:
  """How to run a model, apart from what it is: the trainer and the sampler each choose their own."""
  dtype: str = "float32"    # dtype of matmuls and activations (weights are cast to it where they are used)
  remat: str = "none"       # one of REMAT_POLICIES
  scan_layers: bool = True  # lax.scan over the stacked layers (one compiled layer) vs an unrolled loop
  attention_block: int = 0  # > 0: queries attend in blocks of this many (scores of one block at a time; training)

  def __post_init__(self):
    _check_dtype("dtype", self.dtype)
    if self.attention_block < 0:
      raise ValueError(f"attention_block={self.attention_block}; expected >= 0 (0: off)")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What a Llama-architecture decoder is: shapes, RoPE, special ids, and the dtype its weights are stored in.

  How to run it (compute dtype, remat, layer loop) is an `Execution`, chosen by each user of the weights.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 500_000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_position_embeddings: int = 8192
  bos_token_id: int | None = 128000
  eos_token_ids: tuple[int, ...] = (128001, 128008, 128009)
  param_dtype: str = "float32"  # storage dtype of the weights

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    _check_dtype("param_dtype", self.param_dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, l = self.d_model, self.d_ff, self.n_layers
    attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + l * per_layer + d + head


_LLAMA31 = RopeScaling(8.0, 1.0, 4.0, 8192)
_LLAMA32 = RopeScaling(32.0, 1.0, 4.0, 8192)
_L3_8B = dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336)
_L3_70B = dict(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, d_ff=28672)

PRESETS: dict[str, ModelConfig] = {
    "llama3_8b": ModelConfig(**_L3_8B),
    "llama3.1_8b": ModelConfig(**_L3_8B, rope_scaling=_LLAMA31, max_position_embeddings=131072),
    "llama3_70b": ModelConfig(**_L3_70B),
    "llama3.1_70b": ModelConfig(**_L3_70B, rope_scaling=_LLAMA31, max_position_embeddings=131072),
    "llama3.3_70b": ModelConfig(**_L3_70B, rope_scaling=_LLAMA31, max_position_embeddings=131072),
    "llama3.2_1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                               head_dim=64, d_ff=8192, tie_embeddings=True, rope_scaling=_LLAMA32,
                               max_position_embeddings=131072),
    "llama3.2_3b": ModelConfig(vocab_size=128256, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                               head_dim=128, d_ff=8192, tie_embeddings=True, rope_scaling=_LLAMA32,
                               max_position_embeddings=131072),
    "smollm2_135m": ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                head_dim=64, d_ff=1536, rope_theta=100_000.0, tie_embeddings=True,
                                bos_token_id=1, eos_token_ids=(2,)),
    # Tiny random models for tests: a Llama 3.2-like (tied) and a Llama 3.1-like one (rope scaling, GQA 4:1,
    # untied head, short original context so tests reach positions beyond it).
    "tiny": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                        tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,), max_position_embeddings=256),
    "tiny_llama31": ModelConfig(vocab_size=512, d_model=64, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=16,
                                d_ff=128, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), bos_token_id=1,
                                eos_token_ids=(2,), max_position_embeddings=256),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def _as_tuple(x) -> tuple[int, ...]:
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (list, tuple)) else (int(x),)


def from_hf_config(hf: dict[str, Any] | str | os.PathLike, **overrides: Any) -> ModelConfig:
  """ModelConfig from a HF Llama `config.json` (a dict, the file, or its directory).

  Reads both the transformers-4 keys (`rope_theta`, `rope_scaling`) and the transformers-5 `rope_parameters`.
  """
  if not isinstance(hf, dict):
    path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
    with open(path) as f:
      hf = json.load(f)
  arch = hf.get("model_type", "llama")
  if arch != "llama":
    raise ValueError(f"model_type={arch!r}: only Llama-architecture checkpoints are supported")
  rope = dict(hf.get("rope_parameters") or {})
  legacy = hf.get("rope_scaling") or {}
  rope = {**legacy, **rope}
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "llama3":
    scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                          int(rope["original_max_position_embeddings"]))
  elif rope_type == "default":
    scaling = None
  else:
    raise ValueError(f"rope type {rope_type!r} is not supported (expected 'default' or 'llama3')")
  n_heads = hf["num_attention_heads"]
  cfg = ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
      rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      bos_token_id=hf.get("bos_token_id"), eos_token_ids=_as_tuple(hf.get("eos_token_id")),
  )
  return cfg.replace(**overrides)


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """A `config.json` dict for `transformers.LlamaForCausalLM` (both rope key styles, for old and new readers)."""
  rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope_params = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                   "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
  eos = list(cfg.eos_token_ids)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope_params.items() if k != "rope_theta"},
      "rope_parameters": rope_params,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
      "torch_dtype": torch_dtype, "use_cache": True,
  }
