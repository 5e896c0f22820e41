"""Checkpoints: Hugging Face safetensors <-> our sharded parameters <-> Orbax.

HF -> model: each weight is built with `jax.make_array_from_callback`, so every host reads only the shards its
devices hold, straight from memory-mapped safetensors (peak host memory about one shard of one tensor; works
multi-host). Model -> HF: tensors are produced one at a time and streamed into sharded safetensors files.
An Orbax checkpoint directory holds `params/` (Orbax), `model_config.json`, when known `tokenizer/`, and when
converted from HF the source's `hf_config.json` / `generation_config.json` (so HF -> Orbax -> HF keeps every
config field); it restores onto any mesh. A training run's step (`RUN/checkpoints/<step>`, written by sft or rl)
is a checkpoint too: its params (never its optimizer state) with the architecture, HF config files and tokenizer of
the run's start checkpoint, which `RUN/run_config.json` names.

Readers validate before reading weights (`inspect_checkpoint`: headers, configs, Orbax metadata) and name the
file and what is wrong. Writers refuse an existing output unless `overwrite`, write into a temporary sibling
`.NAME.tmp-<pid>@<host>-*` (leftovers of dead writers are removed by the next write), give every file and
directory the user's umask modes, and rename at the end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from astro_jax.errors import UserError
from astro_jax.files import atomic_output_dir, prepare_output
from astro_jax.model.config import Execution, ModelConfig, RopeScaling, from_hf_config, to_hf_config
from astro_jax.model.llama import LAYER_WEIGHTS, Llama, abstract_model, weight_specs
from astro_jax.sharding import Sharder, state_shardings

_ST_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_TORCH_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_IGNORED = ("rotary_emb.inv_freq",)  # non-persistent buffers some exporters include
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
HF_CONFIG_FILE = "hf_config.json"  # inside an Orbax checkpoint: the source's config.json, verbatim
GENERATION_CONFIG_FILE = "generation_config.json"


class CheckpointError(UserError):
  """A checkpoint is corrupted, incomplete or does not match the model it should hold."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A checkpoint, or a file it needs, does not exist."""




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


# --- small readers that name the file and what is wrong -------------------------------------------------------

def _read_json(path: Path) -> dict:
  """The JSON object in `path`; a missing, unreadable or invalid file is a CheckpointError naming it."""
  if not path.is_file():
    raise CheckpointNotFoundError(f"{path} is missing")
  try:
    obj = json.loads(path.read_bytes())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  except OSError as e:
    raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
  return obj


def _checked_config(path: Path, build: Callable[[], ModelConfig]) -> ModelConfig:
  """`build()`, with any error from a bad value or a missing key turned into a CheckpointError naming `path`."""
  try:
    cfg = build()
  except KeyError as e:
    raise CheckpointError(f"{path}: required field {e} is missing") from None
  except (TypeError, ValueError, ArithmeticError) as e:
    raise CheckpointError(f"{path}: {e}") from None
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise CheckpointError(f"{path}: {name} must be a positive integer, found {value!r}")
  return cfg


# --- safetensors, read by mmap and written by streaming (no framework: bf16 via ml_dtypes) -------------------

@dataclasses.dataclass(frozen=True)
class _TensorRef:
  file: Path
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in `file`


def _tensor_ref(path: Path, name: str, info: Any, data_start: int, data_size: int) -> _TensorRef:
  """One header entry, checked: known dtype, a shape of non-negative ints, offsets inside the data section
  that span exactly shape x itemsize bytes."""
  where = f"{path}: tensor {name}"
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
    raise CheckpointError(f"{where}: header entry must hold dtype, shape and data_offsets, found {info!r:.200}")
  dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if dtype not in _ST_DTYPES:
    raise CheckpointError(f"{where}: dtype {dtype} is not supported (expected one of {sorted(_ST_DTYPES)})")
  if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape):
    raise CheckpointError(f"{where}: bad shape {shape!r:.200} in the header")
  if (not isinstance(offsets, list) or len(offsets) != 2
      or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
    raise CheckpointError(f"{where}: bad data_offsets {offsets!r:.200} in the header")
  begin, end = offsets
  if not 0 <= begin <= end or end > data_size:
    raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] lie outside the data section ({data_size} "
                          f"bytes): the file is truncated or its header is corrupted")
  need = math.prod(shape) * _ST_DTYPES[dtype].itemsize
  if end - begin != need:
    raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, but shape "
                          f"{tuple(shape)} of {dtype} needs {need}")
  return _TensorRef(path, _ST_DTYPES[dtype], tuple(shape), data_start + begin)


