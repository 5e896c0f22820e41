"""Checkpoint hardening: nothing existing is lost, no temporary leftovers survive a kill, outputs follow the umask,
corrupted checkpoints fail with one line naming the file, and HF -> Orbax -> HF keeps every config field.

Tiny random Llama-3.1-style checkpoints only; the command-line tools run as real subprocesses where the tool (its
exit status, its stderr) is what is tested, and in-process (`main(argv)`) for the many corruption kinds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import transformers

from astro_jax import assets, checkpoint, files, stages
from astro_jax.checkpoint import CheckpointError
from astro_jax.files import OutputExistsError
from astro_jax.errors import EXIT_USER_ERROR, UserError
from tests.conftest import REPO, make_tiny_llama31_hf
from tests.test_checkpoint import assert_bit_identical

EXTRA = {"pad_token_id": 0, "astro_test_field": {"kept": [1, 2, 3]}}
GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_new_tokens": 17, "do_sample": True,
              "temperature": 0.7}


# --- helpers ----------------------------------------------------------------------------------------------------

def tree_hash(path: Path) -> str:
  """Names, kinds and bytes of everything under `path` (or of the file `path`)."""
  h = hashlib.sha256()
  items = [path] if path.is_file() else sorted(path.rglob("*"))
  for p in items:
    h.update(str(p.relative_to(path.parent)).encode() + (b"/" if p.is_dir() else b""))
    if p.is_file():
      h.update(p.read_bytes())
  return h.hexdigest()


def occupied(parent: Path, name: str) -> Path:
  """An existing directory `parent/name` holding something precious."""
  out = parent / name
  (out / "sub").mkdir(parents=True)
  (out / "keep.txt").write_text("precious")
  (out / "sub" / "data.bin").write_bytes(os.urandom(1000))
  return out


def tool_env() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def run_tool(name: str, *args, umask: int = -1) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)], cwd=REPO,
                        env=tool_env(), capture_output=True, text=True, timeout=300, umask=umask)


def tool_main(name: str):
  spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), os.path.join(REPO, "tools", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def assert_one_error_line(stderr: str, *fragments: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def modes(root: Path) -> tuple[set[int], set[int]]:
  """The permission bits of every directory (root included) and every file under `root`."""
  dirs, files = {root.stat().st_mode & 0o7777}, set()
  for p in root.rglob("*"):
    (dirs if p.is_dir() else files).add(p.stat().st_mode & 0o7777)
  return dirs, files


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", ""])
  proc.wait()
  return proc.pid


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, llama3_tokenizer_dir) -> Path:
  """A tiny HF checkpoint whose config.json has fields our model does not use, and a generation config."""
  path = tmp_path_factory.mktemp("hf") / "src"
  make_tiny_llama31_hf(path, seed=3)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, **EXTRA}, indent=2))
  (path / "generation_config.json").write_text(json.dumps(GENERATION))
  checkpoint.copy_tokenizer(llama3_tokenizer_dir, path)
  return path


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_hf, tmp_path_factory) -> Path:
  return checkpoint.convert_hf_to_orbax(tiny_hf, tmp_path_factory.mktemp("orbax") / "ckpt")


# --- config round trip and inspect_checkpoint --------------------------------------------------------------------

def test_hf_orbax_hf_keeps_every_config_field(tiny_hf, tiny_ckpt, tmp_path):
  assert json.loads((tiny_ckpt / checkpoint.HF_CONFIG_FILE).read_text()) == json.loads(
      (tiny_hf / "config.json").read_text())
  out = checkpoint.convert_orbax_to_hf(tiny_ckpt, tmp_path / "hf")
  source, config = (json.loads((d / "config.json").read_text()) for d in (tiny_hf, out))
  assert {k: config.get(k) for k in source} == source  # pad_token_id, the extra field, initializer_range ...
  assert json.loads((out / "generation_config.json").read_text()) == GENERATION
  assert transformers.AutoConfig.from_pretrained(out).pad_token_id == 0
  assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 17
  assert_bit_identical(tiny_hf, out)

  # A dtype change updates both dtype spellings and keeps the rest.
  bf16 = checkpoint.convert_orbax_to_hf(checkpoint.convert_hf_to_orbax(tiny_hf, tmp_path / "bf16", dtype="bfloat16"),
                                        tmp_path / "hf_bf16")
  config = json.loads((bf16 / "config.json").read_text())
  assert config["dtype"] == config["torch_dtype"] == "bfloat16" and config["pad_token_id"] == 0


def test_orbax_without_source_config_writes_generated_files(tiny_ckpt, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(tiny_ckpt, bare)
  (bare / checkpoint.HF_CONFIG_FILE).unlink()
  (bare / checkpoint.GENERATION_CONFIG_FILE).unlink()
  out = checkpoint.convert_orbax_to_hf(bare, tmp_path / "hf")
  assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_inspect_checkpoint_reads_no_weights(tiny_hf, tiny_ckpt, monkeypatch):
  import numpy as np
  import orbax.checkpoint as ocp

  def no_reads(*args, **kwargs):
    raise AssertionError("inspect_checkpoint read weights")
  monkeypatch.setattr(np, "memmap", no_reads)
  monkeypatch.setattr(ocp.StandardCheckpointer, "restore", no_reads)
  from_hf, from_orbax = checkpoint.inspect_checkpoint(tiny_hf), checkpoint.inspect_checkpoint(tiny_ckpt)
  assert from_hf == from_orbax == checkpoint.load_orbax_config(tiny_ckpt)
  assert (from_hf.n_layers, from_hf.d_model, from_hf.n_kv_heads, from_hf.vocab_size) == (3, 64, 2, 512)
  assert from_hf.param_dtype == "float32" and from_hf.rope_scaling.original_max_position_embeddings == 32
  assert not from_hf.tie_embeddings and from_hf.eos_token_ids == (2,)


# --- corrupted checkpoints: one CheckpointError naming the file and what is wrong ------------------------------

def _rewrite_header(path: Path, edit) -> None:
  """Apply `edit` to the parsed safetensors header of `path` and write the file back with the same data."""
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  edit(header)
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _first_tensor(header: dict) -> str:
  return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _last_tensor(header: dict) -> str:
  return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _garbage_header(path: Path) -> None:
  raw = bytearray(path.read_bytes())
  raw[8:40] = b"\xff\xfe{garbage" + b"\x00" * 22
  path.write_bytes(bytes(raw))


def _truncate(path: Path, size: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(size)


def _offsets_past_end(header: dict) -> None:
  header[_last_tensor(header)]["data_offsets"][1] += 4


def _wrong_span(header: dict) -> None:
  header[_first_tensor(header)]["shape"] = [7]


ST = "model.safetensors"
BAD_HF = {  # kind -> (corrupt(ckpt_dir), file named, what is wrong[, caught by: i = inspect_checkpoint, l = load])
    "truncated": (lambda d: _truncate(d / ST, (d / ST).stat().st_size - 1000), ST,
                  r"data_offsets \[\d+, \d+\] lie outside the data section .*truncated"),
    "truncated_in_header": (lambda d: _truncate(d / ST, 100), ST, r"header length \d+ is larger than the file"),
    "empty": (lambda d: _truncate(d / ST, 0), ST, r"file is truncated \(0 bytes"),
    "garbage_header": (lambda d: _garbage_header(d / ST), ST, r"header is not valid JSON"),
    "header_length_overflow": (lambda d: (d / ST).write_bytes(b"\xff" * 8 + (d / ST).read_bytes()[8:]), ST,
                               r"header length 18446744073709551615 is larger than the file"),
    "offsets_out_of_range": (lambda d: _rewrite_header(d / ST, _offsets_past_end), ST,
                             r"lie outside the data section"),
    "offsets_not_shape": (lambda d: _rewrite_header(d / ST, _wrong_span), ST,
                          r"data_offsets \[0, \d+\] span \d+ bytes, but shape \(7,\) of F32 needs 28"),
    "config_not_json": (lambda d: (d / "config.json").write_text('{"vocab_size": 512,'), "config.json",
                        r"not valid JSON"),
    "config_missing_field": (lambda d: (d / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "hidden_size"})),
        "config.json", r"required field 'hidden_size' is missing"),
    "config_missing": (lambda d: (d / "config.json").unlink(), "config.json", r"config\.json is missing"),
    "generation_config_not_json": (lambda d: (d / "generation_config.json").write_text("{"),
                                   "generation_config.json", r"not valid JSON", "i"),
}

DATA = "params/ocdbt.process_0/d"


def _largest(d: Path) -> Path:
  return max((p for p in d.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


def _edit_model_config(d: Path, **changes) -> None:
  path = d / "model_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


BAD_ORBAX = {  # kind -> (corrupt(ckpt_dir), file named, what is wrong, caught by: i = inspect_checkpoint, l = load)
    "model_config_not_json": (lambda d: (d / "model_config.json").write_text("{\"vocab"), "model_config.json",
                              r"not valid JSON", "il"),
    "model_config_missing": (lambda d: (d / "model_config.json").unlink(), "model_config.json", r"is missing",
                             "il"),
    "model_config_bad_value": (lambda d: _edit_model_config(d, n_layers=0), "model_config.json",
                               r"n_layers must be a positive integer, found 0", "il"),
    "model_config_unknown_field": (lambda d: _edit_model_config(d, not_a_field=1), "model_config.json",
                                   r"unexpected keyword argument 'not_a_field'", "il"),
    "model_config_wrong_shape": (lambda d: _edit_model_config(d, d_ff=96), "params",
                                 r"expected shape \(3, (64, 96|96, 64)\), found", "il"),
    "hf_config_not_json": (lambda d: (d / checkpoint.HF_CONFIG_FILE).write_text("[1,"), checkpoint.HF_CONFIG_FILE,
                           r"not valid JSON", "i"),
    "params_missing": (lambda d: shutil.rmtree(d / "params"), "params", r"is missing", "il"),
    "metadata_missing": (lambda d: (d / "params" / "_METADATA").unlink(), "params/_METADATA", r"is missing", "il"),
    "metadata_truncated": (lambda d: _truncate(d / "params" / "_METADATA", 100), "params/_METADATA", r"not valid JSON",
                           "il"),
    "manifest_missing": (lambda d: (d / "params" / "manifest.ocdbt").unlink(), "params/manifest.ocdbt", r"is missing",
                         "il"),
    "array_metadata_deleted": (lambda d: shutil.rmtree(d / "params" / "d"), "params",
                               r"corrupted or incomplete: NOT_FOUND", "il"),
    "data_truncated": (lambda d: _truncate(_largest(d / DATA), 1000), "params",
                       r"corrupted or incomplete: OUT_OF_RANGE", "l"),
    "data_deleted": (lambda d: [p.unlink() for p in (d / DATA).iterdir()], "params",
                     r"corrupted or incomplete: [A-Z_]+: ", "l"),
}


def check_corruption(src, tmp_path, capsys, corruption, tool: str, in_flag: str) -> None:
  """Corrupt a copy of `src`: inspect/load (as the table says) and the tool name the file in one line; the tool
  exits 2 and leaves nothing behind."""
  corrupt, fname, what, caught_by = corruption
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  corrupt(bad)
  for read in [{"i": checkpoint.inspect_checkpoint, "l": checkpoint.load_model}[c] for c in caught_by]:
    with pytest.raises(CheckpointError, match=what) as info:
      read(bad)
    assert str(bad / fname) in str(info.value) and "\n" not in str(info.value)
  capsys.readouterr()
  assert tool_main(tool)([in_flag, str(bad), "--out", str(tmp_path / "out")]) == 2
  assert_one_error_line(capsys.readouterr().err, str(bad / fname))
  assert sorted(os.listdir(tmp_path)) == ["bad"]


@pytest.mark.parametrize("kind", sorted(BAD_HF))
def test_corrupted_hf_checkpoint_names_file(tiny_hf, tmp_path, capsys, kind):
  check_corruption(tiny_hf, tmp_path, capsys, (*BAD_HF[kind], "il")[:4], "convert_hf_to_orbax.py", "--hf_dir")


@pytest.mark.parametrize("kind", sorted(BAD_ORBAX))
def test_corrupted_orbax_checkpoint_names_file(tiny_ckpt, tmp_path, capsys, kind):
  check_corruption(tiny_ckpt, tmp_path, capsys, BAD_ORBAX[kind], "convert_orbax_to_hf.py", "--ckpt")


def test_tools_print_one_line_and_exit_2_on_corruption(tiny_hf, tiny_ckpt, tmp_path):
  """Real processes: no traceback, nothing from Orbax's background threads, exit status 2."""
  bad_ckpt = tmp_path / "bad_ckpt"
  shutil.copytree(tiny_ckpt, bad_ckpt)
  shutil.rmtree(bad_ckpt / "params" / "d")  # fails inside Orbax's concurrent metadata reads
  proc = run_tool("convert_orbax_to_hf.py", "--ckpt", bad_ckpt, "--out", tmp_path / "out")
  assert proc.returncode == EXIT_USER_ERROR
  assert_one_error_line(proc.stderr, str(bad_ckpt / "params"), "corrupted or incomplete")
  bad_hf = tmp_path / "bad_hf"
  shutil.copytree(tiny_hf, bad_hf)
  BAD_HF["truncated"][0](bad_hf)
  proc = run_tool("convert_hf_to_orbax.py", "--hf_dir", bad_hf, "--out", tmp_path / "out")
  assert proc.returncode == EXIT_USER_ERROR
  assert_one_error_line(proc.stderr, str(bad_hf / ST), "truncated")
  proc = run_tool("convert_hf_to_orbax.py", "--hf_dir", tmp_path / "nowhere", "--out", tmp_path / "out")
  assert proc.returncode == EXIT_USER_ERROR
  assert_one_error_line(proc.stderr, str(tmp_path / "nowhere"), "does not exist")
  assert sorted(os.listdir(tmp_path)) == ["bad_ckpt", "bad_hf"]


