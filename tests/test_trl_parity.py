"""Golden parity against TRL's `GRPOTrainer` (trl, a test-only dependency): the independent reference for the RL
loss (tests/test_policy_loss.py checks our formulas against our own NumPy transcription of them).

One tiny random HF Llama (tests.conftest.make_tiny_llama31_hf: llama3 RoPE scaling, GQA, untied head, seed 0, fp32)
is loaded by TRL as a torch model and by us through the repo's converter (`checkpoint.load_hf_model`). The data are
fixed: 3 prompts of different lengths (TRL left-pads them), 4 completions each of 1..6 tokens (right-padded; most
end with EOS, two are truncated), rewards (a mixed group, a shaped one, one whose rewards are all equal), and old
log-probs: TRL's own at the current weights shifted by fixed offsets in [-0.5, 0.5], so the ratio leaves both clip
bounds on tokens whose advantage makes the clip bind (asserted). TRL's side is its own code, not a transcription:
`_generate_and_score_completions` (fed the completions through its `rollout_func` hook and the rewards through a
reward function) builds the padded batch, the completion mask and the advantages; `_get_per_token_logps_and_
entropies` (its fused LM head, at the sampling temperature) the per-token log-probs; `compute_loss` the loss, and
its backward the gradients. No training loop, no generation, no hub; CPU, fp32. trl is pinned (==1.16.0 in
requirements.txt and the `test` extra): the first two are internals, free to change between releases.

Shared aggregations (ours -> TRL's `loss_type`), beta = 0, one process, one micro-batch:
  seq-mean-token-mean     -> grpo     loss.scale_std true  -> scale_rewards "group"
  seq-mean-token-sum-norm -> dr_grpo  loss.scale_std false -> scale_rewards "none"; max_len (sampling.max_new_tokens)
                                                              -> max_completion_length (8 here: > the longest
                                                              completion, so the constant is not the padded length)
  token-mean              -> dapo     loss.scale_std true  -> scale_rewards "group"
  loss.eps_low / loss.eps_high -> epsilon / epsilon_high; sampling.temperature -> temperature.
Compared: advantages, per-token log-probs of the completion tokens, the loss (each rtol 1e-5), and the gradient of
the loss w.r.t. every weight tensor (TRL's mapped to our layout by the converter; max |Δ| <= 1e-5 max |g| per
tensor: an elementwise rtol means nothing on entries near 0). The test can fail: each TRL loss is matched by the
one aggregation mapped to it and by none of our five other (aggregation, scale_std) pairs.

Differences by design (documented and measured here, not hidden):
  * Advantage epsilon: TRL divides by (std + 1e-4), `group_advantages` by (std + eps), eps = 1e-6 by default (what
    the learner uses). Parity is checked with eps = 1e-4; with the default the advantages differ by a relative
    ~1e-4 / std (asserted within [1e-5, 2e-4] / std here).
  * Responses without loss tokens (truncated ones under our `reward.overlong = "mask"` / TRL's
    `mask_truncated_completions`): our seq-mean aggregations average over the responses that have tokens, TRL's
    grpo and dr_grpo over all B rows (an empty row adds 0 to the sum and 1 to the count), so ours = TRL's *
    B / (B - empty rows); token-mean and dapo agree. `test_masked_rows_differ_by_design` pins this.
  * Gradient accumulation: TRL's grpo / dr_grpo average per micro-batch, then over micro-batches; ours divide the
    sums of all micro-batches once. Identical with one micro-batch (here); not compared across accumulation.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402

from astro_jax.checkpoint import load_hf_model, model_from_tensors  # noqa: E402
from astro_jax.model import Execution  # noqa: E402
from astro_jax.train import losses, rollouts  # noqa: E402
from astro_jax.train import policy_loss as pl  # noqa: E402
from tests.conftest import make_tiny_llama31_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

RTOL = 1e-5
VOCAB = 512
PAD, BOS, EOS = 0, 1, 2
G = 4                    # num_generations
MAX_COMPLETION = 8       # max_completion_length = our max_len
TEMPERATURE = 0.7
EPS_LOW, EPS_HIGH = 0.2, 0.28
TRL_EPS = 1e-4           # TRL's advantage epsilon
PROMPT_LENGTHS = (5, 9, 3)
COMPLETION_LENGTHS = (6, 2, 4, 5, 1, 3, 6, 4, 2, 5, 3, 6)
TRUNCATED = (0, 9)       # completions without EOS (mask_truncated_completions drops them)
REWARDS = (1.0, -1.0, 0.5, -1.0,   # mixed
           1.0, 0.25, -0.75, 1.0,  # shaped (e.g. an overlong penalty)
           1.0, 1.0, 1.0, 1.0)     # all equal: advantage 0
B = len(COMPLETION_LENGTHS)

SHARED = {"grpo": ("seq-mean-token-mean", True), "dr_grpo": ("seq-mean-token-sum-norm", False),
          "dapo": ("token-mean", True)}  # TRL loss_type -> (our aggregation, scale_std)
OURS = list(itertools.product(pl.AGGREGATIONS, (True, False)))


def fixed_data():
  rng = np.random.default_rng(20)
  prompts = [[BOS] + rng.integers(3, VOCAB, n - 1).tolist() for n in PROMPT_LENGTHS]
  prompt_ids = [prompts[i // G] for i in range(B)]
  completions = [rng.integers(3, VOCAB, n).tolist() for n in COMPLETION_LENGTHS]
  for b, c in enumerate(completions):
    if b not in TRUNCATED:
      c[-1] = EOS
  offsets = [rng.uniform(-0.5, 0.5, n) for n in COMPLETION_LENGTHS]
  return prompt_ids, completions, offsets


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer over the model's 512 ids (TRL decodes completions, needs pad/eos), built in memory."""
  from tokenizers import Tokenizer, models
  vocab = {f"t{i}": i for i in range(3, VOCAB)} | {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                              eos_token="</s>", unk_token="<pad>")