def _read_header(path: Path) -> dict[str, _TensorRef]:
  """The tensors of one safetensors file, from its header alone, checked against the file's size."""
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise CheckpointError(f"{path}: file is truncated ({size} bytes; a safetensors file starts with an 8-byte "
                              f"header length)")
      (n,) = struct.unpack("<Q", prefix)
      if n > size - 8:
        raise CheckpointError(f"{path}: header length {n} is larger than the file ({size} bytes): truncated or "
                              f"not a safetensors file")
      if n > _MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n} exceeds the safetensors limit of {_MAX_HEADER_BYTES}")
      raw = f.read(n)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: header is not valid JSON ({e}): corrupted or not a safetensors file") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: header is not a JSON object: corrupted or not a safetensors file")
  return {name: _tensor_ref(path, name, info, 8 + n, size - 8 - n)
          for name, info in header.items() if name != "__metadata__"}


def _check_index(hf_dir: Path, refs: dict[str, _TensorRef]) -> None:
  """model.safetensors.index.json, when present, names existing files and where each tensor really is."""
  index = hf_dir / "model.safetensors.index.json"
  if not index.exists():
    return
  weight_map = _read_json(index).get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index}: no weight_map object")
  for name, fname in weight_map.items():
    if not (hf_dir / str(fname)).is_file():
      raise CheckpointNotFoundError(f"{hf_dir / str(fname)} is missing (listed in {index.name} for {name})")
    if name in refs and refs[name].file.name != fname:
      raise CheckpointError(f"{index}: maps {name} to {fname}, but it is stored in {refs[name].file.name}")


class SafetensorsReader:
  """All tensors of a HF checkpoint directory (sharded or not), memory-mapped on demand."""

  def __init__(self, hf_dir: str | os.PathLike):
    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
      raise CheckpointNotFoundError(f"no *.safetensors files in {hf_dir}")
    self.refs: dict[str, _TensorRef] = {}
    for f in files:
      for name, ref in _read_header(f).items():
        if name in self.refs:
          raise CheckpointError(f"{hf_dir}: tensor {name} is stored twice ({self.refs[name].file.name}, {f.name})")
        self.refs[name] = ref
    _check_index(hf_dir, self.refs)

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

def _declared(hf: dict) -> str | None:
  return hf.get("torch_dtype") or hf.get("dtype")


def _hf_config(hf_dir: Path) -> tuple[dict, ModelConfig]:
  """config.json as stored, and our config from it (param_dtype: the declared dtype, else float32)."""
  path = hf_dir / "config.json"
  raw = _read_json(path)
  cfg = _checked_config(path, lambda: from_hf_config(raw))
  declared = _declared(raw)
  return raw, cfg.replace(param_dtype=declared if declared in _TORCH_DTYPES else "float32")


