"""Input handling of issue 18: non-UTF-8 lines (7), blank problems (10), errors naming the right config key (11) and
duplicate SFT rows (12). Every refusal is one line naming the file:line or key, before the model loads."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from astro_jax import data, main, stages
from astro_jax.data import DataError
from astro_jax.errors import ConfigError, UserError
from astro_jax.stages import common
from tests.conftest import REPO, run_with_devices, set_values, stage_config

sys.path.insert(0, os.path.join(REPO, "tools"))
import make_toy_task  # noqa: E402

BAD_BYTES = b"\xff\xfe"
SFT_ROWS = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(4)]
PROBLEMS = [{"id": "a", "problem": "1 + 1", "answer": "2"}, {"id": "b", "problem": "2 + 2", "answer": "4"}]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  return make_toy_task.make(tmp_path_factory.mktemp("toy"))


@pytest.fixture()
def no_model(monkeypatch):
  """Loading a model fails the test: everything checked must be checked before it."""
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the error was found")
  monkeypatch.setattr(common, "load_model", refuse)
  from astro_jax import checkpoint
  monkeypatch.setattr(checkpoint, "load_model", refuse)


def jsonl_bytes(rows: list[dict]) -> bytes:
  return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def with_bad_line(path: Path, rows: list[dict], at: int = 1) -> Path:
  """`rows` as JSONL with a line of non-UTF-8 bytes inserted before row `at` (so it is line at + 1)."""
  lines = [json.dumps(r).encode() for r in rows]
  path.write_bytes(b"\n".join(lines[:at] + [BAD_BYTES] + lines[at:]) + b"\n")
  return path


def not_utf8(path: Path, line: int) -> str:
  return f"^{re.escape(str(path))}:{line}: not UTF-8 text \\([^\n]*\\)$"


def cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def one_line(proc: subprocess.CompletedProcess) -> str:
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  return lines[0]


# --- 7. non-UTF-8 lines ------------------------------------------------------------------------------------------

def test_data_readers_name_a_non_utf8_line(tmp_path):
  path = with_bad_line(tmp_path / "p.jsonl", PROBLEMS)
  with pytest.raises(DataError, match=not_utf8(path, 2)):
    data.load_jsonl(path)
  with pytest.raises(DataError, match=not_utf8(path, 2)):
    data.read_jsonl_rows(path)
  with pytest.raises(DataError, match=not_utf8(path, 2)):
    data.read_jsonl_lines(path, torn_tail_ok=False)
  # a terminated last line is corruption; an unterminated one is a torn write (dropped) unless torn_tail_ok=False
  path.write_bytes(jsonl_bytes(PROBLEMS) + BAD_BYTES + b"\n")
  with pytest.raises(DataError, match=not_utf8(path, 3)):
    data.read_jsonl_rows(path)
  path.write_bytes(jsonl_bytes(PROBLEMS) + b'{"id": "c", "problem": "\xc3')  # cut in the middle of a character
  assert data.read_jsonl_rows(path) == PROBLEMS
  with pytest.raises(DataError, match=not_utf8(path, 3)):
    data.read_jsonl_rows(path, torn_tail_ok=False)


def test_sft_reader_names_a_non_utf8_line(tmp_path, smollm2_dir):
  from astro_jax.tokenizer import Tokenizer
  from astro_jax.train import data as train_data
  tokenizer = Tokenizer.load(smollm2_dir)
  path = with_bad_line(tmp_path / "sft.jsonl", SFT_ROWS, at=2)
  with pytest.raises(DataError, match=not_utf8(path, 3)):
    train_data.read_examples(path, tokenizer, max_length=64)
  examples, counts = train_data.read_examples(path, tokenizer, max_length=64, on_error="skip")
  assert len(examples) == 4 and counts.skipped == 1


@pytest.mark.parametrize("stage", ["mcts", "difficulty", "rl", "eval", "sft"])
def test_stages_name_a_non_utf8_line_before_the_model_loads(stage, toy, tmp_path, no_model):
  model_dir, _ = toy
  path = with_bad_line(tmp_path / "in.jsonl", SFT_ROWS if stage == "sft" else PROBLEMS)
  key = {"mcts": "input", "difficulty": "input", "rl": "prompts", "eval": "benchmarks", "sft": "data"}[stage]
  config = stage_config(stage, checkpoint=str(model_dir), output_dir=str(tmp_path / "out"), compile_cache_dir="",
                        **{key: str(path)}, **({"seq_len": 32} if stage == "sft" else {}))
  with pytest.raises(UserError, match=not_utf8(path, 2)):
    stages.get(stage).run(config)
  assert not (tmp_path / "out").exists()


def test_cli_non_utf8_is_one_line_with_status_2(toy, tmp_path):
  model_dir, _ = toy
  path = with_bad_line(tmp_path / "prompts.jsonl", PROBLEMS)
  proc = cli("-m", "astro_jax.main", "--config=configs/rl_tiny.py", f"--config.checkpoint={model_dir}",
             f"--config.prompts={path}", f"--config.output_dir={tmp_path / 'out'}")
  assert re.match(f"error: {re.escape(str(path))}:2: not UTF-8 text \\(", one_line(proc)), proc.stderr


def test_view_tree_names_a_non_utf8_line(tmp_path):
  path = tmp_path / "trees.jsonl"
  path.write_bytes(BAD_BYTES + b"\n")
  line = one_line(cli("tools/view_tree.py", str(path), "--list"))
  assert line.startswith(f"view_tree: error: {path}:1: not UTF-8 text ("), line


# --- 10. blank problems --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["problem", "answer"])
def test_rl_refuses_a_blank_problem_or_answer_before_the_model_loads(field, toy, tmp_path, no_model):
  model_dir, _ = toy
  path = tmp_path / "prompts.jsonl"
  path.write_bytes(jsonl_bytes([PROBLEMS[0], {**PROBLEMS[1], field: " \t"}]))
  config = stage_config("rl", checkpoint=str(model_dir), prompts=str(path), output_dir=str(tmp_path / "out"))
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: problem 'b' has an empty '{field}'$"):
    stages.get("rl").run(config)
  config = stage_config("eval", checkpoint=str(model_dir), benchmarks=str(path), output_dir=str(tmp_path / "e"))
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: problem 'b' has an empty '{field}'$"):
    stages.get("eval").run(config)
  assert not (tmp_path / "out").exists() and not (tmp_path / "e").exists()


# --- 11. errors name the stage's own keys --------------------------------------------------------------------------

def test_rl_names_its_own_keys_for_a_batch_the_mesh_cannot_split(toy, tmp_path):
  model_dir, prompts = toy
  out = run_with_devices(f"""
      from astro_jax import main
      from astro_jax.errors import ConfigError
      from astro_jax.stages import rl
      config = main.load_config_file("configs/rl_tiny.py")
      config.unlock()
      config.update(checkpoint={str(model_dir)!r}, prompts={str(prompts)!r}, output_dir={str(tmp_path / 'o')!r},
                    batch_prompts=3, group_size=2, minibatches=1)
      try:
        rl.run(config)
      except ConfigError as e:
        print(e)
      """, timeout=300)
  assert "'batch_prompts'" in out and "'group_size'" in out and "'mesh'" in out, out
  assert "batch_size" not in out, out


def test_rl_grad_accum_error_names_rl_keys(toy, tmp_path, no_model):
  model_dir, prompts = toy
  config = stage_config("rl", checkpoint=str(model_dir), prompts=str(prompts), output_dir=str(tmp_path / "o"),
                        batch_prompts=3, group_size=2, grad_accum=4)
  with pytest.raises(ConfigError, match="'grad_accum'.*batch_prompts x group_size") as e:
    stages.get("rl").run(config)
  assert "batch_size" not in str(e.value)


def test_sft_names_eval_data_for_a_missing_eval_file(toy, tmp_path, no_model):
  model_dir, _ = toy
  path = tmp_path / "sft.jsonl"
  path.write_bytes(jsonl_bytes(SFT_ROWS))
  config = stage_config("sft", checkpoint=str(model_dir), data=str(path), output_dir=str(tmp_path / "o"),
                        eval_data=str(tmp_path / "missing.jsonl"), seq_len=32)
  with pytest.raises(ConfigError, match="^config key 'eval_data' = .*missing.jsonl'?: no such file$"):
    stages.get("sft").run(config)


# --- 12. duplicate SFT rows -------------------------------------------------------------------------------------

def dup_file(path: Path) -> Path:
  """Row 3 repeats row 1 (as prompt + response), row 5 repeats row 2."""
  first = SFT_ROWS[0]["messages"]
  rows = [SFT_ROWS[0], SFT_ROWS[1], {"prompt": first[0]["content"], "response": first[1]["content"]},
          SFT_ROWS[2], SFT_ROWS[1], SFT_ROWS[3]]
  path.write_bytes(jsonl_bytes(rows))
  return path


def test_duplicate_sft_rows_are_kept_counted_and_named(tmp_path, smollm2_dir, caplog):
  from astro_jax.tokenizer import Tokenizer
  from astro_jax.train import data as train_data
  tokenizer = Tokenizer.load(smollm2_dir)
  path = dup_file(tmp_path / "sft.jsonl")
  with caplog.at_level(logging.WARNING):
    examples, counts = train_data.read_examples(path, tokenizer, max_length=64)
  # Kept (Direct-SFT data repeats rows on purpose to match counts), counted, and named in one warning.
  assert len(examples) == 6 and counts.duplicates == 2 and counts.kept == 6 and counts.rows == 6
  assert list(examples[2].tokens) == list(examples[0].tokens) and list(examples[4].tokens) == list(examples[1].tokens)
  warned = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()]
  assert len(warned) == 1 and "2 rows repeat an earlier row's conversation" in warned[0]
  assert f"{path}:3" in warned[0] and "line 1" in warned[0]


def test_sft_stage_counts_duplicates(toy, tmp_path, tiny_checkpoint, monkeypatch):
  from astro_jax.train import loop

  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop()
  monkeypatch.setattr(loop.Trainer, "train", stop)  # data_counts.json is written just before training
  path = dup_file(tmp_path / "sft.jsonl")
  out = tmp_path / "run"
  config = main.load_config_file(os.path.join(REPO, "configs", "sft_tiny.py"))
  set_values(config, {"checkpoint": str(tiny_checkpoint), "data": str(path), "output_dir": str(out),
                      "export_hf": False, "batch_size": 1, "steps": 1})
  with pytest.raises(Stop):
    stages.get("sft").run(config)
  counts = json.loads((out / "data_counts.json").read_text())
  assert counts["duplicates"] == 2 and counts["rows"] == 6 and counts["kept"] == 6
