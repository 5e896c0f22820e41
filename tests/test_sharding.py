"""Meshes and logical-axis sharding.

The 8-device checks run in fresh interpreters with `--xla_force_host_platform_device_count=8` (the pytest
process itself has one device): one for real (tiny) models, one for the abstract Llama 3 8B / 70B.
"""
from __future__ import annotations

import json

import jax
import pytest

from astro_jax.sharding import Sharder, make_mesh
from tests.conftest import run_with_devices


def test_make_mesh_rejects_bad_shapes():
  devices = jax.devices()[:1]
  with pytest.raises(ValueError, match="needs 2 devices, have 1"):
    make_mesh(data=2, fsdp=1, tensor=1, devices=devices)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    make_mesh(data=-1, fsdp=-1, devices=devices)
  with pytest.raises(ValueError, match="does not divide 1 devices"):
    make_mesh(data=2, fsdp=-1, devices=devices)
  mesh = make_mesh(devices=devices)
  assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_sharder_rejects_unknown_axes():
  mesh = make_mesh(devices=jax.devices()[:1])
  sharder = Sharder.create(mesh, "train")
  with pytest.raises(KeyError, match="logical axis 'heads' has no sharding rule"):
    sharder.spec(("layers", "embed", "heads", "head_dim"))
  with pytest.raises(ValueError, match="'pipeline': not a mesh axis"):
    Sharder.create(mesh, {"embed": "pipeline"})
  with pytest.raises(KeyError):
    Sharder.create(mesh, "no_such_rule_set")


# Expected layouts of a few weights of the `tiny` preset (L=2, D=64, N=4, K=2, H=16, F=128, V=512), written out
# by hand from the rule tables: {(data, fsdp, tensor): {rules: {weight: (spec, per-device shard shape)}}}.
# Mesh axes of size 1 never appear in a spec; weights are never split over `data`.
_R = (None, None)
EXPECTED_LAYOUTS = {
    (1, 8, 1): {"train": {"wq": ((None, "fsdp", None, None), (2, 8, 4, 16)),
                          "wk": ((None, "fsdp", None, None), (2, 8, 2, 16)),
                          "wo": ((None, None, None, "fsdp"), (2, 4, 16, 8)),
                          "w_down": ((None, None, "fsdp"), (2, 128, 8)),
                          "embed": ((None, "fsdp"), (512, 8)),
                          "attn_norm": (_R, (2, 64))}},
    (1, 4, 2): {"train": {"wq": ((None, "fsdp", "tensor", None), (2, 16, 2, 16)),
                          "wk": ((None, "fsdp", "tensor", None), (2, 16, 1, 16)),
                          "wo": ((None, "tensor", None, "fsdp"), (2, 2, 16, 16)),
                          "w_down": ((None, "tensor", "fsdp"), (2, 64, 16)),
                          "embed": (("tensor", "fsdp"), (256, 16)),
                          "attn_norm": (_R, (2, 64))},
                "sample": {"wq": ((None, None, "tensor", None), (2, 64, 2, 16)),
                           "wk": ((None, None, "tensor", None), (2, 64, 1, 16)),
                           "wo": ((None, "tensor", None, None), (2, 2, 16, 64)),
                           "w_down": ((None, "tensor", None), (2, 64, 64)),
                           "embed": (("tensor", None), (256, 64)),
                           "attn_norm": (_R, (2, 64))}},
    (2, 2, 2): {"train": {"wq": ((None, "fsdp", "tensor", None), (2, 32, 2, 16)),
                          "wk": ((None, "fsdp", "tensor", None), (2, 32, 1, 16)),
                          "wo": ((None, "tensor", None, "fsdp"), (2, 2, 16, 32)),
                          "w_down": ((None, "tensor", "fsdp"), (2, 64, 32)),
                          "embed": (("tensor", "fsdp"), (256, 32)),
                          "attn_norm": (_R, (2, 64))},
                "sample": {"wq": ((None, None, "tensor", None), (2, 64, 2, 16)),
                           "w_down": ((None, "tensor", None), (2, 64, 64)),
                           "embed": (("tensor", None), (256, 64))}},
}
# SmolLM2 shapes (9 query / 3 kv heads) on tensor=2: the head dims cannot be split and are replicated.
SMOLLM2_LAYOUTS = {"wq": ((None, "fsdp", None, None), (2, 144, 9, 64)),
                   "wk": ((None, "fsdp", None, None), (2, 144, 3, 64)),
                   "wo": ((None, None, None, "fsdp"), (2, 9, 64, 144)),
                   "w_gate": ((None, "fsdp", "tensor"), (2, 144, 768))}