def trl_side(hf_dir, out_dir, loss_type: str, scale_rewards: str, mask_truncated: bool = False) -> dict:
  """TRL's advantages, completion mask, per-token log-probs, loss and gradients (HF names) on the fixed data."""
  from datasets import Dataset
  from trl import GRPOConfig, GRPOTrainer
  prompt_ids, completions, offsets = fixed_data()

  def rollout(prompts, trainer):  # TRL's custom-rollout hook: the fixed completions instead of generation
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

  def reward(prompts, completions, idx, **_):
    return [REWARDS[i] for i in idx]

  args = GRPOConfig(output_dir=str(out_dir), loss_type=loss_type, scale_rewards=scale_rewards, epsilon=EPS_LOW,
                    epsilon_high=EPS_HIGH, beta=0.0, num_generations=G, per_device_train_batch_size=B,
                    gradient_accumulation_steps=1, num_iterations=1, max_completion_length=MAX_COMPLETION,
                    temperature=TEMPERATURE, mask_truncated_completions=mask_truncated, use_cpu=True, bf16=False,
                    fp16=False, report_to="none", seed=0)
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  dataset = Dataset.from_list([{"prompt": f"p{i // G}", "idx": i} for i in range(B)])
  trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                        processing_class=tiny_tokenizer(), rollout_func=rollout)
  trainer.model.train()  # compute_loss's "train" mode (Llama has no dropout)
  trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch
  inputs = trainer._generate_and_score_completions([dict(row) for row in dataset])
  ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
  attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
  with torch.no_grad():
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                             inputs["completion_ids"].size(1))
  mask = inputs["completion_mask"].float()
  offset = torch.zeros_like(logps)
  for b, o in enumerate(offsets):
    offset[b, :len(o)] = torch.tensor(o, dtype=torch.float32)
  inputs["old_per_token_logps"] = (logps + offset) * mask
  trainer.model.zero_grad()
  loss = trainer.compute_loss(trainer.model, inputs)
  loss.backward()
  return {"advantages": inputs["advantages"].numpy(), "mask": mask.numpy(), "logps": logps.numpy(),
          "old": inputs["old_per_token_logps"].numpy(), "loss": float(loss.detach()),
          "grads": {n: p.grad.numpy().copy() for n, p in trainer.model.named_parameters()}}