def validate_hf_checkpoint(hf_dir: str | os.PathLike, cfg: ModelConfig,
                           reader: SafetensorsReader | None = None) -> SafetensorsReader:
  """Every tensor the config needs is present with its shape and one dtype; nothing unexpected is there.
  Reads headers only."""
  hf_dir = Path(hf_dir)
  reader = reader or SafetensorsReader(hf_dir)
  expected = hf_tensor_shapes(cfg)
  declared = _declared(_read_json(hf_dir / "config.json"))
  want_dtype = _ST_DTYPES.get(_TORCH_DTYPES.get(str(declared), ""), None)
  if want_dtype is None:  # no declared dtype: all tensors must share the first one's dtype
    want_dtype = reader.refs[next(iter(expected))].dtype if next(iter(expected)) in reader.refs else None
  for name, shape in expected.items():
    if name not in reader.refs:
      raise CheckpointError(f"{hf_dir}: tensor {name} is missing (expected shape {shape})")
    ref = reader.refs[name]
    if ref.shape != shape:
      raise CheckpointError(f"{ref.file}: tensor {name}: expected shape {shape}, found {ref.shape}")
    if want_dtype is not None and ref.dtype != want_dtype:
      raise CheckpointError(f"{ref.file}: tensor {name}: expected dtype {want_dtype} (config.json declares "
                            f"{declared}), found {ref.dtype}")
  tied_head = cfg.tie_embeddings and _HF_GLOBAL["lm_head"] in reader.refs
  unexpected = [n for n in reader.refs if n not in expected and not n.endswith(_IGNORED)
                and not (tied_head and n == _HF_GLOBAL["lm_head"])]
  if unexpected:
    raise CheckpointError(f"{hf_dir}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                          f"for {cfg.n_layers} layers")
  return reader


# --- checkpoint kinds and the cheap check before loading ------------------------------------------------------

def checkpoint_kind(path: str | os.PathLike) -> str:
  """"orbax", "hf" or "train" (a training run's step, RUN/checkpoints/<step>); a missing path or a directory of
  none of these kinds is a CheckpointNotFoundError (a run directory or its checkpoints/: naming the steps)."""
  path = Path(path)
  if not path.exists():
    raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
  if not path.is_dir():
    raise CheckpointError(f"checkpoint {path} is a file; expected a checkpoint directory")
  if (path / "model_config.json").exists() or (path / "params").exists():
    return "orbax"
  if _is_train_step(path):
    if _ORBAX_TMP in path.name:
      raise CheckpointError(f"{path} is an unfinished checkpoint save; name a finished step, "
                            f"{path.parent}/<step> ({_steps_present(path.parent)})")
    return "train"
  if (path / "config.json").exists() or any(path.glob("*.safetensors")):
    return "hf"
  not_a_step = _run_dir_problem(path)
  if not_a_step:
    raise CheckpointNotFoundError(not_a_step)
  raise CheckpointNotFoundError(f"{path} is neither an Orbax checkpoint (model_config.json + params/), a HF "
                                f"checkpoint (config.json + *.safetensors) nor a training run's step "
                                f"(RUN/checkpoints/<step>)")


_KIND_NAMES = {"orbax": "an Orbax checkpoint", "hf": "a HF checkpoint", "train": "a training run's checkpoint"}


def _expect_kind(path: Path, *kinds: str) -> str:
  found = checkpoint_kind(path)
  if found not in kinds:
    raise CheckpointError(f"{path} is {_KIND_NAMES[found]}, expected {' or '.join(_KIND_NAMES[k] for k in kinds)}")
  return found


def inspect_checkpoint(path: str | os.PathLike) -> ModelConfig:
  """Validate a checkpoint of any kind without reading weights; return its model config.

  HF: config.json, every safetensors header (against the file's size) and every tensor's shape and dtype.
  Orbax: model_config.json, the stored config files, and params/ metadata against the expected shapes/dtypes.
  Train (RUN/checkpoints/<step>): the start checkpoint's configs (named in RUN/run_config.json), and the state's
  params metadata against them (param_dtype: the stored one).
  """
  path = Path(path)
  kind = checkpoint_kind(path)
  if kind == "train":
    return _inspect_train(path)
  if kind == "orbax":
    cfg = load_orbax_config(path)
    hf_extras(path)
    _check_orbax_params(path / "params", cfg, _orbax_metadata(_orbax_params(path)))
    return cfg
  _, cfg = _hf_config(path)
  validate_hf_checkpoint(path, cfg)
  if (path / GENERATION_CONFIG_FILE).exists():
    _read_json(path / GENERATION_CONFIG_FILE)
  return cfg


# --- HF -> model ----------------------------------------------------------------------------------------------

def _default_sharding(sharder: Sharder | None, axes, shape):
  if sharder is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return sharder.named(axes, shape)


def load_hf_model(hf_dir: str | os.PathLike, *, sharder: Sharder | None = None, param_dtype: str | None = None,
                  run: Execution = Execution(), **cfg_overrides) -> Llama:
  """Our model from a HF Llama checkpoint directory; each device's shard is read straight from disk.

  param_dtype: storage dtype (default: the checkpoint's); run: how the returned model's __call__ runs."""
  hf_dir = Path(hf_dir)
  _expect_kind(hf_dir, "hf")
  _, cfg = _hf_config(hf_dir)
  cfg = cfg.replace(**cfg_overrides)
  reader = validate_hf_checkpoint(hf_dir, cfg)
  cfg = cfg.replace(param_dtype=param_dtype or cfg.param_dtype)
  return model_from_tensors(cfg, reader.get, sharder, run)


def model_from_tensors(cfg: ModelConfig, get_hf: Callable[[str], np.ndarray],
                       sharder: Sharder | None = None, run: Execution = Execution()) -> Llama:
  graphdef, abs_state = nnx.split(abstract_model(cfg, sharder, run))
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


def _tokenizer_files(src: Path) -> list[str]:
  names = [name for name in TOKENIZER_FILES if (src / name).is_file()]
  if not names:
    raise CheckpointNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
  return names


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
  src, dst = Path(src), Path(dst)
  names = _tokenizer_files(src)
  dst.mkdir(parents=True, exist_ok=True)
  for name in names:
    shutil.copyfile(src / name, dst / name)
  return names


# Fields of to_hf_config that are defaults rather than facts about the model: a source checkpoint's values win.
_SOURCE_KEEPS = ("initializer_range", "attention_dropout", "use_cache")


def merged_hf_config(cfg: ModelConfig, source: dict | None = None) -> dict:
  """config.json for `cfg`: the source checkpoint's fields (pad_token_id, anything else) updated by ours."""
  ours = to_hf_config(cfg, torch_dtype=cfg.param_dtype)
  source = dict(source or {})
  for key in _SOURCE_KEEPS:
    if key in source:
      ours.pop(key, None)
  merged = {**source, **ours}
  if "dtype" in source:  # the transformers-5 spelling of torch_dtype
    merged["dtype"] = cfg.param_dtype
  return merged


def _generation_config(cfg: ModelConfig) -> dict:
  eos = list(cfg.eos_token_ids)
  return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos, "do_sample": False,
          "transformers_version": "5.0.0"}