# --- nothing existing is lost -------------------------------------------------------------------------------------

def test_tools_refuse_an_existing_output(tiny_hf, tiny_ckpt, tmp_path):
  cases = [("convert_hf_to_orbax.py", ["--hf_dir", tiny_hf], occupied(tmp_path, "dir_out")),
           ("convert_orbax_to_hf.py", ["--ckpt", tiny_ckpt], tmp_path / "file_out"),
           ("smollm2_to_hf.py", [], occupied(tmp_path, "smollm2_out"))]
  (tmp_path / "file_out").write_text("a file, not a checkpoint")
  for tool, args, out in cases:
    before = tree_hash(out)
    proc = run_tool(tool, *args, "--out", out)
    assert proc.returncode == EXIT_USER_ERROR, (tool, proc.stderr[-2000:])
    assert_one_error_line(proc.stderr, str(out), "already exists", "--overwrite")
    assert tree_hash(out) == before
  assert sorted(os.listdir(tmp_path)) == ["dir_out", "file_out", "smollm2_out"]  # no temporary leftovers


def test_library_refuses_existing_outputs_before_any_work(tiny_hf, tiny_ckpt, tmp_path, monkeypatch):
  model = checkpoint.load_orbax_model(tiny_ckpt)
  dir_out, file_out = occupied(tmp_path, "dir_out"), tmp_path / "file_out"
  file_out.write_bytes(b"precious")
  before = {p: tree_hash(p) for p in (dir_out, file_out)}

  def no_work(*args, **kwargs):
    raise AssertionError("work started although the output exists")
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "load_hf_model", no_work)
    m.setattr(checkpoint, "load_orbax_model", no_work)
    for out in (dir_out, file_out):
      writes = [lambda: checkpoint.convert_hf_to_orbax(tiny_hf, out),
                lambda: checkpoint.convert_orbax_to_hf(tiny_ckpt, out),
                lambda: checkpoint.save_hf(model, out), lambda: checkpoint.save_orbax(model, out),
                lambda: assets.export_gguf_to_hf(tmp_path / "absent.gguf", out)]
      for write in writes:
        with pytest.raises(OutputExistsError, match=rf"{out} already exists .*pass --overwrite"):
          write()
  assert {p: tree_hash(p) for p in before} == before
  assert sorted(os.listdir(tmp_path)) == ["dir_out", "file_out"]

  # --overwrite replaces a directory or a file, leaving nothing of the old one and no temporary siblings.
  checkpoint.convert_hf_to_orbax(tiny_hf, dir_out, overwrite=True)
  checkpoint.convert_orbax_to_hf(dir_out, file_out, overwrite=True)
  assert not (dir_out / "keep.txt").exists() and checkpoint.inspect_checkpoint(dir_out).n_layers == 3
  assert file_out.is_dir() and checkpoint.inspect_checkpoint(file_out).n_layers == 3
  assert sorted(os.listdir(tmp_path)) == ["dir_out", "file_out"]


