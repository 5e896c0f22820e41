"""The RL learner's parts alone, without a stage run: a scripted sampler (fixed completions and log-probs per
request key), a fake verifier and, where an update is needed, a real tiny `Trainer`.

- generate_and_verify: chunking, order, verdicts only where this process verifies, the timers;
- dynamic sampling: which groups are kept, how many rounds, unfilled rows weighing 0, the one-round mode;
- minibatching: `minibatches` disjoint updates through `Trainer.train_on`, their metrics summed, no update without a
  group;
- resume: a learner restored from a checkpoint (trainer state + prompt stream) makes the uninterrupted run's next
  step bit for bit;
- the import graph: no train -> stages arrow, no stage -> sibling stage arrow.
"""
from __future__ import annotations

import ast
import math
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from astro_jax.generation import Item, generate_and_verify
from astro_jax.rl.learner import Batch, LearnerConfig, RLLearner, has_signal
from astro_jax.sampler import Completion, SamplingParams
from astro_jax.train.loop import NonFiniteLoss
from astro_jax.train.rollouts import PromptStream
from astro_jax.verifier import Verdict
from tests.conftest import REPO, set_values

Problem = namedtuple("Problem", "id problem answer")
GOLD = "7"
G = 2


def script(key, sample: int) -> tuple[list[int], str]:
  """(token ids, text) of a request's sample: problems named mixed* are right on even samples, right* always,
  wrong* never (whatever the weights: the data of every step is the script's)."""
  pid = key[-1] if isinstance(key, list) else key
  right = pid.startswith("right") or (pid.startswith("mixed") and sample % 2 == 0)
  return [5 + sample, 6 + len(pid) % 3, 2], GOLD if right else "8"


class ScriptedSampler:
  """What the learner uses of a Sampler, from `script`: each sampled token has log-prob `logprob`."""

  def __init__(self, logprob: float = -0.5):
    self.logprob, self.params, self.calls, self.syncs = logprob, None, [], 0
    self.stats = SimpleNamespace(tokens=0, row_steps=0)

  def update_weights(self, weights) -> None:
    self.params, self.syncs = weights, self.syncs + 1

  def sample(self, requests) -> list[list[Completion]]:
    self.calls.append([r.key for r in requests])
    out = [[Completion(text, ids, [self.logprob] * len(ids), [self.logprob] * len(ids), "eos")
            for ids, text in (script(r.key, i) for i in range(r.params.n))] for r in requests]
    lengths = [len(c.token_ids) for cs in out for c in cs]
    self.stats.tokens += sum(lengths)
    self.stats.row_steps += len(lengths) * max(lengths)
    return out


class FakePool:
  """The verifier: a response is right when its text is the gold."""

  def __init__(self):
    self.calls = 0

  def verify(self, responses, golds) -> list[Verdict]:
    self.calls += 1
    return [Verdict(r.strip() == g, r.strip(), False) for r, g in zip(responses, golds)]


def learner_config(**values) -> LearnerConfig:
  return LearnerConfig(**{"batch_prompts": 2, "group_size": G, "seq_len": 8, "steps": 3, "minibatches": 2,
                          "max_sampling_rounds": 3, "prompts_per_call": 2, **values})


def make_learner(ids: list[str], config: LearnerConfig, trainer=None, stream=None, ckpts=None, sampler=None,
                 **kwargs) -> RLLearner:
  problems = {pid: Problem(pid, f"problem {pid}", GOLD) for pid in ids}
  prompt_ids = {pid: [1, 3 + i] for i, pid in enumerate(ids)}
  return RLLearner(config, sampler or ScriptedSampler(), trainer, FakePool(), stream or PromptStream(ids, config.seed),
                   problems, prompt_ids, SamplingParams(n=config.group_size, max_new_tokens=4), ckpts, writer=True,
                   **kwargs)