def _shard_plan(cfg: ModelConfig, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Tensors in HF order, cut into files of at most `max_shard_bytes` (a larger tensor gets a file alone)."""
  dtype = np.dtype(cfg.jnp_param_dtype)
  files, current, size = [], [], 0
  for name, shape in hf_tensor_shapes(cfg).items():
    nbytes = math.prod(shape) * dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      files.append(current)
      current, size = [], 0
    current.append((name, shape, dtype))
    size += nbytes
  files.append(current)
  return files


def save_hf(model: Llama, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
            max_shard_bytes: int = 5 * 2**30, hf_config: dict | None = None, generation_config: dict | None = None,
            overwrite: bool = False) -> Path:
  """Write `model` as a HF checkpoint: sharded safetensors (+ index), config, generation config, tokenizer.

  `hf_config` / `generation_config`: the source checkpoint's files, kept (config.json updated by our fields).
  """
  if not all(getattr(a, "is_fully_addressable", True) for a in jax.tree.leaves(nnx.state(model))):
    raise NotImplementedError("HF export needs the whole model on this host: gather its arrays first "
                              "(train.loop.host_params), then export from one process")
  prepare_output(out_dir, overwrite)
  cfg = model.cfg
  files = _shard_plan(cfg, max_shard_bytes)
  produce = _hf_producer(model)
  with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    if tokenizer_dir is not None:
      copy_tokenizer(tokenizer_dir, tmp)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))])
    weight_map, total = {}, 0
    for fname, tensors in zip(names, files):
      _write_safetensors(tmp / fname, tensors, produce)
      weight_map.update({t[0]: fname for t in tensors})
      total += sum(math.prod(s) * d.itemsize for _, s, d in tensors)
    if len(files) > 1:
      _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                        "weight_map": weight_map})
    _write_json(tmp / "config.json", merged_hf_config(cfg, hf_config))
    _write_json(tmp / GENERATION_CONFIG_FILE, generation_config or _generation_config(cfg))
  return Path(out_dir)


def _write_json(path: Path, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


# --- Orbax ------------------------------------------------------------------------------------------------------

# Execution settings older checkpoints stored with the architecture (now `Execution`, never saved).
_EXECUTION_KEYS = ("dtype", "remat", "scan_layers")


def _config_to_json(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def _config_from_json(d: dict) -> ModelConfig:
  d = {k: v for k, v in d.items() if k not in _EXECUTION_KEYS}
  if d.get("rope_scaling"):
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
  return ModelConfig(**d)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  return (Path(path) / "model_config.json").exists() and (Path(path) / "params").is_dir()


def save_orbax(model: Llama, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
               hf_config: dict | None = None, generation_config: dict | None = None, overwrite: bool = False) -> Path:
  """Write params (Orbax), model_config.json, the tokenizer and the source's HF config files, atomically."""
  import orbax.checkpoint as ocp
  out_dir = Path(out_dir).absolute()
  prepare_output(out_dir, overwrite)
  state = nnx.state(model, nnx.Param)
  with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "params", nnx.to_pure_dict(state))
      ckptr.wait_until_finished()
    _write_json(tmp / "model_config.json", _config_to_json(model.cfg))
    for name, obj in ((HF_CONFIG_FILE, hf_config), (GENERATION_CONFIG_FILE, generation_config)):
      if obj is not None:
        _write_json(tmp / name, obj)
    if tokenizer_dir is not None:
      copy_tokenizer(tokenizer_dir, tmp / "tokenizer")
  return out_dir


