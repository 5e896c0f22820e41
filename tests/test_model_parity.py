"""Parity of the Flax NNX Llama with Hugging Face PyTorch, and agreement of its execution modes.

Reference logits come from `transformers.LlamaForCausalLM` (eager attention, fp32) on
  - the real SmolLM2-135M-Instruct with a left-padded batch of real prompts, and
  - a random tiny Llama-3.1-style model (llama3 rope scaling, GQA 4:1, untied head) at positions far beyond
    its `original_max_position_embeddings`.
HF gets explicit position ids (first real token = 0), as `generate` computes them for left-padded rows.
Only real (non-pad) positions are compared; pad rows attend to nothing and their outputs are meaningless.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from astro_jax.checkpoint import load_hf_model
from astro_jax.model import Execution, KVCache, RopeScaling, from_hf_config, preset, to_hf_config
from astro_jax.model.config import REMAT_POLICIES
from astro_jax.model.llama import forward, split_layers
from astro_jax.model.rope import inverse_frequencies
from tests.conftest import PROMPTS, TINY_ORIGINAL_CTX, make_tiny_llama31_hf

REL_TOL = 1e-4  # max |Δ| <= REL_TOL * max |logit| over real positions (fp32)

TINY_LEN = 96          # > 3 x original_max_position_embeddings (TINY_ORIGINAL_CTX)
TINY_PADS = (0, 9, 40)  # left padding per row; row 0 reaches position 95


def left_padded_positions(mask: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def hf_logits(model: transformers.PreTrainedModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(left_padded_positions(mask)).long())
  return out.logits.float().numpy()


def jax_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  logits, _ = model(jnp.asarray(ids), jnp.asarray(left_padded_positions(mask)), jnp.asarray(mask, bool))
  return np.asarray(logits)


def relative_error(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
  """(max |Δ|, max |ref|) over real positions."""
  real = mask.astype(bool)
  return float(np.abs(ours - ref)[real].max()), float(np.abs(ref[real]).max())


def assert_parity(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray, rel: float = REL_TOL) -> None:
  assert ours.shape == ref.shape and ours.dtype == np.float32
  delta, scale = relative_error(ours, ref, mask)
  assert delta <= rel * scale, f"max|Δ|={delta:.3g} > {rel:g} * max|logit|={scale:.3g}"
  real = mask.astype(bool)
  np.testing.assert_array_equal(ours.argmax(-1)[real], ref.argmax(-1)[real])


# --- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_batch(smollm2_dir):
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  tok.padding_side = "left"
  enc = tok(PROMPTS, padding=True, return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  lengths = mask.sum(1)
  assert len(set(lengths)) == len(PROMPTS) and (mask[:, 0] == 0).any()  # really ragged and left-padded
  return ids, mask


@pytest.fixture(scope="module")
def smollm2_hf_logits(smollm2_dir, smollm2_batch):
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
  return hf_logits(model, *smollm2_batch)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llama31_hf")
  model = make_tiny_llama31_hf(path)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 512, size=(len(TINY_PADS), TINY_LEN)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, pad in enumerate(TINY_PADS):
    ids[row, :pad], mask[row, :pad] = 0, 0
  return path, ids, mask, hf_logits(model, ids, mask)


@pytest.fixture(scope="module")
def tiny_model(tiny_hf):
  return load_hf_model(tiny_hf[0])


# --- parity with HF --------------------------------------------------------------------------------------------

def test_smollm2_fp32_matches_hf(smollm2_dir, smollm2_batch, smollm2_hf_logits):
  model = load_hf_model(smollm2_dir)
  assert model.cfg.tie_embeddings and (model.cfg.n_heads, model.cfg.n_kv_heads) == (9, 3)
  ours = jax_logits(model, *smollm2_batch)
  assert_parity(ours, smollm2_hf_logits, smollm2_batch[1])
  delta, scale = relative_error(ours, smollm2_hf_logits, smollm2_batch[1])
  print(f"SmolLM2 fp32: max|Δ|={delta:.3g}, max|logit|={scale:.3g}, ratio={delta / scale:.3g}")


def test_tiny_llama31_matches_hf_beyond_original_context(tiny_hf, tiny_model):
  path, ids, mask, ref = tiny_hf
  cfg = tiny_model.cfg
  assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, TINY_ORIGINAL_CTX)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (8, 2, False)
  assert left_padded_positions(mask).max() == TINY_LEN - 1 > 2 * TINY_ORIGINAL_CTX
  ours = jax_logits(tiny_model, ids, mask)
  assert_parity(ours, ref, mask)
  delta, scale = relative_error(ours, ref, mask)
  print(f"tiny llama3.1: max|Δ|={delta:.3g}, max|logit|={scale:.3g}, ratio={delta / scale:.3g}")
  # The comparison is sensitive to the scaling: without it, the logits beyond the original context differ.
  unscaled = jax_logits(load_hf_model(path, rope_scaling=None), ids, mask)
  assert relative_error(unscaled, ref, mask)[0] > 100 * REL_TOL * scale


@pytest.mark.parametrize("name", ["llama3.1_8b", "llama3.2_1b", "tiny_llama31", "smollm2_135m"])
def test_rope_frequencies_match_hf(name):
  cfg = preset(name)
  hf_config = transformers.LlamaConfig(**to_hf_config(cfg))
  rope_type = hf_config.rope_parameters["rope_type"]
  init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(rope_type)
  if init is None:  # "default" is computed inside LlamaRotaryEmbedding
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config).inv_freq
  else:
    ref, _ = init(hf_config, torch.device("cpu"))
  ours = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
  np.testing.assert_allclose(ours, ref.float().numpy(), rtol=1e-6, atol=0)


# --- execution modes --------------------------------------------------------------------------------------------

def test_scan_unrolled_and_remat_agree(tiny_hf, tiny_model):
  """Logits and gradients are the same with lax.scan or an unrolled loop over layers, with and without remat."""
  path, ids, mask, _ = tiny_hf
  tokens, positions, kv_mask = jnp.asarray(ids), jnp.asarray(left_padded_positions(mask)), jnp.asarray(mask, bool)

  @nnx.jit
  def logits_and_grads(model):
    def loss(model):  # next-token cross entropy over real positions
      logits, _ = model(tokens, positions, kv_mask)
      logp = jax.nn.log_softmax(logits[:, :-1])
      nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      return jnp.sum(nll * kv_mask[:, 1:]) / jnp.sum(kv_mask[:, 1:]), logits
    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, nnx.state(grads, nnx.Param)

  base_logits, base_grads = logits_and_grads(tiny_model)
  scale = float(jnp.abs(base_logits).max())
  np.testing.assert_allclose(base_logits, jax_logits(tiny_model, ids, mask), rtol=0, atol=1e-6 * scale)
  runs = [Execution(scan_layers=False)] + [Execution(scan_layers=scan, remat=policy) for scan in (True, False)
                                           for policy in REMAT_POLICIES[1:]]
  for kwargs in runs:
    logits, grads = logits_and_grads(load_hf_model(path, run=kwargs))
    np.testing.assert_allclose(logits, base_logits, rtol=0, atol=1e-6 * scale, err_msg=str(kwargs))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()), err_msg=str(kwargs))


def test_bf16_compute_is_close(smollm2_dir, smollm2_batch, smollm2_hf_logits):
  ids, mask = smollm2_batch
  real = mask.astype(bool)
  for kwargs in (dict(run=Execution("bfloat16")), dict(run=Execution("bfloat16"), param_dtype="bfloat16")):
    model = load_hf_model(smollm2_dir, **kwargs)
    assert model.embed[...].dtype == jnp.dtype(kwargs.get("param_dtype", "float32"))
    ours = jax_logits(model, ids, mask)
    assert ours.dtype == np.float32 and np.isfinite(ours[real]).all()
    delta, scale = relative_error(ours, smollm2_hf_logits, mask)
    agree = float((ours.argmax(-1) == smollm2_hf_logits.argmax(-1))[real].mean())
    print(f"SmolLM2 {kwargs}: max|Δ|={delta:.3g} (max|logit| {scale:.3g}), argmax agreement {agree:.3f}")
    assert delta <= 0.1 * scale and agree >= 0.85, (delta, scale, agree)


def test_kv_cache_chunked_prefill_and_decode_match_full_forward(tiny_hf, tiny_model):
  _, ids, mask, _ = tiny_hf
  full = jax_logits(tiny_model, ids, mask)
  positions = left_padded_positions(mask)
  cache = KVCache.zeros(tiny_model.cfg, ids.shape[0], TINY_LEN)
  kv_mask = jnp.asarray(mask, bool)  # slots not yet written are excluded by the causal mask
  bounds = [0, 37, 38, 70] + list(range(71, TINY_LEN + 1))  # chunks of 37, 1, 32 and then one-token decode steps
  step = nnx.jit(lambda model, tokens, pos, cache: model(tokens, pos, kv_mask, cache))
  pieces = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    logits, cache = step(tiny_model, jnp.asarray(ids[:, a:b]), jnp.asarray(positions[:, a:b]), cache)
    assert int(cache.index) == b
    pieces.append(np.asarray(logits))
  chunked = np.concatenate(pieces, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(chunked[real], full[real], rtol=0, atol=1e-5 * np.abs(full[real]).max())
  np.testing.assert_array_equal(chunked.argmax(-1)[real], full.argmax(-1)[real])

  # Prefill of the whole prompt with `last_only` gives the last position's logits.
  last, _ = tiny_model(jnp.asarray(ids), jnp.asarray(positions), kv_mask,
                       KVCache.zeros(tiny_model.cfg, ids.shape[0], TINY_LEN), last_only=True)
  np.testing.assert_allclose(np.asarray(last)[:, 0], full[:, -1], rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("fuse", [False, True])
def test_per_layer_weights_and_cache_match_stacked(tiny_hf, tiny_model, fuse):
  """The sampler's layout: per-layer weight buffers (with q/k/v fused, query heads grouped by kv head) and a
  per-layer cache, prefill then one-token decode, give the stacked model's logits."""
  _, ids, mask, _ = tiny_hf
  cfg = tiny_model.cfg
  full = jax_logits(tiny_model, ids, mask)
  params = jax.jit(lambda p: split_layers(p, fuse=fuse))(tiny_model.weights())
  layer = params["layers"][0]
  assert ("wqkv" in layer) == fuse and ("wq" in layer) == (not fuse)
  positions, kv_mask = jnp.asarray(left_padded_positions(mask)), jnp.asarray(mask, bool)
  step = jax.jit(lambda p, tokens, pos, cache: forward(cfg, None, p, tokens, pos, kv_mask, cache))
  cache = KVCache.zeros(cfg, ids.shape[0], TINY_LEN, per_layer=True)
  pieces = []
  for a, b in zip([0] + list(range(60, TINY_LEN)), list(range(60, TINY_LEN + 1))):
    logits, cache = step(params, jnp.asarray(ids[:, a:b]), positions[:, a:b], cache)
    pieces.append(np.asarray(logits))
  ours = np.concatenate(pieces, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], full[real], rtol=0, atol=1e-5 * np.abs(full[real]).max())
  with pytest.raises(ValueError, match="per-layer"):  # stacked weights cannot use a per-layer cache
    forward(cfg, None, tiny_model.weights(), jnp.asarray(ids[:, :1]), positions[:, :1], kv_mask,
            KVCache.zeros(cfg, ids.shape[0], TINY_LEN, per_layer=True))