def our_batch(old_BC: np.ndarray, advantages, mask_truncated: bool = False) -> dict:
  """The learner's layout (`rollouts.response_rows`; truncated rows weigh 0 under mask_truncated, as in
  `rl.learner.batch_rows`) of the fixed data, with TRL's old log-probs."""
  prompt_ids, completions, _ = fixed_data()
  old = [old_BC[b, :len(c)] for b, c in enumerate(completions)]
  seq_len = max(len(p) + len(c) for p, c in zip(prompt_ids, completions)) + 1
  rows = rollouts.response_rows(prompt_ids, completions, old, advantages, seq_len)
  if mask_truncated:
    rows["weights"][list(TRUNCATED)] = 0.0
  return {k: jnp.asarray(v) for k, v in rows.items()}


def to_completion_layout(logp_BT: np.ndarray) -> np.ndarray:
  """Our [B, T] log-probs (position j scores token j + 1) -> TRL's [B, C] (column i: completion token i)."""
  prompt_ids, completions, _ = fixed_data()
  out = np.zeros((B, max(COMPLETION_LENGTHS)), np.float32)
  for b, (p, c) in enumerate(zip(prompt_ids, completions)):
    out[b, :len(c)] = logp_BT[b, len(p) - 1:len(p) - 1 + len(c)]
  return out


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("trl_parity_llama")
  make_tiny_llama31_hf(path, seed=0, vocab_size=VOCAB)
  return path, load_hf_model(path)


@pytest.fixture(scope="module")
def trl_runs(tiny, tmp_path_factory, monkeypatch_module):
  out = tmp_path_factory.mktemp("trl_out")
  return {t: trl_side(tiny[0], out / t, t, "group" if s else "none") for t, (_, s) in SHARED.items()}


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL: no warning per trainer
    yield mp


@pytest.fixture(scope="module")
def our_fn(tiny):
  """One compiled program: our log-probs, and the loss of each (aggregation, scale_std) (+ gradients and extra
  sums for the pairs mapped to TRL)."""
  model = tiny[1]
  cfg, run = model.cfg, Execution()

  def loss(params, batch, aggregation):
    total, weight, extra = rollouts.rl_loss(cfg, run, None, params, batch, chunk=8, temperature=TEMPERATURE,
                                            eps_low=EPS_LOW, eps_high=EPS_HIGH, aggregation=aggregation,
                                            max_len=MAX_COMPLETION, beta=0.0)
    return total / weight, extra

  @jax.jit
  def fn(params, batches):
    logp_BT, _ = losses.sequence_logprobs(cfg, run, None, params, batches[OURS[0]], chunk=8,
                                          temperature=TEMPERATURE)
    out = {}
    for key, batch in batches.items():
      if key in SHARED.values():
        (value, extra), grads = jax.value_and_grad(loss, has_aux=True)(params, batch, key[0])
        out[key] = {"loss": value, "grads": grads, "clipped": extra["clipped"]}
      else:  # the unmatched pairs: the loss only
        out[key] = {"loss": loss(params, batch, key[0])[0]}
    return logp_BT, out

  def call(old_BC, mask_truncated=False):
    rewards = jnp.asarray(REWARDS, jnp.float32).reshape(-1, G)
    advantages = {s: np.asarray(pl.group_advantages(rewards, s, eps=TRL_EPS)).reshape(-1) for s in (True, False)}
    batches = {key: our_batch(old_BC, advantages[key[1]], mask_truncated) for key in OURS}
    logp_BT, out = fn(model.weights(), batches)
    return to_completion_layout(np.asarray(logp_BT)), advantages, jax.device_get(out)
  return call


@pytest.fixture(scope="module")
def ours(trl_runs, our_fn):
  olds = [r["old"] for r in trl_runs.values()]
  assert all(np.array_equal(olds[0], o) for o in olds)  # one model: every trainer scores the same
  return our_fn(olds[0])