def load_orbax_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
  path = Path(ckpt_dir) / "model_config.json"
  raw = _read_json(path)
  return _checked_config(path, lambda: _config_from_json(raw))


def hf_extras(ckpt_dir: str | os.PathLike) -> tuple[dict | None, dict | None]:
  """The HF config.json and generation_config.json that go with a checkpoint, if any: a HF checkpoint's own, the
  source's kept in an Orbax checkpoint, a training run's step: its start checkpoint's."""
  path = Path(ckpt_dir)
  if _is_train_step(path):
    path = train_root(path)
  hf_name = "config.json" if checkpoint_kind(path) == "hf" else HF_CONFIG_FILE
  paths = (path / hf_name, path / GENERATION_CONFIG_FILE)
  hf, generation = (_read_json(p) if p.exists() else None for p in paths)
  return hf, generation


def _orbax_params(ckpt_dir: Path) -> Path:
  params = Path(ckpt_dir).absolute() / "params"
  if not params.is_dir():
    raise CheckpointNotFoundError(f"{params} is missing (an Orbax checkpoint holds params/ and model_config.json)")
  return params


# tensorstore reports storage problems as ValueError("<STATUS>: ...").
_STORAGE_STATUS = re.compile(r"(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN|"
                             r"INTERNAL|PERMISSION_DENIED|UNAVAILABLE|ABORTED|RESOURCE_EXHAUSTED): ")


def storage_cause(error: BaseException) -> str | None:
  """One line: the innermost storage error (tensorstore status, missing file, bad JSON) behind `error`."""
  found, seen, e = None, set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, (FileNotFoundError, json.JSONDecodeError))
        or (isinstance(e, (ValueError, OSError)) and _STORAGE_STATUS.match(str(e)))):
      found = e
    e = e.__cause__ or e.__context__
  if found is None:
    return None
  return " ".join(str(found).split(" [tensorstore_spec")[0].split())[:500]


@contextmanager
def _orbax_errors(params: Path) -> Iterator[None]:
  """Storage errors raised by Orbax/tensorstore become one CheckpointError naming the checkpoint."""
  drop_closed_loop_reports()
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 (re-raised unless it is a storage error)
    cause = storage_cause(e)
    if cause is None:
      raise
    raise CheckpointError(f"{params}: Orbax checkpoint is corrupted or incomplete: {cause}") from e


def _is_orbax_teardown_report(unraisable) -> bool:
  """After a failed read, tensorstore callbacks that complete late find Orbax's event loop closed ("Event loop is
  closed"), and Orbax's unfinished read coroutines, closed when collected, re-raise their GeneratorExit."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and "orbax" in code.co_filename and isinstance(error.__cause__, GeneratorExit)


def drop_closed_loop_reports() -> None:
  """Orbax's teardown after a failed read reports through sys.unraisablehook, a traceback each: drop exactly
  those reports, pass on the rest."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_orbax_teardown", False):
    return

  def hook(unraisable) -> None:
    if not _is_orbax_teardown_report(unraisable):
      previous(unraisable)

  hook._drops_orbax_teardown = True
  sys.unraisablehook = hook


def _orbax_metadata(params: Path) -> dict[str, Any]:
  """name -> array metadata (shape, dtype) of params/, from Orbax's metadata files (no weights are read)."""
  import orbax.checkpoint as ocp
  from etils import epath
  meta = _read_json(params / "_METADATA")
  if meta.get("use_ocdbt") and not (params / "manifest.ocdbt").is_file():
    raise CheckpointNotFoundError(f"{params / 'manifest.ocdbt'} is missing (the Orbax checkpoint is incomplete)")
  handler = ocp.StandardCheckpointHandler()
  try:
    with _orbax_errors(params):
      tree = handler.metadata(epath.Path(params))
  finally:
    handler.close()
  try:
    return {name: tree[name] for name in tree.keys()}
  except (AttributeError, TypeError, KeyError):
    raise CheckpointError(f"{params}: Orbax metadata is not a flat tree of arrays") from None