def expected_rounds(ids: list[str], config: LearnerConfig) -> tuple[list[str], list[tuple[int, str]], int]:
  """(kept ids, sampled (epoch, id)s, rounds) of a step, by hand from the stream's order."""
  stream, kept, sampled = PromptStream(ids, config.seed), [], []
  for round_ in range(config.max_sampling_rounds if config.dynamic_sampling else 1):
    taken = stream.take(config.batch_prompts)
    sampled += taken
    kept += [p for _, p in taken if p.startswith("mixed") or not config.dynamic_sampling]
    if len(kept) >= config.batch_prompts:
      break
  return kept[:config.batch_prompts], sampled, round_ + 1


# --- generate_and_verify --------------------------------------------------------------------------------------

def test_generate_and_verify_chunks_in_order_and_verifies_where_asked():
  sampler, pool = ScriptedSampler(), FakePool()
  sampler.params = {}
  items = [Item(f"{kind}{i}", [1, 2, i], GOLD) for i, kind in enumerate(["mixed", "right", "wrong"] * 2)]
  params = SamplingParams(n=3, max_new_tokens=4, seed=1)
  times = {}
  got = list(generate_and_verify(sampler, pool, items, params, per_call=4, times=times))
  assert sampler.calls == [[it.key for it in items[:4]], [it.key for it in items[4:]]] and pool.calls == 2
  assert [v.item for v in got] == items and all(len(v.completions) == 3 for v in got)
  assert [[d.correct for d in v.verdicts] for v in got[:3]] == [[True, False, True], [True] * 3, [False] * 3]
  record = got[0].records()[1]
  assert record == {"text": "8", "answer": "8", "correct": False, "timed_out": False, "n_tokens": 3,
                    "finish_reason": "eos", "reflections": 0, "backtracks": 0}
  assert set(times) == {"time_sampling", "time_scoring"} and all(t >= 0 for t in times.values())
  # A process that does not verify (multi-host, not process 0) samples the same and gets no verdicts.
  quiet = list(generate_and_verify(ScriptedSampler(), FakePool(), items, params, per_call=4, verify=False))
  assert [v.verdicts for v in quiet] == [None] * 6
  assert [[c.token_ids for c in v.completions] for v in quiet] == [[c.token_ids for c in v.completions] for v in got]


# --- dynamic sampling -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids, values", [
    (["wrong0", "right0", "mixed0", "mixed1", "wrong1"], {}),                          # refilled in later rounds
    (["wrong0", "right0", "mixed0", "wrong1"], {"max_sampling_rounds": 2}),            # cannot fill: rows weigh 0
    (["wrong0", "right0", "mixed0", "mixed1"], {"dynamic_sampling": False}),           # one round, every group
    (["wrong0", "right0", "wrong1"], {}),                                               # nothing kept: no rows
], ids=["refill", "unfilled", "off", "empty"])
def test_dynamic_sampling_keeps_groups_with_a_signal(ids, values):
  config = learner_config(**values)
  learner = make_learner(ids, config)
  batch = learner.collect(step=1)
  kept, sampled, rounds = expected_rounds(ids, config)
  assert [g.problem.id for g in batch.kept] == kept
  assert [(g.epoch, g.problem.id) for g in batch.sampled] == sampled and batch.rounds == rounds
  # one request per prompt, keyed (rl, epoch, id), prompts_per_call prompts a sampler call
  assert [len(call) for call in learner.sampler.calls] == [2] * rounds
  assert [k for call in learner.sampler.calls for k in call] == [["rl", e, p] for e, p in sampled]
  if config.dynamic_sampling:
    assert all(has_signal(g) for g in batch.kept)
  for g in batch.sampled:  # rewards +1 / -1 from the verdicts
    np.testing.assert_array_equal(g.rewards, np.where(g.correct, 1.0, -1.0))
  if not kept:
    assert batch.rows is None
    got = learner.update(batch)  # no update: every sum 0
    assert {"loss", "grad_norm", "tokens", "logprob_gap_first", "tokens_first"} <= set(got) and not any(got.values())
    return
  rows = batch.rows
  assert rows["tokens"].shape == (config.rows, config.seq_len)
  filled = len(kept) * G
  assert rows["weights"][filled:].sum() == 0 and not rows["advantages"][filled:].any()
  assert (rows["weights"][:filled].sum(axis=1) == 3).all()  # each response's 3 tokens are in the loss
  for i, g in enumerate(batch.kept):
    expected = np.zeros(G) if not has_signal(g) else np.where(g.correct, 1.0, -1.0) / math.sqrt(2)
    np.testing.assert_allclose(rows["advantages"][i * G:(i + 1) * G], expected, rtol=1e-5, atol=1e-6)