_MESH_CHECKS = r"""
import importlib.util, json, math
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from astro_jax import checkpoint
from astro_jax.model import abstract_model, init_model, preset
from astro_jax.sharding import Sharder, make_mesh, state_shardings

EXPECTED = {tuple(json.loads(k)): v for k, v in json.loads(%(expected)r).items()}
SMOLLM2 = json.loads(%(smollm2)r)
TMP = %(tmp)r
assert jax.device_count() == 8
report = {}

B, T = 8, 20
rng = np.random.default_rng(0)
pads = np.array([0, 3, 7, 0, 12, 1, 19, 5])
mask_np = np.arange(T)[None, :] >= pads[:, None]
tokens_np = np.where(mask_np, rng.integers(3, 512, (B, T)), 0).astype(np.int32)
positions_np = np.maximum(np.cumsum(mask_np, 1) - 1, 0).astype(np.int32)

@nnx.jit
def forward(model, tokens, positions, mask):
  return model(tokens, positions, mask)[0]

def logits(model, sharder=None):
  args = [jnp.asarray(tokens_np), jnp.asarray(positions_np), jnp.asarray(mask_np)]
  if sharder is not None:
    args = [jax.device_put(a, sharder.named(("batch", "seq"), a.shape)) for a in args]
  return np.asarray(forward(model, *args))

def pad_spec(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))

def check_layout(model, sharder, expected, where):
  for name, (spec, shard_shape) in expected.items():
    arr = getattr(model, name)[...]
    got = pad_spec(arr.sharding.spec, arr.ndim)
    assert got == tuple(spec), (where, name, got, spec)
    shards = arr.addressable_shards
    assert len(shards) == 8 and all(s.data.shape == tuple(shard_shape) for s in shards), (where, name)
    full = np.asarray(arr)
    for s in shards:  # each device holds exactly its block
      np.testing.assert_array_equal(np.asarray(s.data), full[s.index])
    n_blocks = math.prod(sharder.mesh.shape[a] for a in spec if a is not None)
    assert len({str(s.index) for s in shards}) == n_blocks == full.size // math.prod(shard_shape), (where, name)

def assert_close(got, want, where):
  real = mask_np
  scale = np.abs(want[real]).max()
  delta = np.abs(got - want)[real].max()
  assert delta <= 1e-5 * scale, (where, delta, scale)
  np.testing.assert_array_equal(got.argmax(-1)[real], want.argmax(-1)[real], err_msg=where)
  return float(delta / scale)

def place(model, sharder):  # the weights of `model` moved onto the layout of `sharder` (cheaper than init_model)
  graphdef, abs_state = nnx.split(abstract_model(model.cfg, sharder))
  put = lambda v, s: v.replace(jax.device_put(v[...], s))
  state = jax.tree.map(put, nnx.state(model), state_shardings(abs_state, sharder),
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)

def same_values(a, b):
  for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

# 1. tiny model: every mesh and rule set gives the single-device logits; weights are split as the rules say.
cfg = preset("tiny")
ref_model = init_model(cfg, seed=0)
ref = logits(ref_model)
for mesh_shape, by_rules in EXPECTED.items():
  mesh = make_mesh(*mesh_shape)
  for rules, expected in by_rules.items():
    sharder = Sharder.create(mesh, rules)
    if (mesh_shape, rules) == ((1, 4, 2), "train"):
      model = init_model(cfg, sharder, seed=0)  # sharded initialisation gives the single-device weights
      same_values(model, ref_model)
    else:
      model = place(ref_model, sharder)
    check_layout(model, sharder, expected, (mesh_shape, rules))
    report[f"tiny {mesh_shape} {rules}"] = assert_close(logits(model, sharder), ref, (mesh_shape, rules))

# 2. SmolLM2 shapes (9 heads, 3 kv heads) on tensor=2: replicated heads, no error, same logits.
small = preset("smollm2_135m", n_layers=2, vocab_size=512)
ref_small = init_model(small, seed=1)
ref_small_logits = logits(ref_small)
for mesh_shape in [(1, 4, 2), (2, 2, 2)]:
  sharder = Sharder.create(make_mesh(*mesh_shape), "train")
  model = place(ref_small, sharder)
  if mesh_shape == (1, 4, 2):
    check_layout(model, sharder, SMOLLM2, "smollm2")
  report[f"smollm2-shaped {mesh_shape} train"] = assert_close(logits(model, sharder), ref_small_logits, "smollm2")

# 3. Orbax: saved from fsdp=8, restored onto other mesh shapes / rule sets and one device, bit for bit.
src_sharder = Sharder.create(make_mesh(1, 8, 1), "train")
ckpt = checkpoint.save_orbax(place(ref_model, src_sharder), TMP + "/ckpt_fsdp8")
for mesh_shape, rules in [((2, 2, 2), "sample"), ((1, 4, 2), "train"), (None, None)]:
  sharder = None if mesh_shape is None else Sharder.create(make_mesh(*mesh_shape), rules)
  restored = checkpoint.load_orbax_model(ckpt, sharder=sharder)
  same_values(restored, ref_model)
  if sharder is not None:
    check_layout(restored, sharder, EXPECTED[mesh_shape][rules], ("restored", mesh_shape, rules))
  else:
    assert len(restored.wq[...].sharding.device_set) == 1

# 4. The converter tool loading onto a mesh (--mesh fsdp=4 tensor=2) writes the same checkpoint.
checkpoint.save_hf(ref_model, TMP + "/hf")
spec = importlib.util.spec_from_file_location("convert_hf_to_orbax", "tools/convert_hf_to_orbax.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
assert tool.main(["--hf_dir", TMP + "/hf", "--out", TMP + "/ckpt_tool", "--mesh", "fsdp=4", "tensor=2"]) == 0
same_values(checkpoint.load_orbax_model(TMP + "/ckpt_tool"), ref_model)

print("REPORT " + json.dumps(report))
"""