def _check_orbax_params(where: Path | str, cfg: ModelConfig, found: dict[str, Any], *,
                        dtype_from: str = "model_config.json", config_from: str = "model_config.json") -> None:
  """The Orbax tree at `where` holds exactly the model's weights, each with its shape and param_dtype
  (`dtype_from`, `config_from`: where the expected dtype and the config come from, for the messages)."""
  want_dtype = np.dtype(cfg.jnp_param_dtype)
  expected = {name: shape for name, (shape, _) in weight_specs(cfg).items()}
  for name, shape in expected.items():
    if name not in found:
      raise CheckpointError(f"{where}: tensor {name} is missing (expected shape {shape})")
    got_shape, got_dtype = getattr(found[name], "shape", None), getattr(found[name], "dtype", None)
    if got_shape is None or got_dtype is None:
      raise CheckpointError(f"{where}: {name} is not an array ({type(found[name]).__name__})")
    if tuple(got_shape) != tuple(shape):
      raise CheckpointError(f"{where}: tensor {name}: expected shape {tuple(shape)}, found {tuple(got_shape)} "
                            f"({config_from})")
    if np.dtype(got_dtype) != want_dtype:
      raise CheckpointError(f"{where}: tensor {name}: expected dtype {want_dtype} ({dtype_from}), "
                            f"found {np.dtype(got_dtype)}")
  unexpected = sorted(set(found) - set(expected))
  if unexpected:
    raise CheckpointError(f"{where}: unexpected tensors {unexpected[:5]} ({config_from}: "
                          f"tie_embeddings={cfg.tie_embeddings})")


def load_orbax_model(ckpt_dir: str | os.PathLike, *, sharder: Sharder | None = None, run: Execution = Execution(),
                     **cfg_overrides) -> Llama:
  """Restore an Orbax checkpoint onto `sharder`'s mesh (any mesh shape) or one device."""
  ckpt_dir = Path(ckpt_dir).absolute()
  _expect_kind(ckpt_dir, "orbax")
  cfg = load_orbax_config(ckpt_dir).replace(**cfg_overrides)
  params = _orbax_params(ckpt_dir)
  _check_orbax_params(params, cfg, _orbax_metadata(params))
  return _restore_model(params, cfg, sharder, run)


def _restore_model(directory: Path, cfg: ModelConfig, sharder: Sharder | None, run: Execution,
                   subtree: str | None = None) -> Llama:
  """The model whose weights are the Orbax tree at `directory` (`subtree`: only its entry of that name, the rest
  never read), restored straight into the model's shardings on `sharder`'s mesh (or one device)."""
  import orbax.checkpoint as ocp
  graphdef, abs_state = nnx.split(abstract_model(cfg, sharder, run))
  if sharder is None:
    shardings = jax.tree.map(lambda _: _default_sharding(None, None, None), abs_state, is_leaf=_is_variable)
  else:
    shardings = state_shardings(abs_state, sharder)
  # Both sharding trees have one leaf per Variable (not per Variable's value), so map at the Variable level.
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings,
                        is_leaf=_is_variable)
  target = nnx.to_pure_dict(target)
  if subtree is None:
    with ocp.StandardCheckpointer() as ckptr, _orbax_errors(directory):
      restored = ckptr.restore(directory, target)
  else:
    item = {subtree: target}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr, _orbax_errors(directory):
      restored = ckptr.restore(directory, args=args)[subtree]
  nnx.replace_by_pure_dict(abs_state, restored)
  return nnx.merge(graphdef, abs_state)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def load_model(path: str | os.PathLike, *, sharder: Sharder | None = None, run: Execution = Execution(),
               **cfg_overrides) -> Llama:
  """Any checkpoint kind: an Orbax directory written by `save_orbax`, a HF directory, or a training run's step."""
  kind = checkpoint_kind(path)
  if kind == "orbax":
    return load_orbax_model(path, sharder=sharder, run=run, **cfg_overrides)
  if kind == "train":
    return load_train_model(path, sharder=sharder, run=run, **cfg_overrides)
  return load_hf_model(path, sharder=sharder, run=run, **cfg_overrides)