@pytest.mark.parametrize("loss_type", SHARED)
def test_advantages_match(trl_runs, ours, loss_type):
  _, scale_std = SHARED[loss_type]
  ref, mine = trl_runs[loss_type]["advantages"], ours[1][scale_std]
  np.testing.assert_allclose(mine, ref, rtol=RTOL, atol=1e-7)
  assert np.count_nonzero(ref) == 8 and np.all(ref[8:] == 0)  # the all-equal group carries nothing
  if scale_std:  # the default eps (1e-6, the learner's) vs TRL's 1e-4: a relative ~1e-4 / std, by design
    rewards = np.asarray(REWARDS, np.float64).reshape(-1, G)[:2]
    std = rewards.std(axis=1, ddof=1).repeat(G)
    default = np.asarray(pl.group_advantages(jnp.asarray(REWARDS, jnp.float32).reshape(-1, G), True)).reshape(-1)
    gap = np.abs(default[:8] - ref[:8]) / np.abs(ref[:8]) * std
    assert np.all(gap > 1e-5) and np.all(gap < 2e-4), gap


def test_logprobs_match(trl_runs, ours):
  ref = trl_runs["grpo"]
  mask = ref["mask"].astype(bool)
  assert mask.sum() == sum(COMPLETION_LENGTHS)
  np.testing.assert_allclose(ours[0][mask], ref["logps"][mask], rtol=RTOL)


def test_clipping_is_exercised(ours):
  """Both clip bounds bind on some tokens (else the parity would not test the clip)."""
  _, _, offsets = fixed_data()
  adv = ours[1][True]
  ratio = [np.exp(-o) for o in offsets]  # old = current + offset
  high = sum(int(np.sum(r > 1 + EPS_HIGH)) for r, a in zip(ratio, adv) if a > 0)
  low = sum(int(np.sum(r < 1 - EPS_LOW)) for r, a in zip(ratio, adv) if a < 0)
  assert high >= 2 and low >= 2, (high, low)
  assert float(ours[2][SHARED["dapo"]]["clipped"]) == high + low


@pytest.mark.parametrize("loss_type", SHARED)
def test_loss_and_gradients_match(tiny, trl_runs, ours, loss_type):
  ref, key = trl_runs[loss_type], SHARED[loss_type]
  mine = ours[2][key]
  np.testing.assert_allclose(float(mine["loss"]), ref["loss"], rtol=RTOL)
  trl_grads = model_from_tensors(tiny[1].cfg, ref["grads"].__getitem__).weights()  # HF layout -> ours
  assert set(trl_grads) == set(mine["grads"])
  for name, g in trl_grads.items():
    g = np.asarray(g)
    delta = np.max(np.abs(np.asarray(mine["grads"][name]) - g))
    assert np.max(np.abs(g)) > 0 and delta <= RTOL * np.max(np.abs(g)), (name, delta, np.max(np.abs(g)))
  # the other aggregations and std choices of ours do not match this TRL loss: the comparison can fail
  for other in OURS:
    if other != key:
      assert rel(ours[2][other]["loss"], ref["loss"]) > 100 * RTOL, (loss_type, other)


def test_masked_rows_differ_by_design(tiny, tmp_path, our_fn, trl_runs):
  """With truncated responses out of the loss: dapo = token-mean, but grpo / dr_grpo count the empty rows in their
  mean over responses and ours do not: ours = TRL's * B / (B - empty rows)."""
  factor = B / (B - len(TRUNCATED))
  old = trl_runs["grpo"]["old"]
  _, _, out = our_fn(old, mask_truncated=True)
  for loss_type, key in SHARED.items():
    ref = trl_side(tiny[0], tmp_path / loss_type, loss_type, "group" if key[1] else "none", mask_truncated=True)
    assert np.all(ref["mask"][list(TRUNCATED)] == 0) and ref["mask"].sum() == sum(COMPLETION_LENGTHS) - 11
    mine = float(out[key]["loss"])
    if loss_type == "dapo":
      np.testing.assert_allclose(mine, ref["loss"], rtol=RTOL)
    else:
      np.testing.assert_allclose(mine, ref["loss"] * factor, rtol=RTOL)
      assert rel(mine, ref["loss"]) > 0.1
