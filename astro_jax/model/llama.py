"""Llama 3 decoder in Flax NNX.

Weights are declared once, with shape and logical axes (see `_weight_specs`). The layers' weights are stacked
on a leading "layers" axis, so one checkpoint layout serves both execution modes: `lax.scan` over layers (one
compiled layer: fast compiles at 80 layers) and an unrolled Python loop. `forward` is the model as a pure
function of its weights; it also takes per-layer weight and cache buffers (`split_layers`,
`KVCache.zeros(per_layer=True)`), which the sampler uses so that a decode step reads every weight and cache
buffer in place instead of copying a layer's slice out of a stacked array (optionally with q/k/v fused into
one matmul). Shape suffixes: B batch, T query tokens, S key slots, D model dim, N query heads, K kv heads,
G = N // K, H head dim, F mlp dim, V vocab, L layers.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from astro_jax.model.config import Execution, ModelConfig
from astro_jax.model.rope import apply_rope, inverse_frequencies, rope_tables
from astro_jax.sharding import Sharder, constrain

LAYER_WEIGHTS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def _weight_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """name -> (shape, logical axes) for every weight of the model."""
  D, N, K, H, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.n_layers,
                         cfg.vocab_size)
  specs = {
      "embed": ((V, D), ("vocab", "embed")),
      "attn_norm": ((L, D), ("layers", "norm")),
      "wq": ((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
      "wk": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "wv": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "wo": ((L, N, H, D), ("layers", "q_heads", "head_dim", "embed")),
      "mlp_norm": ((L, D), ("layers", "norm")),
      "w_gate": ((L, D, F), ("layers", "embed", "mlp")),
      "w_up": ((L, D, F), ("layers", "embed", "mlp")),
      "w_down": ((L, F, D), ("layers", "mlp", "embed")),
      "final_norm": ((D,), ("norm",)),
  }
  if not cfg.tie_embeddings:
    specs["lm_head"] = ((D, V), ("embed", "vocab"))
  return specs


class KVCache(NamedTuple):
  """Per-layer keys and values for all rows. Either every row writes the same slot (`index` a scalar: prompts
  left-padded, the static sampler) or each row its own (`index` [B]: rows left-aligned at slot 0, each at its own
  length, so rows of one program can be at different positions: the continuous engine).

  Keys are stored position-minor ([.., H, S]) so that q @ K is a plain matmul and a decode step never
  transposes the cache; values are [.., S, H] for the same reason on probs @ V. `k`/`v` are either stacked
  ([L, ...], used by `lax.scan`) or tuples of L per-layer buffers (`per_layer=True`): an unrolled decode then
  updates and reads each layer's buffer in place, with no per-layer slice copies.
  """
  k: jax.Array | tuple[jax.Array, ...]  # [L, B, K, H, S] or L x [B, K, H, S]
  v: jax.Array | tuple[jax.Array, ...]  # [L, B, K, S, H] or L x [B, K, S, H]
  index: jax.Array                      # int32 [] (every row) or [B] (per row): the next slot to write

  AXES_K = ("layers", "batch", "kv_heads", "head_dim", "cache_seq")
  AXES_V = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32, per_layer: bool = False) -> "KVCache":
    L, K, H = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    if per_layer:
      return cls(tuple(jnp.zeros((batch, K, H, length), dtype) for _ in range(L)),
                 tuple(jnp.zeros((batch, K, length, H), dtype) for _ in range(L)), jnp.zeros((), jnp.int32))
    return cls(jnp.zeros((L, batch, K, H, length), dtype), jnp.zeros((L, batch, K, length, H), dtype),
               jnp.zeros((), jnp.int32))

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, (tuple, list))

  @property
  def length(self) -> int:
    return (self.k[0] if self.per_layer else self.k).shape[-1]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32; the result is cast back before the weight multiply (as HF does)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * y.astype(x.dtype)


def blocked_attention(q_BTNH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array,
                      block: int) -> jax.Array:
  """`attention`, `block` queries at a time, each block rematerialised in the backward pass: the float32 scores
  of one block [B, K, G, block, S] exist at once instead of all T rows of them (long packed training rows)."""
  B, T, N, H = q_BTNH.shape
  if not block or T <= block or T % block:
    return attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS)
  n = T // block
  q_nBbNH = q_BTNH.reshape(B, n, block, N, H).swapaxes(0, 1)
  mask_nBbS = mask_BTS.reshape(B, n, block, -1).swapaxes(0, 1)
  one = jax.checkpoint(lambda xs: attention(xs[0], k_BKHS, v_BKSH, xs[1]))
  return jax.lax.map(one, (q_nBbNH, mask_nBbS)).swapaxes(0, 1).reshape(B, T, N, H)


def attention(q_BTNH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
  """Grouped-query attention; scores and softmax in float32. Returns [B, T, N, H]."""
  B, T, N, H = q_BTNH.shape
  K = k_BKHS.shape[1]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  # Decode (T = 1) multiplies and reduces instead: as dots, these are B * K tiny [G, H] x [H, S] products, which
  # took a quarter of a batch-16 decode step on CPU.
  if T == 1:
    q_BKGH1 = q_BTKGH[:, 0, :, :, :, None].astype(jnp.float32)
    scores = jnp.sum(q_BKGH1 * k_BKHS[:, :, None].astype(jnp.float32), axis=3)[:, :, :, None]  # [B,K,G,1,S]
  else:
    scores = jnp.einsum("btkgh,bkhs->bkgts", q_BTKGH, k_BKHS, preferred_element_type=jnp.float32)
  scores = scores * (H ** -0.5)
  scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if T == 1:
    out = jnp.sum(probs[:, :, :, 0, :, None] * v_BKSH[:, :, None].astype(jnp.float32), axis=3)  # [B,K,G,H]
    out = out[:, None].astype(v_BKSH.dtype)
  else:
    out = jnp.einsum("bkgts,bksh->btkgh", probs.astype(v_BKSH.dtype), v_BKSH)
  return out.reshape(B, T, N, H)


def _write_kv(kv, k_BKHT: jax.Array, v_BKTH: jax.Array, index: jax.Array):
  """Write this step's keys/values into the layer's cache; return (keys, values) to attend to and the cache.

  kv: None (no cache: attend to this call's tokens), (k_BKHS, v_BKSH) one layer's own buffers, or
  (k_all, v_all, i) the stacked cache and this layer's index.
  """
  if kv is None:
    return k_BKHT, v_BKTH, None
  if index.ndim:  # per-row slots: one in-place update per row (a scatter)
    put_k = jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (0, 0, s)))
    put_v = jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (0, s, 0)))
  else:
    put_k = lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (0, 0, 0, s))
    put_v = lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (0, 0, s, 0))
  if len(kv) == 2:
    k, v = kv
    k, v = put_k(k, k_BKHT.astype(k.dtype), index), put_v(v, v_BKTH.astype(v.dtype), index)
    return k, v, (k, v)
  k_all, v_all, i = kv
  if not index.ndim:
    k_all = jax.lax.dynamic_update_slice(k_all, k_BKHT[None].astype(k_all.dtype), (i, 0, 0, 0, index))
    v_all = jax.lax.dynamic_update_slice(v_all, v_BKTH[None].astype(v_all.dtype), (i, 0, 0, index, 0))
  else:
    k_all, v_all = _put_layer(k_all, v_all, i, k_BKHT, v_BKTH, index, put_k, put_v)
  keys = jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False)
  values = jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False)
  return keys, values, (k_all, v_all, i)


def _put_layer(k_all, v_all, i, k_BKHT, v_BKTH, index_B, put_k, put_v):
  """Per-row writes into layer i of a stacked cache."""
  k_l = put_k(jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False), k_BKHT.astype(k_all.dtype), index_B)
  v_l = put_v(jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False), v_BKTH.astype(v_all.dtype), index_B)
  k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_l, i, 0)
  v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_l, i, 0)
  return k_all, v_all


def _layer(cfg: ModelConfig, run: Execution, sharder: Sharder | None, x_BTD, w, kv, cos, sin, mask_BTS, index):
  """One decoder layer run as `run` says; `kv` as in `_write_kv` (new keys/values go to slot `index`)."""
  dt = run.jnp_dtype
  B, T, _ = x_BTD.shape
  N, H = cfg.n_heads, cfg.head_dim
  h = checkpoint_name(rms_norm(x_BTD, w["attn_norm"], cfg.rms_norm_eps), "attn_input")
  if "wqkv" in w:  # fused layout (split_layers(fuse=True)): one matmul; q heads grouped by their kv head
    G = N // cfg.n_kv_heads
    qkv = jnp.einsum("btd,dkch->btkch", h, w["wqkv"].astype(dt))
    q, k, v = qkv[:, :, :, :G].reshape(B, T, N, H), qkv[:, :, :, G], qkv[:, :, :, G + 1]
  else:
    q = jnp.einsum("btd,dnh->btnh", h, w["wq"].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", h, w["wk"].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", h, w["wv"].astype(dt))
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  keys, values, kv = _write_kv(kv, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), index)
  attn = blocked_attention(q, keys.astype(dt), values.astype(dt), mask_BTS, run.attention_block)
  # Contract over the flattened (n, h) so that XLA transposes the small activation, never the weight.
  x_BTD = x_BTD + jnp.einsum("btm,md->btd", attn.reshape(B, T, N * H), w["wo"].reshape(N * H, -1).astype(dt))
  x_BTD = constrain(sharder, x_BTD, ("batch", "seq", "act_embed"))
  h = checkpoint_name(rms_norm(x_BTD, w["mlp_norm"], cfg.rms_norm_eps), "mlp_input")
  gate = jnp.einsum("btd,df->btf", h, w["w_gate"].astype(dt))
  up = jnp.einsum("btd,df->btf", h, w["w_up"].astype(dt))
  act = constrain(sharder, jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
  x_BTD = x_BTD + jnp.einsum("btf,fd->btd", act, w["w_down"].astype(dt))
  return constrain(sharder, x_BTD, ("batch", "seq", "act_embed")), kv


def _rematerialised(layer, policy: str, in_scan: bool):
  """The layer under the named remat policy (model.config.REMAT_POLICIES)."""
  if policy == "none":
    return layer
  saveable = {"full": None, "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
              "save_layer_inputs": jax.checkpoint_policies.save_only_these_names("attn_input", "mlp_input")}[policy]
  # Inside lax.scan the loop already keeps XLA from merging the recomputation with the forward pass.
  return jax.checkpoint(layer, policy=saveable, prevent_cse=not in_scan)


def head_logits(cfg: ModelConfig, params: dict, x_BTD: jax.Array, dt) -> jax.Array:
  """Float32 logits of (final-normed) hidden states: the output head, tied or not."""
  if cfg.tie_embeddings:  # contract with embed [V, D] as stored: `embed.T` costs a transposed copy per call
    return jnp.einsum("btd,vd->btv", x_BTD.astype(dt), params["embed"].astype(dt), preferred_element_type=jnp.float32)
  return jnp.einsum("btd,dv->btv", x_BTD.astype(dt), params["lm_head"].astype(dt), preferred_element_type=jnp.float32)


def forward(cfg: ModelConfig, sharder: Sharder | None, params: dict, tokens_BT: jax.Array, positions_BT: jax.Array,
            kv_mask_BS: jax.Array | None = None, cache: KVCache | None = None, *,
            segment_ids_BT: jax.Array | None = None, prefix_segment_BT: jax.Array | None = None,
            run: Execution = Execution(), last_only: bool = False,
            hidden_only: bool = False) -> tuple[jax.Array, KVCache | None]:
  """The model as a pure function of its weights (see `Llama.__call__` for the arguments).

  params: "embed", "final_norm", "lm_head" (untied) and the layer weights, either stacked (name -> [L, ...],
  run with `lax.scan` or an unrolled loop as `run.scan_layers` says) or as "layers": a tuple of L per-layer
  dicts (`split_layers`), always unrolled, each weight read from its own buffer (no per-layer slice copy).
  segment_ids_BT: packed rows (no cache): a token attends only to earlier tokens of its own segment.
  prefix_segment_BT: with segment_ids, a token also attends to the segment this names (a prompt packed once, earlier
    in the row, for several responses that each see it but not each other); 0: none.
  hidden_only: return the final-normed hidden states [B, T, D] instead of logits (for a chunked loss).
  """
  dt = run.jnp_dtype
  B, T = tokens_BT.shape
  index = jnp.zeros((), jnp.int32) if cache is None else cache.index
  S = T if cache is None else cache.length
  if kv_mask_BS is None:
    kv_mask_BS = jnp.ones((B, S), bool)
  q_slot_BT = jnp.broadcast_to((index[:, None] if index.ndim else index) + jnp.arange(T), (B, T))
  mask_BTS = kv_mask_BS[:, None, :] & (jnp.arange(S)[None, None, :] <= q_slot_BT[:, :, None])
  if segment_ids_BT is not None:
    if cache is not None:
      raise ValueError("segment_ids are for packed rows without a KV cache")
    seen_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    if prefix_segment_BT is not None:
      seen_BTS |= (prefix_segment_BT[:, :, None] == segment_ids_BT[:, None, :]) & (prefix_segment_BT[:, :, None] > 0)
    mask_BTS &= seen_BTS
  elif prefix_segment_BT is not None:
    raise ValueError("prefix_segment needs segment_ids")
  cos, sin = rope_tables(positions_BT, inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))

  x = jnp.take(params["embed"], tokens_BT, axis=0).astype(dt)
  x = constrain(sharder, x, ("batch", "seq", "act_embed"))

  def layer(x, w, kv):
    return _layer(cfg, run, sharder, x, w, kv, cos, sin, mask_BTS, index)
  scanned = "layers" not in params and run.scan_layers
  layer = _rematerialised(layer, run.remat, scanned)

  if "layers" in params:  # per-layer weights and (optionally) per-layer cache buffers: unrolled
    if cache is not None and not cache.per_layer:
      raise ValueError("per-layer weights (split_layers) need a per-layer KVCache (KVCache.zeros(per_layer=True))")
    kvs = [None] * cfg.n_layers if cache is None else list(zip(cache.k, cache.v))
    for i, w in enumerate(params["layers"]):
      x, kvs[i] = layer(x, w, kvs[i])
    k_out, v_out = (None, None) if cache is None else (tuple(kv[0] for kv in kvs), tuple(kv[1] for kv in kvs))
  elif cache is not None and cache.per_layer:
    raise ValueError("a per-layer KVCache needs per-layer weights (split_layers)")
  else:
    weights = {name: params[name] for name in LAYER_WEIGHTS}
    k_out, v_out = (None, None) if cache is None else (cache.k, cache.v)
    if scanned:
      def body(carry, xs):
        x, k_all, v_all = carry
        w, i = xs
        x, kv = layer(x, w, None if k_all is None else (k_all, v_all, i))
        return (x, *((None, None) if kv is None else kv[:2])), None
      (x, k_out, v_out), _ = jax.lax.scan(body, (x, k_out, v_out), (weights, jnp.arange(cfg.n_layers)))
    else:
      for i in range(cfg.n_layers):
        x, kv = layer(x, jax.tree.map(lambda a: a[i], weights), None if k_out is None else (k_out, v_out, i))
        if kv is not None:
          k_out, v_out = kv[:2]

  if last_only:
    x = x[:, -1:]
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  new_cache = None if cache is None else KVCache(k_out, v_out, index + T)
  if hidden_only:
    return constrain(sharder, x, ("batch", "seq", "act_embed")), new_cache
  logits = constrain(sharder, head_logits(cfg, params, x, dt), ("batch", "seq", "act_vocab"))
  return logits, new_cache


# Logical axes of the fused q/k/v weight made by split_layers(fuse=True): [D, K, G + 2, H].
WQKV_AXES = ("embed", "kv_heads", None, "head_dim")


def split_layers(params: dict, fuse: bool = False, sharder: Sharder | None = None) -> dict:
  """Stacked layer weights (name -> [L, ...]) -> "layers": a tuple of per-layer dicts (for unrolled decode).

  fuse: also join each layer's q/k/v projections into one "wqkv" [D, K, G + 2, H] (per kv head: its G query
  heads, then its key and its value head): one matmul instead of three, ~5% of a batch-1 decode step on CPU,
  where every matmul pays a fixed cost (fusing gate/up too cost ~5% at batch 16 and 64, so it is not done).
  Heads stay grouped by kv head, so the tensor-parallel sharding over kv heads is unchanged.
  """
  out = {k: v for k, v in params.items() if k not in LAYER_WEIGHTS}
  L = params[LAYER_WEIGHTS[0]].shape[0]
  layers = []
  for i in range(L):
    w = {name: params[name][i] for name in LAYER_WEIGHTS}
    if fuse:
      D, N, H = w["wq"].shape
      K = w["wk"].shape[1]
      wqkv = jnp.concatenate([w.pop("wq").reshape(D, K, N // K, H), w.pop("wk")[:, :, None],
                              w.pop("wv")[:, :, None]], axis=2)
      w["wqkv"] = constrain(sharder, wqkv, WQKV_AXES)
    layers.append(w)
  out["layers"] = tuple(layers)
  return out


class Llama(nnx.Module):
  """Llama 3 / SmolLM2-style decoder: embeddings, L x (RMSNorm, GQA + RoPE, RMSNorm, SwiGLU), tied/untied head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, sharder: Sharder | None = None,
               run: Execution = Execution()):
    self.cfg = cfg
    self.sharder = sharder
    self.run = run  # how __call__ runs the model; a trainer or sampler calling `forward` brings its own
    for name, (shape, axes) in _weight_specs(cfg).items():
      if name.endswith("norm"):
        value = jnp.ones(shape, cfg.jnp_param_dtype)
      else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(cfg.jnp_param_dtype)
      setattr(self, name, nnx.Param(value, logical_axes=axes))

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array, kv_mask_BS: jax.Array | None = None,
               cache: KVCache | None = None, *, segment_ids_BT: jax.Array | None = None,
               last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
    """Logits [B, T or 1, V] in float32, and the updated cache (run as `self.run` says).

    positions_BT: RoPE position of each token (left-padded rows start at 0 on their first real token).
    kv_mask_BS:   which key slots hold real tokens (S = T without a cache, the cache length with one);
                  attention is additionally causal over slots.
    segment_ids_BT: packed rows: attention stays within each segment (positions restart per segment).
    last_only:    compute logits for the last position only (prefill for sampling).
    """
    return forward(self.cfg, self.sharder, self.weights(), tokens_BT, positions_BT, kv_mask_BS, cache,
                   segment_ids_BT=segment_ids_BT, run=self.run, last_only=last_only)

  def weights(self) -> dict:
    """The weights as a dict of arrays (stacked layers), the input of `forward`."""
    return {name: getattr(self, name)[...] for name in _weight_specs(self.cfg)}


def weight_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Public view of the weight table (checkpoint conversion validates shapes against it)."""
  return _weight_specs(cfg)


def abstract_model(cfg: ModelConfig, sharder: Sharder | None = None, run: Execution = Execution()) -> Llama:
  """The model with ShapeDtypeStruct weights: no memory is allocated."""
  return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), sharder=sharder, run=run))


def init_model(cfg: ModelConfig, sharder: Sharder | None = None, seed: int = 0, run: Execution = Execution()) -> Llama:
  """Randomly initialised model, each weight created directly in its sharding (never whole on one device)."""
  graphdef, abs_state = nnx.split(abstract_model(cfg, sharder, run))
  from astro_jax.sharding import state_shardings
  out_shardings = None if sharder is None else state_shardings(abs_state, sharder)

  @jax.jit
  def init():
    return nnx.state(Llama(cfg, rngs=nnx.Rngs(seed), sharder=sharder, run=run))

  state = jax.jit(init, out_shardings=out_shardings)() if out_shardings is not None else init()
  return nnx.merge(graphdef, state)


def count_params(model: Llama) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