def tokenizer_dir_of(path: str | os.PathLike) -> Path | None:
  """Where a checkpoint keeps its tokenizer files, if it does (a training run's step: the run's tokenizer, else its
  start checkpoint's)."""
  if _is_train_step(Path(path)):
    return _train_tokenizer_dir(Path(path))
  for cand in (Path(path) / "tokenizer", Path(path)):
    if any((cand / f).exists() for f in TOKENIZER_FILES[:2]):
      return cand
  return None


# --- a training run's step (RUN/checkpoints/<step>) as a checkpoint -------------------------------------------------

RUN_CONFIG_FILE = "run_config.json"  # in a training run's directory: its settings, with its start checkpoint
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax writes step N to N.orbax-checkpoint-tmp, renamed when complete
_MAX_CHAIN = 32  # start checkpoints followed (a run started from a step of a run started from a step ...)


def _is_train_step(path: Path) -> bool:
  return (path / "state").is_dir() or (path / "_CHECKPOINT_METADATA").is_file()


def _run_steps(checkpoints: Path) -> list[int]:
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir())


def _holds_steps(checkpoints: Path) -> bool:
  return any(_is_train_step(checkpoints / str(step)) for step in _run_steps(checkpoints))


def _steps_present(checkpoints: Path) -> str:
  steps = _run_steps(checkpoints) if checkpoints.is_dir() else []
  return f"steps present: {', '.join(map(str, steps))}" if steps else "no finished step is present"


def _run_dir_problem(path: Path) -> str | None:
  """For a training run's directory or its checkpoints/ (named where a step is wanted): what to name instead."""
  if (path / "checkpoints").is_dir() and ((path / RUN_CONFIG_FILE).is_file() or _holds_steps(path / "checkpoints")):
    checkpoints, what = path / "checkpoints", "a training run's directory"
  elif path.name == "checkpoints" and ((path.parent / RUN_CONFIG_FILE).is_file() or _holds_steps(path)):
    checkpoints, what = path, "a training run's checkpoints directory"
  else:
    return None
  return (f"{path} is {what}, not a checkpoint: name one of its steps, {checkpoints}/<step> "
          f"({_steps_present(checkpoints)})")


def _recorded_input(step: Path, key: str) -> tuple[Path, str]:
  """(RUN/run_config.json, the spec it records for input `key`: a path, `asset:NAME` or "") of a run's step."""
  path = step.absolute().parent.parent / RUN_CONFIG_FILE
  if not path.is_file():
    raise CheckpointNotFoundError(f"{step} is a training run's step, but {path} is missing (it names the run's "
                                  f"start checkpoint, whose model config and tokenizer the step needs)")
  value = _read_json(path).get(key, "")
  if isinstance(value, dict):  # {"path": ..., fingerprint} or {"asset": "asset:NAME", fingerprint}
    value = value.get("asset") or value.get("path") or ""
  if not isinstance(value, str):
    raise CheckpointError(f"{path}: {key!r} is {value!r:.200}; expected a path or an asset name")
  return path, value


def _resolve_recorded(run_config: Path, key: str, spec: str) -> Path:
  """The directory of a recorded input (`asset:NAME` or a path); a missing one is a CheckpointNotFoundError."""
  from astro_jax import assets
  if spec.startswith(assets.ASSET_PREFIX):
    try:
      return assets.resolve(spec)
    except (KeyError, FileNotFoundError) as e:
      raise CheckpointNotFoundError(f"{run_config}: {key} {spec}: {e.args[0] if e.args else e}") from None
  if not Path(spec).exists():
    raise CheckpointNotFoundError(f"{run_config}: the run's {key} {spec} does not exist (its steps need it)")
  return Path(spec)


def train_source(step: str | os.PathLike) -> Path:
  """The start checkpoint of the run that wrote `step` (RUN/checkpoints/<step>), as RUN/run_config.json names it."""
  run_config, spec = _recorded_input(Path(step), "checkpoint")
  if not spec:
    raise CheckpointError(f"{run_config}: no start checkpoint is recorded (key 'checkpoint')")
  return _resolve_recorded(run_config, "start checkpoint", spec)