def test_the_shuffled_reward_control_permutes_rewards_per_round():
  ids = ["mixed0", "mixed1", "right0", "wrong0"]
  config = learner_config(batch_prompts=4, shuffle_rewards=True)
  batch = make_learner(ids, config).collect(step=1)
  rewards = np.concatenate([g.rewards for g in batch.sampled])
  correct = np.concatenate([g.correct for g in batch.sampled])
  assert sorted(rewards) == sorted(np.where(correct, 1.0, -1.0)) and not np.array_equal(
      rewards, np.where(correct, 1.0, -1.0))
  again = make_learner(ids, config).collect(step=1)  # seeded by (seed, step, round)
  np.testing.assert_array_equal(np.concatenate([g.rewards for g in again.sampled]), rewards)


def test_non_finite_sampled_logprobs_stop_the_step(tmp_path):
  from astro_jax.train.checkpoints import Checkpoints
  ckpts = Checkpoints(tmp_path / "checkpoints", async_save=False)
  learner = make_learner(["mixed0", "mixed1"], learner_config(), ckpts=ckpts, sampler=ScriptedSampler(math.nan))
  with pytest.raises(NonFiniteLoss, match=r"^step 4: the sampler's log-probs are not finite \(12 of 12 sampled"):
    learner.collect(step=4)
  ckpts.close()


# --- minibatching and resume, on a real tiny trainer --------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer():
  """A tiny trainer of the RL loss: 2 prompts x 2 responses a step, 2 minibatch updates of 2 rows of 8 tokens."""
  from astro_jax import stages
  from astro_jax.model import preset
  from astro_jax.sharding import Sharder, make_mesh
  from astro_jax.stages import rl
  config = set_values(stages.defaults("rl"), {
      "batch_prompts": 2, "group_size": G, "minibatches": 2, "max_prompt_tokens": 4, "sampling.max_new_tokens": 4,
      "loss_chunk": 8, "steps": 3, "optimizer.lr": 1e-2, "async_checkpoint": False, "save_every": 1})
  cfg = preset("tiny", vocab_size=64, n_layers=1)
  return rl.make_trainer(config, cfg, Sharder.create(make_mesh(1, -1, 1, devices=jax.devices()[:1]), "train"))


@pytest.fixture(scope="module")
def weights(trainer):
  from astro_jax.model import init_model
  return {seed: init_model(trainer.cfg, seed=seed).weights() for seed in (0, 1)}


def host(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in jax.device_get(params).items()}


def test_minibatches_are_disjoint_updates_through_the_trainer(trainer, weights, monkeypatch):
  trainer.load_params(weights[0])
  ids = ["mixed0", "mixed1", "mixed2"]
  learner = make_learner(ids, learner_config(), trainer=trainer)
  batch = learner.collect(step=2)
  seen = []
  put_rows = trainer.put_rows
  monkeypatch.setattr(trainer, "put_rows", lambda rows: seen.append(rows) or put_rows(rows))
  sums = learner.update(batch)
  assert len(seen) == 2 and int(trainer.state["step"]) == 2  # minibatches optimizer steps
  order = np.random.default_rng([0, 2, 1]).permutation(4)  # assigned by (seed, step)
  for part, rows in zip((order[:2], order[2:]), seen):
    for k, v in rows.items():
      np.testing.assert_array_equal(v, batch.rows[k][part])
  assert sums["tokens"] == batch.rows["weights"].sum() == 12 and np.isfinite(sums["loss"])
  assert sums["tokens_first"] == 6 and sums["logprob_gap_first"] > 0  # the script's log-probs are not the model's
  empty = Batch(3, [], batch.sampled, 3, None, {})
  assert learner.update(empty)["loss"] == 0.0 and int(trainer.state["step"]) == 2  # no group: no update


