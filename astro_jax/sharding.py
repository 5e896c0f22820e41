"""Device mesh and logical-axis sharding.

Every parameter and cache tensor names its dimensions with logical axes ("embed", "q_heads", ...). A rule set
maps logical axes to mesh axes. Training and sampling use different rule sets on the same mesh:

  TRAIN_RULES   weights split over fsdp (embed dim) and tensor (heads / mlp / vocab); batch over data x fsdp.
  SAMPLE_RULES  weights split over tensor only (replicated over data and fsdp, no all-gather per decode step);
                batch over data x fsdp.

A dimension whose size does not divide by its mesh axes is replicated instead (e.g. SmolLM2's 9 heads on
tensor=2), so any model runs on any mesh; `Sharder.spec` is the one place that decides this.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]

TRAIN_RULES: Rules = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "cache_seq": None,
    "layers": None,
    "norm": None,
    "head_dim": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    # activations
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}
SAMPLE_RULES: Rules = {**TRAIN_RULES, "embed": None}
RULE_SETS: dict[str, Rules] = {"train": TRAIN_RULES, "sample": SAMPLE_RULES}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if len(devices) % rest:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"have {len(devices)}")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # unusual topologies: fall back to plain order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Sharder:
  """A mesh plus one logical->mesh rule set. Hashable, so it can be static metadata of a jitted model."""
  mesh: Mesh
  rules: tuple[tuple[str, tuple[str, ...]], ...]

  @classmethod
  def create(cls, mesh: Mesh, rules: Rules | str = "train") -> "Sharder":
    rules = RULE_SETS[rules] if isinstance(rules, str) else rules
    norm = []
    for name, axes in rules.items():
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      for a in axes:
        if a not in mesh.axis_names:
          raise ValueError(f"rule {name!r} -> {a!r}: not a mesh axis {mesh.axis_names}")
      norm.append((name, axes))
    return cls(mesh, tuple(norm))

  def with_rules(self, rules: Rules | str) -> "Sharder":
    return Sharder.create(self.mesh, rules)

  def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor; mesh axes that are already used or do not divide the dim are dropped."""
    table = dict(self.rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
      if name is not None and name not in table:
        raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
      axes = [a for a in (table[name] if name else ()) if a not in used and self.mesh.shape[a] > 1]
      if shape is not None and axes and shape[i] % math.prod(self.mesh.shape[a] for a in axes):
        logging.debug("replicating dim %d (%s, size %d): not divisible by %s", i, name, shape[i], axes)
        axes = []
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)

  def named(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes, shape))

  def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.named(logical_axes, x.shape))


def constrain(sharder: Sharder | None, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`sharder.constrain` that is a no-op without a sharder (single device, tests)."""
  return x if sharder is None else sharder.constrain(x, logical_axes)


def logical_axes_tree(state: Any) -> Any:
  """The `logical_axes` metadata of every nnx Variable in a state, as a tree of tuples."""
  from flax import nnx
  return jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))


def state_shardings(state: Any, sharder: Sharder) -> Any:
  """NamedSharding for every Variable of an (abstract or concrete) nnx state, from its logical axes."""
  from flax import nnx
  return jax.tree.map(lambda v: sharder.named(v.get_metadata()["logical_axes"], v.shape), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))


def maybe_initialize_distributed(enabled: bool, coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None) -> None:
  """Multi-host start: one program per host, joined by JAX's runtime (args may come from the cluster env)."""
  if not enabled or _distributed_started():
    return
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                  process_id=process_id).items() if v not in (None, "", -1)}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes' collectives (others: no effect)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _distributed_started() -> bool:
  from jax._src import distributed
  return distributed.global_state.client is not None


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory` ("" = off): a restarted run loads its programs instead of
  compiling them again. Every program is cached (no minimum compile time or size)."""
  if not directory:
    return
  path = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