def train_root(step: str | os.PathLike) -> Path:
  """The first of a step's start checkpoints (following runs started from steps of other runs) that is an Orbax
  or HF checkpoint: where its model config, HF config files and tokenizer come from."""
  chain = [Path(step).absolute()]
  source = train_source(step)
  while checkpoint_kind(source) == "train":
    if source.absolute() in chain or len(chain) > _MAX_CHAIN:
      raise CheckpointError(f"{step}: its start checkpoints form a cycle or a chain of over {_MAX_CHAIN} runs: "
                            f"{' -> '.join(map(str, chain[:4]))} -> ...")
    chain.append(source.absolute())
    source = train_source(source)
  return source


def _train_params_metadata(step: Path) -> tuple[Path, dict[str, Any]]:
  """(state/, name -> array metadata of the state's params) of a run's step, from Orbax's metadata alone."""
  state = step / "state"
  if not state.is_dir():
    raise CheckpointNotFoundError(f"{state} is missing (a training run's step holds state/: params, optimizer "
                                  f"state and step)")
  params = _orbax_metadata(state).get("params")
  if not isinstance(params, dict):
    raise CheckpointError(f"{state}: the train state holds no params tree")
  return state, params


def _inspect_train(step: Path) -> ModelConfig:
  """A run's step: its start checkpoint's config (param_dtype: the stored one), checked against the state's params
  metadata."""
  root = train_root(step)
  orbax = checkpoint_kind(root) == "orbax"
  cfg = load_orbax_config(root) if orbax else _hf_config(root)[1]
  hf_extras(root)
  state, found = _train_params_metadata(step)
  dtype = getattr(found.get("embed"), "dtype", None)
  if dtype is not None:
    cfg = cfg.replace(param_dtype=np.dtype(dtype).name)
  config_file = root / ("model_config.json" if orbax else "config.json")
  _check_orbax_params(f"{state} (params)", cfg, found, dtype_from="the dtype of embed",
                      config_from=f"the run's start checkpoint {config_file}")
  return cfg


def load_train_model(step: str | os.PathLike, *, sharder: Sharder | None = None, run: Execution = Execution(),
                     **cfg_overrides) -> Llama:
  """The params of a training run's step (the optimizer state is never read), restored onto `sharder`'s mesh (any
  mesh shape) or one device; the architecture is the run's start checkpoint's."""
  step = Path(step).absolute()
  _expect_kind(step, "train")
  cfg = _inspect_train(step).replace(**cfg_overrides)
  return _restore_model(step / "state", cfg, sharder, run, subtree="params")


def _train_tokenizer_dir(step: Path) -> Path | None:
  """The tokenizer a run trained with: the one it was given (run_config.json), else its start checkpoint's."""
  run_config, spec = _recorded_input(step, "tokenizer")
  if spec:
    return _resolve_recorded(run_config, "tokenizer", spec)
  train_root(step)  # the chain is sound (no cycle) before it is followed
  return tokenizer_dir_of(train_source(step))


# --- conversions (tools and the `convert` stage) -----------------------------------------------------------------

def convert_hf_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                        sharder: Sharder | None = None, overwrite: bool = False) -> Path:
  """HF -> Orbax, keeping the source's config.json and generation_config.json for the way back."""
  hf_dir = Path(hf_dir)
  prepare_output(out_dir, overwrite)
  _expect_kind(hf_dir, "hf")
  source, _ = _hf_config(hf_dir)
  generation_path = hf_dir / GENERATION_CONFIG_FILE
  generation = _read_json(generation_path) if generation_path.exists() else None
  model = load_hf_model(hf_dir, sharder=sharder, param_dtype=dtype)
  return save_orbax(model, out_dir, tokenizer_dir=tokenizer_dir_of(hf_dir), hf_config=source,
                    generation_config=generation, overwrite=overwrite)


def convert_orbax_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2**30,
                        overwrite: bool = False) -> Path:
  """Orbax (or a training run's step) -> HF; config.json is the source's (when the checkpoint came from HF, or
  its run started from a HF checkpoint) updated by our fields."""
  ckpt_dir = Path(ckpt_dir)
  prepare_output(out_dir, overwrite)
  _expect_kind(ckpt_dir, "orbax", "train")
  if tokenizer_dir is not None:
    _tokenizer_files(Path(tokenizer_dir))
  source, generation = hf_extras(ckpt_dir)
  model = load_model(ckpt_dir)
  return save_hf(model, out_dir, tokenizer_dir=tokenizer_dir or tokenizer_dir_of(ckpt_dir),
                 max_shard_bytes=max_shard_bytes, hf_config=source, generation_config=generation, overwrite=overwrite)