def _convert_config(**values):
  config = stages.defaults("convert")
  for key, value in values.items():
    config[key] = value
  return config


def test_convert_stage_refuses_existing_output_before_any_work(tiny_hf, tmp_path, monkeypatch):
  from astro_jax.stages import common
  out = occupied(tmp_path, "out")
  before = tree_hash(out)
  with monkeypatch.context() as m:
    m.setattr(common, "resolve_path", lambda *a: pytest.fail("work started although the output exists"))
    with pytest.raises(OutputExistsError, match=rf"{out} already exists .*--config\.overwrite=True"):
      stages.get("convert").run(_convert_config(input=str(tiny_hf), output=str(out)))
    with pytest.raises(UserError, match="'output' = '': an output directory is required"):
      stages.get("convert").run(_convert_config(input=str(tiny_hf)))
    with pytest.raises(UserError, match="'direction' = 'sideways'"):
      stages.get("convert").run(_convert_config(input=str(tiny_hf), output=str(tmp_path / "x"), direction="sideways"))
  assert tree_hash(out) == before
  stages.get("convert").run(_convert_config(input=str(tiny_hf), output=str(out), overwrite=True))
  assert checkpoint.is_orbax_checkpoint(out) and not (out / "keep.txt").exists()
  with pytest.raises(UserError, match="is an Orbax checkpoint; direction 'hf_to_orbax' needs a HF one"):
    stages.get("convert").run(_convert_config(input=str(out), output=str(tmp_path / "y")))
  assert sorted(os.listdir(tmp_path)) == ["out"]


