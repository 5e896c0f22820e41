"""Stages end to end on the real SmolLM2 (generate, eval with resume) and the convert stage on a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from astro_jax import data, stages, verifier
from tests.conftest import REPO, stage_config


def test_generate_stage_keeps_fields_and_writes_completions(tmp_path, smollm2_dir):
  rows = [{"id": "a", "prompt": "The capital of France is", "extra": 1},
          {"id": "b", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}]
  src = tmp_path / "prompts.jsonl"
  data.write_jsonl_atomic(src, rows)
  out = tmp_path / "out.jsonl"
  config = stage_config("generate", checkpoint=str(smollm2_dir), input=str(src), output=str(out),
                        **{"sampling.max_new_tokens": 12, "sampling.n": 2, "sampling.temperature": 0.8})
  stages.get("generate").run(config)
  got = data.read_jsonl_rows(out, torn_tail_ok=False)
  assert [r["id"] for r in got] == ["a", "b"] and got[0]["extra"] == 1 and got[1]["messages"] == rows[1]["messages"]
  from astro_jax.tokenizer import Tokenizer
  tok = Tokenizer.load(smollm2_dir)
  for row in got:
    assert len(row["completions"]) == 2
    for c in row["completions"]:
      assert c["finish_reason"] in ("eos", "stop", "length")
      assert len(c["token_ids"]) == len(c["logprobs"]) <= 12
      assert all(lp <= 0 for lp in c["logprobs"])
      assert c["text"] == tok.decode(c["token_ids"])


def test_generate_stage_resumes_a_killed_run(tmp_path, smollm2_dir):
  src = tmp_path / "prompts.jsonl"
  data.write_jsonl_atomic(src, [{"prompt": "One, two,"}, {"prompt": "Red, green,"}, {"prompt": "A, B,"}])
  out = tmp_path / "out.jsonl"
  config = stage_config("generate", checkpoint=str(smollm2_dir), input=str(src), output=str(out), batch_size=1,
                        **{"sampling.max_new_tokens": 4})
  stages.get("generate").run(config)
  first = data.read_jsonl_rows(out)
  # As if killed after the second prompt: its row is in the partial file (marked, to prove it is reused), the
  # third is not, and a torn line follows; the settings record beside the output stays.
  partial = tmp_path / "out.jsonl.partial"
  settings = tmp_path / "out.jsonl.settings.json"
  assert settings.exists()
  data.append_jsonl(partial, {"_index": 1, **first[1], "marker": True})
  with open(partial, "a") as f:
    f.write('{"_index": 2, "tor')
  out.unlink()
  stages.get("generate").run(config)
  again = data.read_jsonl_rows(out)
  assert [r["prompt"] for r in again] == [r["prompt"] for r in first]
  assert again[1].get("marker") is True and "marker" not in again[0] and "marker" not in again[2]
  assert [r["completions"] for r in again] == [r["completions"] for r in first]  # greedy: same tokens
  assert not partial.exists() and settings.exists()


def test_generate_stage_rejects_malformed_input_with_file_and_line(tmp_path):
  src = tmp_path / "bad.jsonl"
  src.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
  config = stage_config("generate", input=str(src), output=str(tmp_path / "o.jsonl"))
  with pytest.raises(data.DataError, match=r"bad\.jsonl:2"):
    stages.get("generate").run(config)
  src.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
    stages.get("generate").run(config)
  assert not (tmp_path / "o.jsonl").exists()


def test_eval_stage_end_to_end_and_resume(tmp_path, smollm2_dir):
  out = tmp_path / "eval"
  config = stage_config("eval", checkpoint=str(smollm2_dir), benchmarks="math500,gsm8k", limit=3, samples=2,
                        output_dir=str(out), **{"sampling.max_new_tokens": 48})
  stages.get("eval").run(config)
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary) == {"math500", "gsm8k"}
  for name in summary:
    rows = data.read_jsonl_rows(out / f"{name}.jsonl")
    assert len(rows) == 3 and all(len(r["samples"]) == 2 for r in rows)
    samples = [s for r in rows for s in r["samples"]]
    golds = [r["gold"] for r in rows for _ in r["samples"]]
    # Grading is the verifier's, recomputed independently of the stage.
    recheck = verifier.verify_batch([s["text"] for s in samples], golds, workers=1)
    assert [s["correct"] for s in samples] == [v.correct for v in recheck]
    metrics = summary[name]["metrics"]
    assert metrics["pass@1"]["mean"] == pytest.approx(np.mean([s["correct"] for s in samples]))
    assert metrics["mean_response_tokens"]["mean"] == pytest.approx(np.mean([s["n_tokens"] for s in samples]))
    for m in metrics.values():
      assert m["ci_low"] <= m["mean"] <= m["ci_high"]
  assert "pass@1" in (out / "summary.md").read_text()

  # A run killed mid-write: the last row is torn and one problem is missing. Resuming keeps earlier rows as they
  # are (no re-sampling) and completes the rest.
  path = out / "math500.jsonl"
  lines = path.read_text().splitlines(keepends=True)
  path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
  stages.get("eval").run(config)
  resumed = path.read_text().splitlines(keepends=True)
  assert resumed[0] == lines[0] and len(resumed) == 3
  assert [json.loads(x)["id"] for x in resumed] == [json.loads(x)["id"] for x in lines]

  # Other sampling settings in the same directory are refused rather than mixed in.
  other = stage_config("eval", checkpoint=str(smollm2_dir), benchmarks="math500", limit=3, samples=4,
                       output_dir=str(out))
  with pytest.raises(ValueError, match="other settings"):
    stages.get("eval").run(other)


def test_convert_stage_round_trip(tmp_path):
  import torch
  from tests.conftest import make_tiny_llama31_hf
  hf = tmp_path / "hf"
  make_tiny_llama31_hf(hf)
  stages.get("convert").run(stage_config("convert", input=str(hf), output=str(tmp_path / "ckpt")))
  stages.get("convert").run(stage_config("convert", direction="orbax_to_hf", input=str(tmp_path / "ckpt"),
                                         output=str(tmp_path / "hf2")))
  from safetensors.torch import load_file
  a, b = load_file(hf / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
  assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_readme_main_job_is_the_demo_pipeline(tmp_path, smollm2_dir):
  """The README's first command after set-up, `python -m astro_jax.main`, runs configs/demo.py: the pipeline on the
  real SmolLM2 whose every pre-flight check (sub-configs, files, leak, context) passes. Run end to end it takes
  ~15 min (README); tests/test_pipeline.py runs the same pipeline on a tiny model."""
  from astro_jax import main
  from astro_jax.stages import pipeline
  assert main.config_spec([]) == str(main.REPO / "configs" / "demo.py")
  config = main.validate(main.load_config_file(main.config_spec([])))
  assert config.stage == "pipeline" and config.checkpoint == "asset:smollm2" and config.arms == "astro"
  steps = pipeline.validate(config)
  assert [s.name for s in steps] == ["mcts", "base/eval", "astro/sft", "astro/eval_sft", "astro/difficulty",
                                     "astro/rl", "astro/eval_rl"]
  train, test = (data.load_jsonl(f"{REPO}/configs/data/arith_demo/{n}.jsonl") for n in ("train", "test"))
  assert {p.level for p in train} == {p.level for p in test} == {1, 2} and len(train) == len(test) == 8
  # the command itself, without a config: the demo's checks refuse a bad override before any work
  proc = subprocess.run([sys.executable, "-m", "astro_jax.main", "--config.mcts.search.k=0",
                         f"--config.output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2 and "mcts" in proc.stderr and "k" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


