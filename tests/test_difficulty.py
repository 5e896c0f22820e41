"""The `difficulty` stage on the toy task (tools/make_toy_task.py): a tiny random model whose one-token answers are
right ~1/32 of the time, so 8 samples give pass rates of 0, 1/8, 2/8, ... across its 55 problems."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from astro_jax import data, stages, verifier
from astro_jax.errors import ConfigError, UserError
from astro_jax.stages import common, difficulty
from tests.conftest import REPO, stage_config

SAMPLES = 8


def _toy_module():
  spec = importlib.util.spec_from_file_location("make_toy_task", Path(REPO) / "tools" / "make_toy_task.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """(model dir, prompts JSONL) of the toy task."""
  return _toy_module().make(tmp_path_factory.mktemp("toy"))


def toy_config(toy, out: Path, **values):
  model_dir, prompts_path = toy
  return stage_config("difficulty", **{"checkpoint": str(model_dir), "input": str(prompts_path),
                                       "output_dir": str(out), "samples": SAMPLES, "batch_size": 128,
                                       "compile_cache_dir": "", "prompt.instruction": "",
                                       "sampling.max_new_tokens": 1, "verifier.workers": 1, **values})


@pytest.fixture(scope="module")
def full_run(toy, tmp_path_factory):
  out = tmp_path_factory.mktemp("difficulty") / "full"
  summary = difficulty.run(toy_config(toy, out))
  return out, summary


@pytest.fixture()
def no_model(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded")
  monkeypatch.setattr(common, "load_model", refuse)


def test_pass_rates_are_the_verifiers_count_of_the_samples(toy, full_run):
  out, summary = full_run
  rows = data.read_jsonl_rows(out / "pass_rates.jsonl")
  problems = {p.id: p for p in data.load_jsonl(toy[1])}
  assert sorted(r["id"] for r in rows) == sorted(problems)
  for row in rows:
    p = problems[row["id"]]
    assert (row["problem"], row["answer"]) == (p.problem, p.answer)
    assert row["n_samples"] == len(row["samples"]) == SAMPLES
    recount = sum(verifier.verify(s["text"], p.answer).correct for s in row["samples"])
    assert row["n_correct"] == recount == sum(s["correct"] for s in row["samples"])
    assert row["pass_rate"] == recount / SAMPLES
    assert row["mean_response_tokens"] == pytest.approx(sum(s["n_tokens"] for s in row["samples"]) / SAMPLES)
    assert row["truncation_rate"] == sum(s["finish_reason"] == "length" for s in row["samples"]) / SAMPLES
  rates = [r["pass_rate"] for r in rows]
  assert 0 < sum(0 < x < 1 for x in rates) < len(rates)  # the toy task has pass rates on both sides of the band
  histogram = {f"{k}/{SAMPLES}": sum(r["n_correct"] == k for r in rows) for k in range(SAMPLES + 1)}
  assert summary["n_correct_histogram"] == histogram
  assert summary["mean_pass_rate"] == pytest.approx(sum(rates) / len(rates))
  assert summary["eval"]["metrics"]["pass@1"]["mean"] == pytest.approx(sum(rates) / len(rates))
  assert json.loads((out / "summary.json").read_text()) == summary


def test_prompts_hold_exactly_the_band_and_the_rl_loader_takes_them(full_run):
  out, summary = full_run
  rows = data.read_jsonl_rows(out / "pass_rates.jsonl")
  kept = data.read_jsonl_rows(out / "prompts.jsonl")
  assert [k["id"] for k in kept] == [r["id"] for r in rows if 0 < r["pass_rate"] < 1]  # input order
  assert all(k["pass_rate"] == r["pass_rate"] for k in kept for r in rows if r["id"] == k["id"])
  assert summary["kept"] == len(kept)
  assert summary["too_hard"] == sum(r["pass_rate"] == 0 for r in rows)
  assert summary["too_easy"] == sum(r["pass_rate"] == 1 for r in rows)
  assert summary["too_hard"] + summary["kept"] + summary["too_easy"] == summary["problems"] == len(rows)
  loaded = common.load_problems(str(out / "prompts.jsonl"), "prompts")  # what the rl stage reads
  assert [(p.id, p.problem, p.answer) for p in loaded] == [(k["id"], k["problem"], k["answer"]) for k in kept]


def test_another_band_is_derived_without_sampling(toy, full_run, tmp_path, no_model):
  out, _ = full_run
  copy = tmp_path / "copy"
  copy.mkdir()
  for name in ("pass_rates.jsonl", "run_config.json"):
    (copy / name).write_bytes((out / name).read_bytes())
  summary = difficulty.run(toy_config(toy, copy, keep_above=-1.0, keep_below=0.2))  # 0 and 1/8 kept
  rows = data.read_jsonl_rows(copy / "pass_rates.jsonl")
  kept = [k["id"] for k in data.read_jsonl_rows(copy / "prompts.jsonl")]
  assert kept == [r["id"] for r in rows if r["n_correct"] <= 1]
  assert summary["too_hard"] == 0 and summary["kept"] == len(kept)


def test_a_killed_run_resumes_to_the_same_rows(toy, full_run, tmp_path):
  out = tmp_path / "killed"
  out.mkdir()
  (out / "run_config.json").write_bytes((full_run[0] / "run_config.json").read_bytes())
  lines = (full_run[0] / "pass_rates.jsonl").read_text().splitlines(keepends=True)
  path = out / "pass_rates.jsonl"
  path.write_text("".join(lines[:39]) + lines[39][:len(lines[39]) // 2])  # killed mid-write of the 40th row
  difficulty.run(toy_config(toy, out))  # the 16 problems left: one sampler call, batched unlike the first run
  resumed = path.read_text().splitlines(keepends=True)
  assert resumed[:39] == lines[:39]  # earlier rows kept, not resampled
  assert sorted(map(json.loads, resumed), key=lambda r: r["id"]) == sorted(map(json.loads, lines),
                                                                            key=lambda r: r["id"])
  for name in ("prompts.jsonl", "summary.json"):
    assert (out / name).read_text() == (full_run[0] / name).read_text()
  with pytest.raises(UserError, match="other settings"):  # other sampling settings are refused, not mixed in
    difficulty.run(toy_config(toy, out, samples=4))


def test_defaults_render_and_sample_as_rl():
  mine, rl = stages.defaults("difficulty"), stages.defaults("rl")
  assert mine.prompt.to_dict() == rl.prompt.to_dict()
  assert mine.sampling.to_dict() == rl.sampling.to_dict()
  helps = stages.key_help("difficulty")
  assert all(helps[k] == stages.key_help("rl")[k] for k in helps if k.startswith("prompt."))
  assert all(k in helps for k, _ in stages.flat_defaults("difficulty"))


@pytest.mark.parametrize("values,key", [
    ({"samples": 0}, "samples"), ({"limit": 0}, "limit"), ({"limit": -2}, "limit"), ({"batch_size": 0}, "batch_size"),
    ({"input": ""}, "input"), ({"checkpoint": ""}, "checkpoint"), ({"output_dir": ""}, "output_dir"),
    ({"keep_above": 1.0}, "keep_above"), ({"keep_above": float("nan")}, "keep_above"),
    ({"keep_below": 0.0}, "keep_below"), ({"keep_above": 0.5, "keep_below": 0.5}, "keep_below"),
    ({"samples": 2, "keep_above": 0.6, "keep_below": 0.9}, "keep_below"),
    ({"sampling.temperature": -1.0}, "sampling.temperature"), ({"sampling.top_p": 0.0}, "sampling.top_p"),
    ({"sampling.max_new_tokens": 0}, "sampling.max_new_tokens"), ({"model.dtype": "fp8"}, "model.dtype"),
    ({"prompt.example_problem": "1 + 1", "prompt.example_solution": " "}, "prompt.example_solution"),
    ({"verifier.workers": 0}, "verifier.workers"),
])
def test_bad_values_are_one_line_config_errors_before_anything(values, key, toy, tmp_path, no_model):
  config = toy_config(toy, tmp_path / "out", **values)
  with pytest.raises(ConfigError, match=f"'{key}'") as e:
    difficulty.run(config)
  assert "\n" not in str(e.value)
  assert not any(tmp_path.iterdir())


def test_bad_inputs_are_named_before_the_model_loads(toy, tmp_path, no_model):
  empty_answer = tmp_path / "p.jsonl"
  empty_answer.write_text('{"id": "a", "problem": "1 + 1", "answer": "2"}\n{"id": "b", "problem": "2 + 2", '
                          '"answer": " "}\n')
  with pytest.raises(UserError, match="problem 'b' has an empty 'answer'"):
    difficulty.run(toy_config(toy, tmp_path / "out", input=str(empty_answer)))
  with pytest.raises(UserError, match="neither a bundled benchmark"):
    difficulty.run(toy_config(toy, tmp_path / "out", input=str(tmp_path / "missing.jsonl")))
  with pytest.raises(UserError, match="context"):
    difficulty.run(toy_config(toy, tmp_path / "out", **{"sampling.max_new_tokens": 64}))
  assert not (tmp_path / "out").exists()
