"""The `mcts` stage and the LM policy: request mapping (scripted sampler), batching and resume (a tiny random model
with the SmolLM2 tokenizer), validation before the model loads, and end to end on the real SmolLM2."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from astro_jax import data, prompts, stages, verifier
from astro_jax.errors import ConfigError, UserError
from astro_jax.sampler import Completion
from astro_jax.search import mcts
from astro_jax.search.policy import LMPolicy, LMRewriter, LMVoter, self_eval_prompts
from astro_jax.search.tree import NODE_FIELDS
from tests import conftest
from tests.conftest import REPO

EASY = f"{REPO}/configs/data/easy_arith.jsonl"
TOY = [{"id": f"t{i}", "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(16)]
# Small search settings for the tiny random model: its steps never hit the delimiter, so budget-cut steps stay open
# (length_terminal False) and every round expands and rolls out.
TINY_SEARCH = {"k": 2, "rollouts": 2, "iterations": 3, "max_depth": 4, "step_max_tokens": 6,
               "rollout_max_tokens": 8, "length_terminal": False}


def stage_config(**values):
  return conftest.stage_config("mcts", **values)


def overrides(values: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()] + [conftest.CACHE_FLAG]  # the test run's compile cache


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
  """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer files (so real prompts encode)."""
  import torch
  import transformers
  out = tmp_path_factory.mktemp("tiny_smol")
  config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                                    eos_token_id=2, initializer_range=0.5)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).eval().save_pretrained(out)
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(smollm2_dir / name, out)
  return out


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
  data.write_jsonl_atomic(path, TOY[:4])
  return path


# --- the policy over a scripted sampler ------------------------------------------------------------------------

class ScriptedSampler:
  """Records each `sample` call; answers every row with the next scripted (text, finish_reason)."""

  def __init__(self, tokenizer, script):
    self.tokenizer, self.script, self.calls = tokenizer, list(script), []
    self.cfg = SimpleNamespace(max_position_embeddings=8192)

  def sample(self, requests):
    self.calls.append(list(requests))
    out = []
    for r in requests:
      rows = []
      for _ in range(r.params.n):
        text, reason = self.script.pop(0)
        ids = self.tokenizer.encode(text + ("\n\n" if reason == "stop" else ""))
        rows.append(Completion(text, ids, [-0.5] * len(ids), [-1.0] * len(ids), reason))
      out.append(rows)
    return out


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
  from astro_jax.tokenizer import Tokenizer
  return Tokenizer.load(smollm2_dir)


def expand_request(problem="What is 2 + 3?", steps=(), step_tokens=(), n=2, node=0, tree=0):
  return mcts.ExpandRequest(tree=tree, problem_id=f"p{tree}", problem=problem, node=node, iteration=0,
                            depth=len(steps), steps=tuple(steps), step_tokens=tuple(step_tokens), n=n, seed=7,
                            temperature=0.7, top_p=0.9, max_tokens=32, stop=("\n\n",))


def test_policy_maps_requests_to_one_sample_call(smol_tok):
  script = [("We add 2 and 3.", "stop"), ("So 2 + 3 = 5. The final answer is \\boxed{5}.", "eos"),
            ("Adding gives 5.", "length"), ("The answer is 5.", "stop")]
  sampler = ScriptedSampler(smol_tok, script)
  policy = LMPolicy(sampler)
  out = policy.propose([expand_request(tree=0), expand_request(tree=1, node=3)])
  assert len(sampler.calls) == 1 and len(sampler.calls[0]) == 2  # every request of a call in ONE sample call
  req = sampler.calls[0][0]
  assert req.key == ["expand", "p0", 0, 0] and req.params.seed == 7 and req.params.stop == ("\n\n",)
  assert (req.params.temperature, req.params.top_p, req.params.max_new_tokens, req.params.n) == (0.7, 0.9, 32, 2)
  # The root state is the chat-rendered few-shot prompt: one worked example as an earlier turn, then the problem.
  text = smol_tok.decode(req.prompt, skip_special_tokens=False)
  assert text.count("\\boxed{9}") == 1 and text.index("Tom has 3 boxes") < text.index("What is 2 + 3?")
  assert text.endswith("<|im_start|>assistant\n") and prompts.ASTRO_INSTRUCTION in text
  (a, b), (c, d) = out
  assert a.answer is None and a.finish_reason == "stop" and a.logprob == pytest.approx(-len(a.tokens))  # model lps
  assert b.answer == "5" and b.finish_reason == "eos"
  assert c.finish_reason == "length" and d.answer is None  # an answer in words is not a boxed terminal


def test_step_ids_continue_the_sampled_tokens(smol_tok):
  policy = LMPolicy(ScriptedSampler(smol_tok, []))
  body = smol_tok.encode("So 2 + 3 = 5.")
  exact = body + smol_tok.encode("\n\n")
  assert policy.step_ids("So 2 + 3 = 5.", exact) == exact and policy.repaired_steps == 0
  # The token that completed the delimiter carried more text ("\n\n\n"): keep the ids before it, re-encode the rest.
  (past,) = smol_tok.encode("\n\n\n")
  repaired = policy.step_ids("So 2 + 3 = 5.", body + [past])
  assert repaired[:len(body)] == body and smol_tok.decode(repaired) == "So 2 + 3 = 5.\n\n"
  # A step without ids (a grafted rollout step) is encoded from its text.
  assert smol_tok.decode(policy.step_ids("Then 5.", [])) == "Then 5.\n\n" and policy.repaired_steps == 2
  state = policy.state_ids("What is 2 + 3?", ["So 2 + 3 = 5."], [body + [past]])
  assert state == policy.prompt_ids("What is 2 + 3?") + repaired


def test_rollouts_end_where_the_search_would(smol_tok):
  script = [("A.\n\nB is \\boxed{4}.\n\nC \\boxed{7}.", "eos"), ("A.\n\nB.\n\nC.\n\nD \\boxed{1}.", "eos"),
            ("A.\n\n\n\nB \\boxed{2}", "length")]
  sampler = ScriptedSampler(smol_tok, script)
  req = mcts.RolloutRequest(tree=0, problem_id="p", problem="Q?", node=1, iteration=2, depth=1, steps=("S.",),
                            step_tokens=((),), n=3, seed=1, temperature=1.0, top_p=1.0, max_tokens=64, max_steps=3)
  (rs,) = LMPolicy(sampler).rollout([req])
  assert sampler.calls[0][0].key == ["rollout", "p", 2, 1] and sampler.calls[0][0].params.stop == ()
  assert [r.answer for r in rs] == ["4", None, "2"]  # first boxed step; cut at max_steps (no answer there)
  assert rs[0].text == "A.\n\nB is \\boxed{4}." and rs[1].text == "A.\n\nB.\n\nC." and rs[0].eos and not rs[2].eos


def test_voter_samples_every_prompt_in_one_call_and_caches(smol_tok):
  sampler = ScriptedSampler(smol_tok, [(f"Verdict: {'Yes' if i % 2 else 'No'}", "eos") for i in range(6)])
  voter = LMVoter(sampler, seed=3)
  voter.prefetch(["judge A", "judge B", "judge A"], 2)
  assert len(sampler.calls) == 1 and len(sampler.calls[0]) == 2  # distinct prompts, one call
  assert sampler.calls[0][0].key[0] == "self_eval" and sampler.calls[0][0].params.seed == 3
  assert voter(["judge B", "judge A"], 2) == [["Verdict: No", "Verdict: Yes"]] * 2 and len(sampler.calls) == 1
  record = {"id": "x", "problem": "P", "answer": "1", "nodes": [
      {"id": 0, "parent": None, "text": "", "terminal": False, "correct": None},
      {"id": 1, "parent": 0, "text": "s1", "terminal": False, "correct": None},
      {"id": 2, "parent": 1, "text": "\\boxed{1}", "terminal": True, "correct": True},
      {"id": 3, "parent": 0, "text": "\\boxed{2}", "terminal": True, "correct": False}]}
  assert self_eval_prompts([record], "{problem}|{solution}") == ["P|s1\n\n\\boxed{1}"]


def test_rewriter_asks_with_the_step_and_keeps_it_when_the_reply_is_empty(smol_tok):
  sampler = ScriptedSampler(smol_tok, [("It has 12 apples.", "stop"), ("", "stop")])
  rewrite = LMRewriter(sampler)
  assert rewrite("Tom has 3 boxes.", "3*4 = 12") == "It has 12 apples."
  (req,) = sampler.calls[0]
  text = smol_tok.decode(req.prompt, skip_special_tokens=False)
  assert "Step:\n3*4 = 12\n\nEdited step:" in text and req.params.temperature == 0 and req.params.stop == ("\n\n",)
  assert rewrite("", "keep me") == "keep me" and len(sampler.calls) == 2


def test_shipped_mcts_configs_pass_the_value_and_context_checks(smol_tok):
  from astro_jax import main
  from astro_jax.stages import mcts as stage
  for name, context in (("mcts", 131072), ("mcts_smollm2", 8192), ("mcts_8b", 131072)):
    config = main.load_config_file(f"{REPO}/configs/{name}.py")
    if not config.input:
      config.input = EASY
    stage.check(config)
    problems = stage.load_problems(config)
    stage.check_context(config, problems, smol_tok, context)
    stage.search_config(config), stage.linearize_config(config), stage.render_config(config)
  assert len(stage.load_problems(main.load_config_file(f"{REPO}/configs/mcts_smollm2.py"))) == 4


def test_render_min_visits_defaults_to_the_rollouts():
  from astro_jax.stages import mcts as stage
  config = stage_config(**{"search.rollouts": 3})
  assert config.render.min_visits == 0 and stage.render_config(config).samples_needed == 3
  config = stage_config(**{"search.rollouts": 3, "render.min_visits": 5})
  assert stage.render_config(config).samples_needed == 5 and stage.render_config(config).rollouts == 3


# --- batching and resume on a tiny random model -----------------------------------------------------------------

def test_sampler_calls_per_round_do_not_depend_on_the_number_of_problems(tiny_dir):
  from astro_jax import checkpoint
  from astro_jax.sampler import Sampler
  from astro_jax.tokenizer import Tokenizer
  sampler = Sampler(checkpoint.load_model(tiny_dir), Tokenizer.load(tiny_dir), max_batch=64)
  policy = LMPolicy(sampler)
  config = mcts.SearchConfig(**TINY_SEARCH)
  runs = {}
  for n in (1, 16):
    calls, rows, trees = [], [], []
    with mcts.BatchedSearch(policy, lambda pairs: [a == g for a, g in pairs], config) as engine:
      for problem in TOY[:n]:
        engine.add(problem)
      while engine.active:
        before, rows_before = sampler.stats.calls, sampler.stats.rows
        trees += engine.step_round()
        calls.append(sampler.stats.calls - before)
        rows.append(sampler.stats.rows - rows_before)
    runs[n] = calls, rows, {t.problem_id: t.record() for t in trees}
  assert runs[1][0] == runs[16][0] == [2, 2, 2]  # one expansion call + one rollout call per round
  assert runs[16][1] == [16 * r for r in runs[1][1]]  # while 16 times the rows are sampled
  # The first problem's tree does not depend on its batch: same nodes, texts and tokens; priors come from
  # log-probs whose last bits depend on the batch shape (XLA's matmuls), so they agree to float precision.
  alone, batched = runs[1][2]["t0"], runs[16][2]["t0"]
  for a, b in zip(alone["nodes"], batched["nodes"], strict=True):
    assert a["prior"] == pytest.approx(b["prior"], rel=1e-4)
    assert {k: v for k, v in a.items() if k != "prior"} == {k: v for k, v in b.items() if k != "prior"}


def test_resume_after_sigkill_gives_the_trees_of_an_uninterrupted_run(tmp_path, tiny_dir, toy_file):
  values = {"checkpoint": tiny_dir, "input": toy_file, "batch_problems": 1, "batch_size": 8,
            **{f"search.{k}": v for k, v in TINY_SEARCH.items()}}
  killed = tmp_path / "killed"
  cmd = [sys.executable, "-m", "astro_jax.main", f"--config={REPO}/configs/mcts.py",
         *overrides({**values, "output_dir": killed})]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  trees = killed / "trees.jsonl"
  deadline = time.monotonic() + 240
  while not (trees.exists() and trees.read_bytes().count(b"\n") >= 1):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.monotonic() < deadline, "no tree was written"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  first = data.read_jsonl_rows(trees)
  assert 1 <= len(first) < len(TOY[:4]) and not (killed / "summary.json").exists()

  resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  full = tmp_path / "full"
  stages.get("mcts").run(stage_config(**{k: str(v) if k in ("checkpoint", "input") else v
                                         for k, v in values.items()}, output_dir=str(full)))
  by_id = lambda path: {r["id"]: r for r in data.read_jsonl_rows(path, torn_tail_ok=False)}  # noqa: E731
  again, reference = by_id(trees), by_id(full / "trees.jsonl")
  assert again == reference and len(again) == 4
  assert data.read_jsonl_rows(trees)[:len(first)] == first  # finished trees were kept, not searched again
  summary = json.loads((killed / "summary.json").read_text())
  assert summary["resumed_trees"] == len(first) and summary["problems"] == 4
  assert summary["tokens_sampled"] == json.loads((full / "summary.json").read_text())["tokens_sampled"]
  # Other tree settings in the same directory are refused, naming the difference; overwrite replaces them.
  with pytest.raises(UserError, match=r"search\.k: 2 -> now 3"):
    stages.get("mcts").run(stage_config(checkpoint=str(tiny_dir), input=str(toy_file), output_dir=str(full),
                                        **{**{f"search.{k}": v for k, v in TINY_SEARCH.items()}, "search.k": 3}))


def test_two_processes_build_the_trees_one_process_builds(tmp_path, tiny_dir, toy_file):
  """Multi-host: two processes (4 CPU devices each, gloo collectives, JAX's distributed runtime on 127.0.0.1)
  search the same problems as one process with 8 devices on the same mesh: identical trees; only process 0
  writes."""
  import os
  import socket
  values = {"checkpoint": tiny_dir, "input": toy_file, "batch_problems": 4, "batch_size": 16, "mesh.data": -1,
            "mesh.fsdp": 1, **{f"search.{k}": v for k, v in TINY_SEARCH.items()}}
  cmd = [sys.executable, "-m", "astro_jax.main", f"--config={REPO}/configs/mcts.py", *overrides(values)]

  def env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  single = subprocess.run(cmd + [f"--config.output_dir={tmp_path / 'single'}"], cwd=REPO, env=env(8),
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(cmd + [f"--config.output_dir={tmp_path / 'multi'}", "--config.distributed.enabled=True",
                                   f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
                            cwd=REPO, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "mcts:" in outs[0][0] and "mcts:" not in outs[1][0]  # only process 0 reports (and writes)
  by_id = lambda path: {r["id"]: r for r in data.read_jsonl_rows(path, torn_tail_ok=False)}  # noqa: E731
  assert by_id(tmp_path / "multi" / "trees.jsonl") == by_id(tmp_path / "single" / "trees.jsonl")


def test_bad_config_and_input_are_rejected_before_the_model_loads(tmp_path, tiny_dir, toy_file):
  out = str(tmp_path / "out")
  base = {"checkpoint": str(tmp_path / "no_such_checkpoint"), "input": str(toy_file), "output_dir": out}
  cases = [({"search.k": 0}, ConfigError, r"'search\.k' = 0: must be >= 1"),
           ({"search.prior": "flat"}, ConfigError, r"search\.prior"),
           ({"input": ""}, ConfigError, r"'input'"),
           ({"limit": 0}, ConfigError, r"'limit'"),
           ({"self_eval.rule": "most"}, ConfigError, r"self_eval\.rule"),
           ({"self_eval.prompt": "no fields"}, ConfigError, r"self_eval\.prompt.*\{problem\}"),
           ({"rewrite.prompt": "{context} {oops}"}, ConfigError, r"rewrite\.prompt"),
           ({"render.templates.backtrack": ("no placeholder",)}, ConfigError, r"render\.templates\.backtrack"),
           ({"render.min_visits": -1}, ConfigError, r"'render\.min_visits' = -1"),
           ({"prompt.example_solution": "no box here"}, ConfigError, r"prompt\.example_solution"),
           ({"input": str(tmp_path / "missing.jsonl")}, UserError, r"'input'.*missing\.jsonl"),
           ({}, UserError, r"checkpoint.*no_such_checkpoint")]
  for values, error, message in cases:
    with pytest.raises(error, match=message):
      stages.get("mcts").run(stage_config(**{**base, **values}))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "2+2?"}\n')
  with pytest.raises(data.DataError, match=r"bad\.jsonl:2: missing required field 'answer'"):
    stages.get("mcts").run(stage_config(**{**base, "input": str(bad)}))
  # The longest state the search can build must fit the model's context (2048 positions here).
  with pytest.raises(UserError, match=r"problem 't0'.*search\.max_depth.*> the model's context of 2048"):
    stages.get("mcts").run(stage_config(**{**base, "checkpoint": str(tiny_dir), "search.max_depth": 50,
                                           "search.step_max_tokens": 64}))
  assert not (tmp_path / "out").exists()
  # From the command line: one line naming the row, exit status 2.
  proc = subprocess.run([sys.executable, "-m", "astro_jax.main", f"--config={REPO}/configs/mcts.py",
                         *overrides({**base, "input": bad})], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and "bad.jsonl:2" in proc.stderr and "Traceback" not in proc.stderr


# --- end to end on the real SmolLM2 ----------------------------------------------------------------------------

def test_end_to_end_on_smollm2(tmp_path, smollm2_dir):
  out = tmp_path / "out"
  config = stage_config(checkpoint=str(smollm2_dir), input=EASY, limit=3, output_dir=str(out), batch_size=64,
                        **{"search.k": 4, "search.rollouts": 2, "search.iterations": 2, "search.max_depth": 6,
                           "search.temperature": 0.7, "search.step_max_tokens": 48,
                           "search.rollout_max_tokens": 96, "search.graft_rollouts": True,
                           "self_eval.enabled": False})
  summary = stages.get("mcts").run(config)
  problems = data.load_jsonl(EASY)[:3]
  golds = {p.id: p.answer for p in problems}
  trees = data.read_jsonl_rows(out / "trees.jsonl", torn_tail_ok=False)
  assert sorted(t["id"] for t in trees) == sorted(golds)
  for t in trees:
    assert set(t) == {"id", "problem", "answer", "nodes"} and t["answer"] == golds[t["id"]]
    nodes = t["nodes"]
    assert nodes[0]["parent"] is None and nodes[0]["text"] == "" and 1 <= nodes[0]["N"] <= 2
    for i, n in enumerate(nodes):
      assert tuple(n) == NODE_FIELDS and n["id"] == i
      assert all(isinstance(x, int) for x in n["tokens"]) and 0 <= n["Q"] <= 1 and 0 < n["prior"] <= 1
      if i:
        assert 0 <= n["parent"] < i and n["depth"] == nodes[n["parent"]]["depth"] + 1 and n["N"] >= 1
      if n["terminal"]:
        assert isinstance(n["correct"], bool) and n["R"] == float(n["correct"])
        assert n["correct"] is False or verifier.is_correct(f"\\boxed{{{n['answer']}}}", t["answer"])
      else:
        assert n["correct"] is None and n["answer"] is None
  sft = data.read_jsonl_rows(out / "sft.jsonl", torn_tail_ok=False)
  direct = data.read_jsonl_rows(out / "direct.jsonl", torn_tail_ok=False)
  assert sft and any(r["k"] >= 1 for r in sft) and len(direct) == len(sft)
  assert len({r["id"] for r in sft + direct}) == 2 * len(sft)
  for row in sft + direct:
    assert set(row) == {"id", "messages", "k", "n_backtracks", "tree_id", "kind", "events"}
    user, assistant = row["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant" and prompts.ASTRO_INSTRUCTION in user["content"]
    assert "Tom has 3 boxes" not in user["content"]  # the few-shot example is the search's, not the trained prompt
    trace = assistant["content"]
    assert row["kind"] == ("search" if row["k"] else "direct")
    assert prompts.count_backtracks(trace) == row["n_backtracks"] == row["k"]
    assert verifier.verify(trace, golds[row["tree_id"]]).correct
  assert all(r["k"] == 0 for r in direct)
  disk = json.loads((out / "summary.json").read_text())
  assert disk["problems"] == 3 and disk["solved"] == len({r["tree_id"] for r in sft}) == summary["solved"]
  assert disk["sft_rows"] == len(sft) and sum(disk["k_histogram"].values()) == len(sft)
  assert disk["sampler_calls_per_round"]["max"] == 2 and disk["tokens_sampled"] > 0
  assert 0 < disk["sampler"]["live_row_fraction"] <= 1 and disk["sampler"]["seconds"] > 0
  for key in ("solved_fraction", "terminals_per_tree", "distinct_wrong_answers_per_tree", "rounds"):
    assert key in disk
  assert json.loads((out / "run_config.json").read_text())["search"]["k"] == 4

  # Other derivation settings re-derive the rows from the same trees without searching again: self-evaluation by
  # the policy is one sampler call for every tree's correct solutions (SmolLM2's short votes rarely say "Verdict").
  config.self_eval.enabled, config.self_eval.votes, config.self_eval.max_new_tokens = True, 2, 16
  again = stages.get("mcts").run(config)
  assert data.read_jsonl_rows(out / "trees.jsonl") == trees and again["resumed_trees"] == 3
  assert again["sampler"]["calls"] == 1 and again["self_eval_calls"] == 1 and again["rounds"] == 0
  assert again["sft_rows"] <= len(sft) and again["solved"] == summary["solved"]
  assert len(data.read_jsonl_rows(out / "sft.jsonl")) == again["sft_rows"]