def test_meshes_match_single_device_and_split_as_the_rules_say(tmp_path):
  expected = json.dumps({json.dumps(list(k)): v for k, v in EXPECTED_LAYOUTS.items()})
  code = _MESH_CHECKS % dict(expected=expected, smollm2=json.dumps(SMOLLM2_LAYOUTS), tmp=str(tmp_path))
  out = run_with_devices(code, n_devices=8)
  report = json.loads(out.split("REPORT ", 1)[1])
  print("\n".join(f"{k}: max|Δ|/max|logit| = {v:.2g}" for k, v in report.items()))
  assert len(report) == 7


_ABSTRACT_CHECKS = r"""
import json, math
import jax
from flax import nnx
from astro_jax.model import abstract_model, preset
from astro_jax.sharding import Sharder, make_mesh, state_shardings

assert jax.device_count() == 8
report = {}
for name, want in [("llama3_8b", 8_030_261_248), ("llama3_70b", 70_553_706_496)]:
  cfg = preset(name)
  for mesh_shape in [(1, 8, 1), (1, 4, 2)]:
    sharder = Sharder.create(make_mesh(*mesh_shape), "train")
    state = nnx.state(abstract_model(cfg, sharder), nnx.Param)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    total = sum(x.size for x in leaves)
    assert total == want == cfg.num_params(), (name, total)
    shardings = jax.tree.leaves(state_shardings(state, sharder))
    per_device = sum(math.prod(s.shard_shape(x.shape)) for x, s in zip(leaves, shardings))
    replicated = sum(x.size for x, s in zip(leaves, shardings) if s.is_fully_replicated)
    # Only the RMSNorm weights (2 per layer + the final one) are replicated; everything else is split 8 ways.
    assert replicated == (2 * cfg.n_layers + 1) * cfg.d_model, (name, replicated)
    assert per_device == (total - replicated) // 8 + replicated, (name, per_device)
    assert per_device - total / 8 <= 7 / 8 * replicated
    report[f"{name} {mesh_shape}"] = dict(total=total, per_device=per_device, replicated=replicated)
print("REPORT " + json.dumps(report))
"""


def test_abstract_llama3_8b_and_70b_split_eight_ways():
  out = run_with_devices(_ABSTRACT_CHECKS, n_devices=8)
  report = json.loads(out.split("REPORT ", 1)[1])
  for key, r in report.items():
    excess = r["per_device"] / (r["total"] / 8) - 1
    print(f"{key}: {r['total']:,} params, {r['per_device']:,} per device (1/8 + {excess:.1e}), "
          f"{r['replicated']:,} replicated")
    # Exact: each device holds 1/8 of the split weights plus all replicated ones (the norms), so the excess
    # over 1/8 is 7/8 * replicated / (total / 8) = 7 * replicated / total (2.3e-4 for 8B, 1.3e-4 for 70B).
    assert excess == pytest.approx(7 * r["replicated"] / r["total"], rel=1e-9) and excess < 2.5e-4
  assert len(report) == 4