def test_a_learner_resumed_from_a_checkpoint_makes_the_same_next_step(trainer, weights, tmp_path):
  from astro_jax.train.checkpoints import Checkpoints
  ids = ["mixed0", "right0", "mixed1", "wrong0", "mixed2"]
  config = learner_config(eval_every=3, steps=3)
  evals = {"held": [Item("mixed0", [1, 3], GOLD), Item("right0", [1, 4], GOLD)]}
  eval_params = SamplingParams(n=2, max_new_tokens=4)
  trainer.load_params(weights[0])
  ckpts = Checkpoints(tmp_path / "checkpoints", keep=3, async_save=False)
  first = make_learner(ids, config, trainer=trainer, ckpts=ckpts, evals=evals, eval_params=eval_params,
                       eval_dir=tmp_path / "eval")
  rows = []
  for step in (1, 2, 3):
    rows.append(first.step(step))
    if step == 2:
      first.save(step)
  assert first.sampler.syncs == 4  # each step, and again before the step-3 eval
  assert rows[2]["eval_pass@1"] == 0.75 and "eval_maj@2" in rows[2] and "eval_pass@1" not in rows[1]
  assert (tmp_path / "eval" / "step_3_held.json").exists()
  want = host(trainer.params)
  ckpts.close()

  trainer.load_params(weights[1])  # other weights and a fresh stream: the checkpoint must bring back both
  stream = PromptStream(ids, config.seed)
  record = SimpleNamespace(record=lambda **_: None)
  ckpts, start = trainer.start_or_resume(SimpleNamespace(resume=True), tmp_path, record, stream)
  assert start == 2 and stream.get_state()["position"] > 0
  resumed = make_learner(ids, config, trainer=trainer, stream=stream, ckpts=ckpts, evals=evals,
                         eval_params=eval_params)
  again = resumed.step(3)
  ckpts.close()
  for key in ("reward_mean", "accuracy", "zero_signal_fraction", "groups", "sampling_rounds", "tokens_trained",
              "loss", "grad_norm", "entropy", "kl", "clip_fraction", "logprob_gap", "lr", "eval_pass@1"):
    assert again[key] == rows[2][key], key
  got = host(trainer.params)
  assert all(np.array_equal(got[k], want[k]) for k in want)


# --- the import graph ---------------------------------------------------------------------------------------------

PACKAGE = Path(REPO) / "astro_jax"
SHARED_STAGE_MODULES = {"astro_jax.stages", "astro_jax.stages.common"}  # the registry and the shared pieces


def imported_modules(source: str) -> set[str]:
  """Every module a file imports (at any depth: lazy imports count), `from a import b` as a and a.b."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return out


def test_no_train_to_stages_and_no_stage_to_sibling_stage_imports():
  stage_modules = {f"astro_jax.stages.{p.stem}" for p in (PACKAGE / "stages").glob("*.py")} - SHARED_STAGE_MODULES
  arrows = []
  for folder in ("train", "rl"):  # the libraries the stages use: no stage at all
    for path in sorted((PACKAGE / folder).glob("*.py")):
      arrows += [f"{folder}/{path.name} -> {m}" for m in imported_modules(path.read_text())
                 if m.startswith("astro_jax.stages")]
  for name in ("generation.py", "prompts.py"):
    arrows += [f"{name} -> {m}" for m in imported_modules((PACKAGE / name).read_text())
               if m.startswith("astro_jax.stages")]
  for path in sorted((PACKAGE / "stages").glob("*.py")):
    me = f"astro_jax.stages.{path.stem}"
    arrows += [f"stages/{path.name} -> {m}" for m in imported_modules(path.read_text())
               if m in stage_modules and m != me]
  assert not arrows, arrows
  # what the check catches: a sibling imported either way, even inside a function; not the registry or common
  caught = imported_modules("def f():\n  from astro_jax.stages import common, eval as e\n  import astro_jax.stages.sft\n"
                            "  from astro_jax import stages\n")
  assert caught & stage_modules == {"astro_jax.stages.eval", "astro_jax.stages.sft"}