# --- temporary leftovers -----------------------------------------------------------------------------------------

SLOW_EXPORT = """
import sys, time
from astro_jax import checkpoint
write = checkpoint._write_safetensors
def slow(path, tensors, produce):
  write(path, tensors, produce)
  print("wrote", path, flush=True)
  time.sleep(300)
checkpoint._write_safetensors = slow
checkpoint.convert_orbax_to_hf(sys.argv[1], sys.argv[2], max_shard_bytes=100_000)
"""


def test_leftovers_of_a_killed_export_are_removed_by_the_next(tiny_ckpt, tmp_path):
  parent = tmp_path / "outputs"
  parent.mkdir()
  proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(tiny_ckpt), str(parent / "hf")], cwd=REPO,
                          env=tool_env(), stdout=subprocess.PIPE, text=True)
  watchdog = threading.Timer(120, proc.kill)
  watchdog.start()
  try:
    assert proc.stdout.readline().startswith("wrote"), "the export did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    watchdog.cancel()
    proc.stdout.close()
  leftovers = os.listdir(parent)
  assert len(leftovers) == 1 and leftovers[0].startswith(f".hf.tmp-{proc.pid}@"), leftovers
  assert any(p.suffix == ".safetensors" for p in (parent / leftovers[0]).iterdir())
  checkpoint.convert_orbax_to_hf(tiny_ckpt, parent / "hf")
  assert os.listdir(parent) == ["hf"]
  assert checkpoint.inspect_checkpoint(parent / "hf").n_layers == 3


