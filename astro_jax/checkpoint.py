"""Checkpoints: Hugging Face safetensors <-> our sharded parameters <-> Orbax.

HF -> model: each weight is built with `jax.make_array_from_callback`, so every host reads only the shards its
devices hold, straight from memory-mapped safetensors (peak host memory about one shard of one tensor; works
multi-host). Model -> HF: tensors are produced one at a time and streamed into sharded safetensors files.
An Orbax checkpoint directory holds `params/` (Orbax), `model_config.json` and, when known, `tokenizer/`; it
restores onto any mesh. Every writer validates first, writes into a temporary sibling and renames at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from astro_jax.model.config import ModelConfig, RopeScaling, from_hf_config, to_hf_config
from astro_jax.model.llama import LAYER_WEIGHTS, Llama, abstract_model
from astro_jax.sharding import Sharder, state_shardings

_ST_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_TORCH_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_IGNORED = ("rotary_emb.inv_freq",)  # non-persistent buffers some exporters include
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


class CheckpointError(ValueError):
  """A checkpoint does not match the model it should hold."""


# --- The one mapping between HF tensor names/layouts and ours -----------------------------------------------

def _hf_layer_name(name: str, i: int) -> str:
  return {
      "attn_norm": f"model.layers.{i}.input_layernorm.weight",
      "wq": f"model.layers.{i}.self_attn.q_proj.weight",
      "wk": f"model.layers.{i}.self_attn.k_proj.weight",
      "wv": f"model.layers.{i}.self_attn.v_proj.weight",
      "wo": f"model.layers.{i}.self_attn.o_proj.weight",
      "mlp_norm": f"model.layers.{i}.post_attention_layernorm.weight",
      "w_gate": f"model.layers.{i}.mlp.gate_proj.weight",
      "w_up": f"model.layers.{i}.mlp.up_proj.weight",
      "w_down": f"model.layers.{i}.mlp.down_proj.weight",
  }[name]


_HF_GLOBAL = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def _to_ours(name: str, hf: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """HF layout -> ours for one tensor (of one layer). Pure transposes/reshapes: bit-exact and invertible."""
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if name == "wq":
    return hf.T.reshape(D, N, H)
  if name in ("wk", "wv"):
    return hf.T.reshape(D, K, H)
  if name == "wo":
    return hf.T.reshape(N, H, D)
  if name in ("w_gate", "w_up", "w_down", "lm_head"):
    return hf.T
  return hf  # embed [V, D] and norms keep HF's layout


def _to_hf(name: str, ours: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if name == "wq":
    return ours.reshape(D, N * H).T
  if name in ("wk", "wv"):
    return ours.reshape(D, K * H).T
  if name == "wo":
    return ours.reshape(N * H, D).T
  if name in ("w_gate", "w_up", "w_down", "lm_head"):
    return ours.T
  return ours


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a HF checkpoint of this config holds, with its shape (HF layout)."""
  D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  per_layer = {"attn_norm": (D,), "wq": (N * H, D), "wk": (K * H, D), "wv": (K * H, D), "wo": (D, N * H),
               "mlp_norm": (D,), "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F)}
  shapes = {_HF_GLOBAL["embed"]: (V, D)}
  for i in range(cfg.n_layers):
    for name in LAYER_WEIGHTS:
      shapes[_hf_layer_name(name, i)] = per_layer[name]
  shapes[_HF_GLOBAL["final_norm"]] = (D,)
  if not cfg.tie_embeddings:
    shapes[_HF_GLOBAL["lm_head"]] = (V, D)
  return shapes


# --- safetensors, read by mmap and written by streaming (no framework: bf16 via ml_dtypes) -------------------

@dataclasses.dataclass(frozen=True)
class _TensorRef:
  file: Path
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in `file`


def _read_header(path: Path) -> dict[str, _TensorRef]:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  refs = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise CheckpointError(f"{path}: tensor {name}: dtype {info['dtype']} is not supported "
                            f"(expected one of {sorted(_ST_DTYPES)})")
    refs[name] = _TensorRef(path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
  return refs


class SafetensorsReader:
  """All tensors of a HF checkpoint directory (sharded or not), memory-mapped on demand."""

  def __init__(self, hf_dir: str | os.PathLike):
    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
    self.refs: dict[str, _TensorRef] = {}
    for f in files:
      self.refs.update(_read_header(f))

  def get(self, name: str) -> np.ndarray:
    ref = self.refs[name]
    if not ref.shape or 0 in ref.shape:
      return np.zeros(ref.shape, ref.dtype)
    return np.memmap(ref.file, dtype=ref.dtype, mode="r", offset=ref.offset, shape=ref.shape)


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
                       produce: Callable[[str], np.ndarray]) -> None:
  """Write one safetensors file; the header is computed from shapes first, then each tensor is streamed."""
  header, offset = {}, 0
  for name, shape, dtype in tensors:
    size = int(np.prod(shape)) * dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in tensors:
      array = np.ascontiguousarray(produce(name), dtype=dtype)
      if array.shape != tuple(shape):
        raise CheckpointError(f"tensor {name}: produced shape {array.shape}, expected {tuple(shape)}")
      f.write(array.tobytes())


# --- validation ------------------------------------------------------------------------------------------------

def _declared_dtype(hf_dir: Path) -> str | None:
  with open(hf_dir / "config.json") as f:
    hf = json.load(f)
  return hf.get("torch_dtype") or hf.get("dtype")


def validate_hf_checkpoint(hf_dir: str | os.PathLike, cfg: ModelConfig,
                           reader: SafetensorsReader | None = None) -> SafetensorsReader:
  """Every tensor the config needs is present with its shape and one dtype; nothing unexpected is there."""
  hf_dir = Path(hf_dir)
  reader = reader or SafetensorsReader(hf_dir)
  expected = hf_tensor_shapes(cfg)
  declared = _declared_dtype(hf_dir)
  want_dtype = _ST_DTYPES.get(_TORCH_DTYPES.get(str(declared), ""), None)
  if want_dtype is None:  # no declared dtype: all tensors must share the first one's dtype
    want_dtype = reader.refs[next(iter(expected))].dtype if next(iter(expected)) in reader.refs else None
  for name, shape in expected.items():
    if name not in reader.refs:
      raise CheckpointError(f"{hf_dir}: tensor {name} is missing (expected shape {shape})")
    ref = reader.refs[name]
    if ref.shape != shape:
      raise CheckpointError(f"{hf_dir}: tensor {name}: expected shape {shape}, found {ref.shape}")
    if want_dtype is not None and ref.dtype != want_dtype:
      raise CheckpointError(f"{hf_dir}: tensor {name}: expected dtype {want_dtype} (config.json declares "
                            f"{declared}), found {ref.dtype}")
  tied_head = cfg.tie_embeddings and _HF_GLOBAL["lm_head"] in reader.refs
  unexpected = [n for n in reader.refs if n not in expected and not n.endswith(_IGNORED)
                and not (tied_head and n == _HF_GLOBAL["lm_head"])]
  if unexpected:
    raise CheckpointError(f"{hf_dir}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                          f"for {cfg.n_layers} layers")
  return reader


# --- HF -> model ----------------------------------------------------------------------------------------------

def _default_sharding(sharder: Sharder | None, axes, shape):
  if sharder is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return sharder.named(axes, shape)


def load_hf_model(hf_dir: str | os.PathLike, *, sharder: Sharder | None = None, dtype: str | None = None,
                  param_dtype: str | None = None, **cfg_overrides) -> Llama:
  """Our model from a HF Llama checkpoint directory; each device's shard is read straight from disk."""
  hf_dir = Path(hf_dir)
  cfg = from_hf_config(hf_dir, **cfg_overrides)
  declared = _declared_dtype(hf_dir)
  param_dtype = param_dtype or (declared if declared in _TORCH_DTYPES else "float32")
  cfg = cfg.replace(param_dtype=param_dtype, dtype=dtype or cfg.dtype)
  reader = validate_hf_checkpoint(hf_dir, cfg)
  return model_from_tensors(cfg, reader.get, sharder)


def model_from_tensors(cfg: ModelConfig, get_hf: Callable[[str], np.ndarray],
                       sharder: Sharder | None = None) -> Llama:
  graphdef, abs_state = nnx.split(abstract_model(cfg, sharder))
  target_dtype = cfg.jnp_param_dtype

  def build(path, var):
    name = path[-1]
    axes = var.get_metadata()["logical_axes"]
    sharding = _default_sharding(sharder, axes, var.shape)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
      if name in LAYER_WEIGHTS:
        layers = range(cfg.n_layers)[index[0]]
        parts = [_to_ours(name, get_hf(_hf_layer_name(name, i)), cfg)[index[1:]] for i in layers]
        out = np.stack(parts)
      else:
        out = _to_ours(name, get_hf(_HF_GLOBAL[name]), cfg)[index]
      return np.ascontiguousarray(out.astype(target_dtype, copy=False))

    return var.replace(jax.make_array_from_callback(var.shape, sharding, shard))

  return nnx.merge(graphdef, nnx.map_state(build, abs_state))


# --- model -> HF ----------------------------------------------------------------------------------------------

def _hf_producer(model: Llama) -> Callable[[str], np.ndarray]:
  cfg = model.cfg
  index = {_HF_GLOBAL[n]: (n, None) for n in _HF_GLOBAL}
  for name in LAYER_WEIGHTS:
    for i in range(cfg.n_layers):
      index[_hf_layer_name(name, i)] = (name, i)

  def produce(hf_name: str) -> np.ndarray:
    name, layer = index[hf_name]
    array = getattr(model, name)[...]
    host = np.asarray(jax.device_get(array if layer is None else array[layer]))
    return _to_hf(name, host, cfg)
  return produce


@contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
  """Yield a temporary sibling directory; on success it replaces `out` (an existing `out` is kept until then)."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
    if out.exists():
      old = out.with_name(f".{out.name}.old-{os.getpid()}")
      os.replace(out, old)
      os.replace(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
  src, dst = Path(src), Path(dst)
  copied = []
  for name in TOKENIZER_FILES:
    if (src / name).exists():
      dst.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src / name, dst / name)
      copied.append(name)
  if not copied:
    raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
  return copied


def save_hf(model: Llama, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
            max_shard_bytes: int = 5 * 2**30) -> Path:
  """Write `model` as a HF checkpoint: sharded safetensors (+ index), config, generation config, tokenizer."""
  if jax.process_count() > 1:
    raise NotImplementedError("HF export runs in a single process; restore the Orbax checkpoint on one host")
  cfg = model.cfg
  dtype = np.dtype(cfg.jnp_param_dtype)
  plan = [(name, shape, dtype) for name, shape in hf_tensor_shapes(cfg).items()]
  files, current, size = [], [], 0
  for item in plan:
    nbytes = int(np.prod(item[1])) * dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      files.append(current)
      current, size = [], 0
    current.append(item)
    size += nbytes
  files.append(current)
  produce = _hf_producer(model)
  with _atomic_dir(Path(out_dir)) as tmp:
    if tokenizer_dir is not None:
      copy_tokenizer(tokenizer_dir, tmp)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))])
    weight_map = {}
    for fname, tensors in zip(names, files):
      _write_safetensors(tmp / fname, tensors, produce)
      weight_map.update({t[0]: fname for t in tensors})
    if len(files) > 1:
      total = sum(int(np.prod(s)) * dtype.itemsize for _, s, _ in plan)
      _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                        "weight_map": weight_map})
    _write_json(tmp / "config.json", to_hf_config(cfg, torch_dtype=cfg.param_dtype))
    eos = list(cfg.eos_token_ids)
    _write_json(tmp / "generation_config.json", {"bos_token_id": cfg.bos_token_id,
                                                 "eos_token_id": eos[0] if len(eos) == 1 else eos,
                                                 "do_sample": False, "transformers_version": "5.0.0"})
  return Path(out_dir)


def _write_json(path: Path, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


# --- Orbax ------------------------------------------------------------------------------------------------------

def _config_to_json(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def _config_from_json(d: dict) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling"):
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
  return ModelConfig(**d)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  return (Path(path) / "model_config.json").exists() and (Path(path) / "params").is_dir()


def save_orbax(model: Llama, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None) -> Path:
  """Write params (Orbax), model_config.json and the tokenizer into `out_dir`, atomically."""
  import orbax.checkpoint as ocp
  out_dir = Path(out_dir).absolute()
  state = nnx.state(model, nnx.Param)
  with _atomic_dir(out_dir) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "params", nnx.to_pure_dict(state))
      ckptr.wait_until_finished()
    _write_json(tmp / "model_config.json", _config_to_json(model.cfg))
    if tokenizer_dir is not None:
      copy_tokenizer(tokenizer_dir, tmp / "tokenizer")
  return out_dir


def load_orbax_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
  with open(Path(ckpt_dir) / "model_config.json") as f:
    return _config_from_json(json.load(f))


def load_orbax_model(ckpt_dir: str | os.PathLike, *, sharder: Sharder | None = None, dtype: str | None = None,
                     **cfg_overrides) -> Llama:
  """Restore an Orbax checkpoint onto `sharder`'s mesh (any mesh shape) or one device."""
  import orbax.checkpoint as ocp
  ckpt_dir = Path(ckpt_dir).absolute()
  cfg = load_orbax_config(ckpt_dir).replace(**cfg_overrides)
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  graphdef, abs_state = nnx.split(abstract_model(cfg, sharder))
  if sharder is None:
    shardings = jax.tree.map(lambda _: _default_sharding(None, None, None), abs_state, is_leaf=_is_variable)
  else:
    shardings = state_shardings(abs_state, sharder)
  # Both sharding trees have one leaf per Variable (not per Variable's value), so map at the Variable level.
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings,
                        is_leaf=_is_variable)
  target = nnx.to_pure_dict(target)
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(ckpt_dir / "params")
    _check_orbax_shapes(ckpt_dir, target, meta)
    restored = ckptr.restore(ckpt_dir / "params", target)
  nnx.replace_by_pure_dict(abs_state, restored)
  return nnx.merge(graphdef, abs_state)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _check_orbax_shapes(ckpt_dir: Path, target: dict, meta) -> None:
  tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
  try:
    found = {k: v for k, v in tree.items()}
  except AttributeError:
    return
  for name, want in target.items():
    if name not in found:
      raise CheckpointError(f"{ckpt_dir}: tensor {name} is missing (expected shape {want.shape})")
    got = found[name]
    if tuple(got.shape) != tuple(want.shape):
      raise CheckpointError(f"{ckpt_dir}: tensor {name}: expected shape {tuple(want.shape)}, found {tuple(got.shape)}")
    if np.dtype(got.dtype) != np.dtype(want.dtype):
      raise CheckpointError(f"{ckpt_dir}: tensor {name}: expected dtype {np.dtype(want.dtype)}, "
                            f"found {np.dtype(got.dtype)}")


def load_model(path: str | os.PathLike, *, sharder: Sharder | None = None, dtype: str | None = None,
               **cfg_overrides) -> Llama:
  """Either checkpoint kind: an Orbax directory written by `save_orbax`, or a HF directory."""
  if is_orbax_checkpoint(path):
    return load_orbax_model(path, sharder=sharder, dtype=dtype, **cfg_overrides)
  if (Path(path) / "config.json").exists():
    return load_hf_model(path, sharder=sharder, dtype=dtype, **cfg_overrides)
  raise FileNotFoundError(f"{path} is neither an Orbax checkpoint (model_config.json + params/) "
                          f"nor a HF checkpoint (config.json + *.safetensors)")


def tokenizer_dir_of(path: str | os.PathLike) -> Path | None:
  """Where a checkpoint keeps its tokenizer files, if it does."""
  for cand in (Path(path) / "tokenizer", Path(path)):
    if any((cand / f).exists() for f in TOKENIZER_FILES[:2]):
      return cand
  return None


# --- conversions (tools and the `convert` stage) -----------------------------------------------------------------

def convert_hf_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                        sharder: Sharder | None = None) -> Path:
  model = load_hf_model(hf_dir, sharder=sharder, param_dtype=dtype)
  tok = tokenizer_dir_of(hf_dir)
  return save_orbax(model, out_dir, tokenizer_dir=tok)


def convert_orbax_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
  model = load_orbax_model(ckpt_dir)
  tok = tokenizer_dir or tokenizer_dir_of(ckpt_dir)
  return save_hf(model, out_dir, tokenizer_dir=tok, max_shard_bytes=max_shard_bytes)