# --- HF config.json <-> ModelConfig ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama3_8b", "llama3.1_8b", "llama3.1_70b", "llama3.2_1b", "llama3.2_3b",
                                  "smollm2_135m", "tiny", "tiny_llama31"])
def test_hf_config_round_trip(name):
  cfg = preset(name)
  hf = to_hf_config(cfg)
  assert from_hf_config(hf) == cfg
  # transformers reads what we write, and we read what transformers writes.
  hf_config = transformers.LlamaConfig(**hf)
  assert from_hf_config(hf_config.to_dict()) == cfg
  assert hf_config.rope_parameters["rope_theta"] == cfg.rope_theta
  assert hf_config.rope_parameters["rope_type"] == ("default" if cfg.rope_scaling is None else "llama3")
  assert hf_config.tie_word_embeddings == cfg.tie_embeddings and hf_config.head_dim == cfg.head_dim


def test_hf_config_rope_key_styles():
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
  base = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 131072, "tie_word_embeddings": False, "bos_token_id": 128000,
          "eos_token_id": [128001, 128008, 128009]}
  want = preset("llama3.1_8b")
  # transformers 4 (Meta's Llama-3.1-8B config.json): top-level rope_theta, rope_scaling with "rope_type" or "type".
  assert from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}) == want
  assert from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}}) == want
  # transformers 5: everything under rope_parameters.
  v5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
  assert from_hf_config(v5) == want
  # no scaling; head_dim defaults to hidden_size // heads; theta defaults to 10000 when absent.
  plain = from_hf_config({**base, "rope_scaling": None, "eos_token_id": 128001})
  assert plain.rope_scaling is None and plain.rope_theta == 10_000.0 and plain.head_dim == 128
  assert plain.eos_token_ids == (128001,)
  v4_default = from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": None})
  assert v4_default == preset("llama3_8b").replace(max_position_embeddings=131072)
  with pytest.raises(ValueError, match="rope type 'yarn'"):
    from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="model_type='mistral'"):
    from_hf_config({**base, "model_type": "mistral"})


def test_from_hf_config_reads_real_smollm2(smollm2_dir):
  cfg = from_hf_config(smollm2_dir)
  want = preset("smollm2_135m", max_position_embeddings=cfg.max_position_embeddings)
  assert cfg.replace(rms_norm_eps=want.rms_norm_eps) == want
  assert cfg.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