def test_only_dead_writers_leftovers_are_removed(tmp_path):
  host, dead = files._HOST, dead_pid()
  keep = [f".out.tmp-{os.getpid()}@{host}-mine", f".out.tmp-{os.getppid()}@{host}-alive",
          f".out.tmp-{dead}@elsewhere-other_host", f".other.tmp-{dead}@{host}-other_output", f"out.tmp-{dead}-x"]
  remove = [f".out.tmp-{dead}@{host}-dead", f".out.old-{dead}@{host}-dead"]
  for name in keep + remove:
    (tmp_path / name).mkdir()
  (tmp_path / "out").mkdir()
  files.remove_stale_leftovers(tmp_path / "out")
  assert sorted(os.listdir(tmp_path)) == sorted(keep + ["out"])

  # A writer killed between moving the old output aside and moving the new one in: the old one comes back.
  shutil.rmtree(tmp_path / "out")
  old = tmp_path / f".out.old-{dead}@{host}-x1"
  (old / "sub").mkdir(parents=True)
  (old / "sub" / "f.txt").write_text("previous output")
  files.remove_stale_leftovers(tmp_path / "out")
  assert (tmp_path / "out" / "sub" / "f.txt").read_text() == "previous output" and not old.exists()


# --- file modes ---------------------------------------------------------------------------------------------------

def test_outputs_follow_the_umask(tiny_hf, tmp_path):
  ckpt = tmp_path / "ckpt"
  proc = run_tool("convert_hf_to_orbax.py", "--hf_dir", tiny_hf, "--out", ckpt, umask=0o022)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (ckpt / "tokenizer").is_dir() and (ckpt / "params").is_dir()
  assert modes(ckpt) == ({0o755}, {0o644})
  hf = occupied(tmp_path, "hf")
  proc = run_tool("convert_orbax_to_hf.py", "--ckpt", ckpt, "--out", hf, "--max_shard_size", "100KB", "--overwrite",
                  umask=0o027)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (hf / "keep.txt").exists() and len(list(hf.glob("*.safetensors"))) > 1
  assert modes(hf) == ({0o750}, {0o640})
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]
