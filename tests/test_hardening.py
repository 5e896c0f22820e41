"""Regression tests for the hardening findings: randomness independent of batching, no lost data, a failed run
never blocks its location, errors before work (one line, exit 2), quiet runs, eval keys, file modes, and the
README's config tables. Stages run on a tiny random checkpoint with SmolLM2's vocabulary (seconds per run)."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from astro_jax import data, files, main, stages, verifier
from astro_jax.errors import ConfigError, UserError
from astro_jax.stages import common
from tests.conftest import CACHE_FLAG, REPO, stage_config


def run_main(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "astro_jax.main", *args, CACHE_FLAG]  # the test run's compile cache
  if umask is not None:
    command = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *command]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def digest(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def completions(path: Path) -> list:
  return [[c["token_ids"] for c in row["completions"]] for row in data.read_jsonl_rows(path)]


@pytest.fixture()
def prompts_file(tmp_path):
  src = tmp_path / "prompts.jsonl"
  data.write_jsonl_atomic(src, [{"prompt": "Count: one, two,"}] * 6 + [{"prompt": "Colours: red,"}])
  return src


@pytest.fixture()
def no_model(monkeypatch):
  """Loading a model fails the test: everything checked must be checked before it."""
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the error was found")
  monkeypatch.setattr(common, "load_model", refuse)


# --- 1. randomness ---------------------------------------------------------------------------------------------

def test_generate_samples_do_not_depend_on_batch_size_or_resume(tmp_path, tiny_checkpoint, prompts_file):
  def run(out, batch_size):
    config = stage_config("generate", checkpoint=str(tiny_checkpoint), input=str(prompts_file), output=str(out),
                          batch_size=batch_size, compile_cache_dir="",
                          **{"sampling.temperature": 1.0, "sampling.n": 2, "sampling.max_new_tokens": 6})
    stages.get("generate").run(config)
    return completions(out)

  by_size = {b: run(tmp_path / f"b{b}.jsonl", b) for b in (1, 4, 16)}
  assert by_size[1] == by_size[4] == by_size[16]
  samples = [tuple(ids) for row in by_size[1][:6] for ids in row]
  assert len(set(samples)) == len(samples)  # six identical prompts x 2 samples: all different

  # A run killed after its first call (batch_size 4: rows 0-1) resumes with batch_size 16: same samples.
  out = tmp_path / "resumed.jsonl"
  (tmp_path / "b4.jsonl.settings.json").replace(tmp_path / "resumed.jsonl.settings.json")
  for i, row in enumerate(data.read_jsonl_rows(tmp_path / "b4.jsonl")[:2]):
    data.append_jsonl(tmp_path / "resumed.jsonl.partial", {"_index": i, **row, "marker": True})
  assert run(out, 16) == by_size[1]
  assert [r.get("marker") for r in data.read_jsonl_rows(out)][:3] == [True, True, None]


# --- 2. nothing existing is lost ---------------------------------------------------------------------------------

def test_generate_never_overwrites_what_it_did_not_make(tmp_path, tiny_checkpoint, prompts_file):
  out = tmp_path / "out.jsonl"
  out.write_text('{"precious": 1}\n')
  before = digest(out)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  base = ("--config=configs/generate.py", f"--config.checkpoint={tiny_checkpoint}", f"--config.output={out}",
          "--config.sampling.max_new_tokens=4")
  proc = run_main(*base, f"--config.input={empty}")  # an empty input: refused, the output untouched
  assert proc.returncode == 2 and "empty" in proc.stderr and str(empty) in proc.stderr
  proc = run_main(*base, f"--config.input={prompts_file}")  # an output of unknown origin: refused
  assert proc.returncode == 2 and "overwrite" in proc.stderr, proc.stderr
  assert digest(out) == before and not Path(f"{out}.settings.json").exists()

  out.unlink()
  assert run_main(*base, f"--config.input={prompts_file}").returncode == 0
  made = digest(out)
  again = run_main(*base, f"--config.input={prompts_file}")  # same settings: complete, nothing to do
  assert again.returncode == 0 and "nothing to do" in again.stdout and digest(out) == made
  other = run_main(*base, f"--config.input={prompts_file}", "--config.sampling.max_new_tokens=5")
  assert other.returncode == 2 and "max_new_tokens: 4 -> now 5" in other.stderr and digest(out) == made
  replaced = run_main(*base, f"--config.input={prompts_file}", "--config.sampling.max_new_tokens=5",
                      "--config.overwrite=true")
  assert replaced.returncode == 0 and digest(out) != made
  assert json.loads(Path(f"{out}.settings.json").read_text())["sampling"]["max_new_tokens"] == 5


def test_eval_refuses_other_settings_and_overwrite_replaces_only_when_results_come(tmp_path, tiny_checkpoint,
                                                                                    no_model):
  out = tmp_path / "eval"
  out.mkdir()
  (out / "gsm8k.jsonl").write_text('{"id": "x", "samples": []}\n')
  before = digest(out / "gsm8k.jsonl")
  config = stage_config("eval", checkpoint=str(tiny_checkpoint), benchmarks="gsm8k", limit=2,
                        output_dir=str(out), **{"sampling.max_new_tokens": 16})
  with pytest.raises(UserError, match="unknown settings.*overwrite"):
    stages.get("eval").run(config)
  config.overwrite = True  # allowed now, but the model fails to load: the old rows must survive
  with pytest.raises(AssertionError, match="model was loaded"):
    stages.get("eval").run(config)
  assert digest(out / "gsm8k.jsonl") == before and not (out / "run_config.json").exists()


# --- 3. a failed run does not block its location ------------------------------------------------------------------

def test_failed_runs_then_a_corrected_run_in_the_same_location(tmp_path, tiny_checkpoint, prompts_file):
  out = tmp_path / "out.jsonl"
  long_input = tmp_path / "long.jsonl"
  data.write_jsonl_atomic(long_input, [{"prompt": "ok"}, {"prompt": "word " * 300}])
  base = ("--config=configs/generate.py", f"--config.output={out}", "--config.sampling.max_new_tokens=4")
  failures = [
      (("--config.checkpoint=/no/such/ckpt", f"--config.input={prompts_file}"), "'checkpoint'"),
      ((f"--config.checkpoint={tiny_checkpoint}", f"--config.input={prompts_file}", "--config.sampling.n=0"),
       "'sampling.n'"),
      ((f"--config.checkpoint={tiny_checkpoint}", f"--config.input={long_input}"), f"{long_input}:2"),
  ]
  for args, named in failures:
    proc = run_main(*base, *args)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() and not Path(f"{out}.settings.json").exists() and not Path(f"{out}.partial").exists()
  proc = run_main(*base, f"--config.checkpoint={tiny_checkpoint}", f"--config.input={prompts_file}")
  assert proc.returncode == 0, proc.stderr
  assert len(data.read_jsonl_rows(out)) == 7


# --- 4. bad values are named before the model loads -----------------------------------------------------------------

@pytest.mark.parametrize("stage,key,value", [
    ("generate", "batch_size", 0), ("generate", "batch_size", -3), ("generate", "num_prompts", 0),
    ("generate", "sampling.n", 0), ("generate", "sampling.temperature", -1.0), ("generate", "sampling.top_p", 0.0),
    ("generate", "sampling.top_p", 1.5), ("generate", "sampling.top_k", -1), ("generate", "sampling.max_new_tokens", 0),
    ("generate", "sampling.seed", -1), ("generate", "model.dtype", "fp8"), ("generate", "mesh.fsdp", 0),
    ("generate", "output", ""), ("eval", "samples", 0), ("eval", "limit", -2), ("eval", "batch_size", 0),
    ("eval", "verifier.workers", 0), ("eval", "verifier.timeout_s", 0.0), ("eval", "benchmarks", " , "),
    ("eval", "sampling.top_p", 2.0),
])
def test_bad_values_are_named_before_the_model_loads(stage, key, value, tiny_checkpoint, tmp_path, no_model):
  config = stage_config(stage, checkpoint=str(tiny_checkpoint), **{key: value})
  config["output" if stage == "generate" else "output_dir"] = "" if key == "output" else str(tmp_path / "o")
  with pytest.raises(ConfigError, match=f"'{key}'"):
    stages.get(stage).run(config)
  assert not any(tmp_path.iterdir())


def test_bad_inputs_are_named_before_the_model_loads(tmp_path, tiny_checkpoint, no_model):
  cases = {"missing.jsonl": None, "empty.jsonl": "\n\n", "bad_json.jsonl": '{"prompt": "a"}\n{"prompt": oops}\n',
           "no_prompt.jsonl": '{"prompt": "a"}\n{"text": "b"}\n',
           "bad_messages.jsonl": '{"messages": [{"role": "pirate", "content": "arr"}]}\n'}
  expected = {"missing.jsonl": "no such file", "empty.jsonl": "empty", "bad_json.jsonl": "bad_json.jsonl:2",
              "no_prompt.jsonl": "no_prompt.jsonl:2", "bad_messages.jsonl": "bad_messages.jsonl:1"}
  for name, text in cases.items():
    if text is not None:
      (tmp_path / name).write_text(text)
    config = stage_config("generate", checkpoint=str(tiny_checkpoint), input=str(tmp_path / name),
                          output=str(tmp_path / "out.jsonl"))
    with pytest.raises(UserError, match=expected[name]):
      stages.get("generate").run(config)
  bad = tmp_path / "bad_benchmark.jsonl"
  bad.write_text('{"id": "1", "problem": "p"}\n')
  with pytest.raises(UserError, match="bad_benchmark.jsonl:1: missing required field 'answer'"):
    stages.get("eval").run(stage_config("eval", checkpoint=str(tiny_checkpoint), benchmarks=str(bad),
                                        output_dir=str(tmp_path / "e")))
  with pytest.raises(UserError, match="neither a bundled benchmark"):
    stages.get("eval").run(stage_config("eval", checkpoint=str(tiny_checkpoint), benchmarks="math5000",
                                        output_dir=str(tmp_path / "e")))
  assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "e").exists()


def test_cli_user_errors_are_one_line_with_status_2():
  generate = "--config=configs/generate.py"
  for args, named in [((generate, "--config.batch_size=0"), "'batch_size'"),
                      ((generate, "--config.sampling.n=three"), "'sampling.n'"),
                      ((generate, "--config.overwrite=maybe"), "'overwrite'"), (("--config=configs/nope.py",), "nope.py")]:
    proc = run_main(*args, "--config.output=/tmp/astro_jax_never_written.jsonl")
    assert proc.returncode == 2, (args, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# --- 5. eval keys, truncated answers ----------------------------------------------------------------------------

def test_eval_has_one_name_for_the_number_of_samples():
  assert "n" not in stages.defaults("eval").sampling
  with pytest.raises(ConfigError, match=r"'sampling.n' \(this stage calls it 'samples'\)"):
    main.check_key(stages.defaults("eval"), "sampling.n")
  proc = run_main("--config=configs/eval.py", "--config.sampling.n=4")
  assert proc.returncode == 2 and "samples" in proc.stderr


@pytest.mark.parametrize("text", [r"so the answer is \boxed", "the answer is \\boxed  \n", r"\boxed{3}, then \boxed",
                                  r"The final answer is \boxed{1"])
def test_a_response_cut_off_at_its_box_has_no_answer(text):
  assert verifier.extract_answer(text) is None
  assert not verifier.verify(text, "3").correct


# --- 6. quiet runs, file modes, the README demo's summary ------------------------------------------------------------

def test_runs_are_quiet_write_umask_modes_and_end_with_a_summary(tmp_path, tiny_checkpoint):
  out = tmp_path / "nested" / "demo.jsonl"
  proc = run_main("--config=configs/generate.py", f"--config.checkpoint={tiny_checkpoint}", f"--config.output={out}",
                  "--config.num_prompts=2", "--config.sampling.max_new_tokens=4", umask=0o022)
  assert proc.returncode == 0, proc.stderr
  noise = [line for line in proc.stderr.splitlines() if "generate:" not in line and line.strip()]
  assert noise == [], noise  # only the progress bar: no config dump, no backend INFO lines
  assert "answers: 0/2 right against the gold" in proc.stdout and "tokens/s" in proc.stdout
  for path in (out, Path(f"{out}.settings.json")):
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
  assert stat.S_IMODE(out.parent.stat().st_mode) == 0o755
  verbose = run_main("--config=configs/generate.py", f"--config.checkpoint={tiny_checkpoint}",
                     f"--config.output={out}", "--config.num_prompts=2", "--config.sampling.max_new_tokens=4",
                     "--verbose")
  assert verbose.returncode == 0 and "sampling:" in verbose.stderr  # the config dump, on request


def test_atomic_writes_use_the_umask_and_clean_up_after_killed_writers(tmp_path):
  stale = tmp_path / f".out.json.tmp-999999999@{files._HOST}-abc"  # a pid that cannot be alive
  stale.write_text("half")
  live = tmp_path / f".out.json.tmp-{os.getppid()}@{files._HOST}-abc"  # a live writer's file is left alone
  live.write_text("busy")
  files.write_text_atomic(tmp_path / "out.json", "{}\n")
  assert not stale.exists() and live.exists()
  assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o666 & ~files.umask()
  assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out.json"]


# --- 7. the README's config tables ----------------------------------------------------------------------------

def test_readme_config_tables_are_generated_from_the_stage_defaults():
  readme = (Path(REPO) / "README.md").read_text()
  begin, end = "<!-- config-tables:begin -->", "<!-- config-tables:end -->"
  assert begin in readme and end in readme
  section = readme.split(begin, 1)[1].split(end, 1)[0].strip()
  assert section == stages.config_tables_markdown().strip(), "run: python tools/config_tables.py --write"
  for name in stages.STAGES:
    for key, _ in stages.flat_defaults(name):
      assert f"`{key}`" in section


# --- multi-host -------------------------------------------------------------------------------------------------

def test_two_processes_generate_and_evaluate_what_one_process_does(tmp_path, tiny_checkpoint, prompts_file):
  """Two processes (4 CPU devices each, gloo, JAX's distributed runtime on 127.0.0.1) write what one process with
  8 devices on the same mesh writes; only process 0 writes."""
  import socket
  common_args = [f"--config.checkpoint={tiny_checkpoint}", "--config.mesh.data=-1", "--config.mesh.fsdp=1",
                 "--config.batch_size=8", "--config.sampling.max_new_tokens=6", "--config.sampling.temperature=1.0",
                 CACHE_FLAG]
  jobs = {"generate": ["--config=configs/generate.py", f"--config.input={prompts_file}", "--config.sampling.n=2"],
          "eval": ["--config=configs/eval.py", "--config.benchmarks=gsm8k", "--config.limit=3", "--config.samples=2"]}

  def out_args(stage: str, where: Path) -> list[str]:
    return [f"--config.output={where / 'out.jsonl'}"] if stage == "generate" else [f"--config.output_dir={where}"]

  def env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")

  for stage, args in jobs.items():
    one, two = tmp_path / stage / "one", tmp_path / stage / "two"
    proc = subprocess.run([sys.executable, "-m", "astro_jax.main", *args, *common_args, *out_args(stage, one)],
                          cwd=REPO, env=env(8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "astro_jax.main", *args, *common_args, *out_args(stage, two),
                               "--config.distributed.enabled=True", "--config.distributed.num_processes=2",
                               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                               f"--config.distributed.process_id={i}"],
                              cwd=REPO, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
      _, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
    rows = "out.jsonl" if stage == "generate" else "gsm8k.jsonl"
    assert data.read_jsonl_rows(two / rows) == data.read_jsonl_rows(one / rows)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
