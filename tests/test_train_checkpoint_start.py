"""A training run's step (RUN/checkpoints/<step>) as a checkpoint: sft and rl start from it (a run stopped by a NaN
continues from its last good step), `convert` and tools/convert_orbax_to_hf.py export it with the start checkpoint's
config.json fields, and a step without its run's settings, a run directory named instead of a step, or a corrupted
step is refused in one line naming what is wrong.

The run: configs/sft_tiny.py on the tiny checkpoint (with a pad_token_id, which our ModelConfig does not hold), 3
steps, a checkpoint every step.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from astro_jax import checkpoint, main, stages
from astro_jax.errors import UserError
from astro_jax.model.llama import LAYER_WEIGHTS
from astro_jax.stages import common
from astro_jax.train import loop
from tests.conftest import REPO, make_tiny_llama31_hf, run_with_devices, set_values, stage_config
from tests.test_checkpoint import assert_bit_identical
from tests.test_checkpoint_hardening import assert_one_error_line, run_tool

DATA = Path(REPO) / "docs" / "smollm2_run" / "sft.jsonl"
RUN = {"steps": 3, "save_every": 1, "keep": 3, "eval_every": 0, "eval_fraction": 0.0, "export_hf": False,
       "compile_cache_dir": ""}


def sft_config(ckpt: Path, out: Path, **values):
  base = main.load_config_file(os.path.join(REPO, "configs", "sft_tiny.py"))
  return set_values(base, {"checkpoint": str(ckpt), "data": str(DATA), "output_dir": str(out), **RUN, **values})


def step_params(step: Path) -> dict[str, np.ndarray]:
  """A step's params, read with Orbax directly (the whole train state, no target)."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(step / "state")
  return {k: np.asarray(v) for k, v in state["params"].items()}


def assert_equal_params(got: dict, want: dict[str, np.ndarray]) -> None:
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    value_got = np.asarray(got[name])
    assert value_got.dtype == value.dtype and np.array_equal(value_got, value), name


@pytest.fixture(scope="module")
def source(tiny_checkpoint, tmp_path_factory) -> Path:
  """The tiny HF checkpoint with a pad_token_id in its config.json."""
  out = tmp_path_factory.mktemp("source") / "hf"
  shutil.copytree(tiny_checkpoint, out)
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**config, "pad_token_id": 0}))
  return out


@pytest.fixture(scope="module")
def run_dir(source, tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("run") / "run"
  stages.get("sft").run(sft_config(source, out))
  assert sorted(os.listdir(out / "checkpoints")) == ["1", "2", "3"]
  return out


@pytest.fixture(scope="module")
def continued(run_dir, tmp_path_factory) -> tuple[Path, dict]:
  """An sft run started from step 2 of `run_dir` (1 step, HF export), and the start weights it was given."""
  loaded, original = {}, loop.Trainer.load_params

  def spy(self, params):
    loaded.update({k: np.asarray(v) for k, v in params.items()})
    return original(self, params)

  out = tmp_path_factory.mktemp("continued") / "run"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.Trainer, "load_params", spy)
    stages.get("sft").run(sft_config(run_dir / "checkpoints" / "2", out, steps=1, export_hf=True))
  return out, loaded


# --- starting from a step -------------------------------------------------------------------------------------------

def test_sft_starts_from_exactly_the_steps_params(run_dir, source, continued):
  step = run_dir / "checkpoints" / "2"
  out, loaded = continued
  want = step_params(step)
  assert_equal_params(loaded, want)
  assert not np.array_equal(want["wq"], np.asarray(checkpoint.load_model(source).wq[...]))  # trained, not the source
  assert json.loads((out / "run_config.json").read_text())["checkpoint"]["path"] == str(step)
  hf_config = json.loads((out / "hf" / "config.json").read_text())  # the HF source's fields, through the step
  assert hf_config["pad_token_id"] == 0 and hf_config["initializer_range"] == 0.08
  assert (out / "hf" / "tokenizer.json").is_file()


def test_inspect_and_tokenizer_of_a_step_and_of_a_step_of_a_continued_run(run_dir, source, continued):
  """The config is the source's (param_dtype: the stored one); a run started from a step has its source's too."""
  want = checkpoint.inspect_checkpoint(source)
  for step in (run_dir / "checkpoints" / "2", continued[0] / "checkpoints" / "1"):
    assert checkpoint.checkpoint_kind(step) == "train"
    assert checkpoint.inspect_checkpoint(step) == want
    assert checkpoint.tokenizer_dir_of(step) == source
    assert checkpoint.train_root(step) == source
    assert checkpoint.hf_extras(step)[0]["pad_token_id"] == 0


def test_rl_takes_a_step_as_its_checkpoint(run_dir, source):
  config = stage_config("rl", checkpoint=str(run_dir / "checkpoints" / "3"))
  path, cfg = common.inspect_checkpoint(config)
  assert cfg == checkpoint.inspect_checkpoint(source)
  tokenizer = common.load_tokenizer(config, path, cfg)
  reference = transformers.AutoTokenizer.from_pretrained(source)
  assert tokenizer.encode("1 + 1 = 2") == reference.encode("1 + 1 = 2", add_special_tokens=False)


def test_loading_a_step_reads_only_its_params(run_dir, monkeypatch):
  import orbax.checkpoint as ocp
  read, deserialize = [], ocp.type_handlers.ArrayHandler.deserialize

  async def spy(self, infos, args=None):
    read.extend(info.name for info in infos)
    return await deserialize(self, infos, args)

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", spy)
  model = checkpoint.load_model(run_dir / "checkpoints" / "2")
  assert sorted(read) == sorted(f"params.{name}" for name in model.weights())


def test_a_runs_own_tokenizer_is_its_steps(run_dir, tmp_path, llama3_tokenizer_dir):
  step = copy_run(run_dir, tmp_path / "run")
  run_config = step.parent.parent / "run_config.json"
  record = json.loads(run_config.read_text())
  _replace(run_config, json.dumps({**record, "tokenizer": {"asset": "asset:llama3_tokenizer"}}))
  assert checkpoint.tokenizer_dir_of(step) == llama3_tokenizer_dir
  _replace(run_config, json.dumps({**record, "tokenizer": {"path": "/nonexistent/tok"}}))
  with pytest.raises(checkpoint.CheckpointNotFoundError, match="run_config.json: the run's tokenizer /nonexistent/tok "
                                                               "does not exist"):
    checkpoint.tokenizer_dir_of(step)


def test_a_step_restores_onto_a_mesh(run_dir):
  """Only the params, straight into the sharder's shardings (4 simulated devices, fsdp x tensor)."""
  step = run_dir / "checkpoints" / "2"
  out = run_with_devices(f"""
    import numpy as np, orbax.checkpoint as ocp
    from astro_jax import checkpoint, sharding
    sharder = sharding.Sharder.create(sharding.make_mesh(1, 2, 2), "train")
    model = checkpoint.load_model({str(step)!r}, sharder=sharder)
    with ocp.StandardCheckpointer() as c:
      want = c.restore({str(step / "state")!r})["params"]
    for name, value in model.weights().items():
      assert np.array_equal(np.asarray(value), np.asarray(want[name])), name
      assert len(value.sharding.device_set) == 4 and value.sharding.mesh.shape == sharder.mesh.shape, name
    print("ok", model.wq[...].sharding.spec)
  """, n_devices=4)
  assert out.startswith("ok")


# --- exporting a step -------------------------------------------------------------------------------------------------

def test_convert_tool_and_stage_export_a_step(run_dir, source, tmp_path):
  step = run_dir / "checkpoints" / "2"
  proc = run_tool("convert_orbax_to_hf.py", "--ckpt", step, "--out", tmp_path / "hf")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg, params = checkpoint.inspect_checkpoint(step), step_params(step)
  state = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
  for name in LAYER_WEIGHTS:
    for i in range(cfg.n_layers):
      hf_name = checkpoint._hf_layer_name(name, i)
      assert np.array_equal(state[hf_name].numpy(), checkpoint._to_hf(name, params[name][i], cfg)), hf_name
  for name, hf_name in checkpoint._HF_GLOBAL.items():
    assert np.array_equal(state[hf_name].numpy(), checkpoint._to_hf(name, params[name], cfg)), hf_name
  written, original = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", source))
  assert set(original) <= set(written)
  assert {k: written[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id", "initializer_range")} == {
      "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.08}
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").vocab_size == cfg.vocab_size

  stages.get("convert").run(stage_config("convert", direction="orbax_to_hf", input=str(step),
                                         output=str(tmp_path / "stage"), compile_cache_dir=""))
  assert assert_bit_identical(tmp_path / "hf", tmp_path / "stage") == len(checkpoint.hf_tensor_shapes(cfg))
  assert json.loads((tmp_path / "stage" / "config.json").read_text()) == written


# --- refusals: one line naming what is wrong ----------------------------------------------------------------------

def copy_run(run_dir: Path, dst: Path, step: str = "2") -> Path:
  """dst/run_config.json (a copy) and dst/checkpoints/<step> (hard links: replace files, never edit them)."""
  (dst / "checkpoints").mkdir(parents=True)
  shutil.copyfile(run_dir / "run_config.json", dst / "run_config.json")
  shutil.copytree(run_dir / "checkpoints" / "2", dst / "checkpoints" / step, copy_function=os.link)
  return dst / "checkpoints" / step


def test_tool_refuses_a_step_without_run_config_and_a_run_directory(run_dir, tmp_path):
  lonely = copy_run(run_dir, tmp_path / "lonely")
  (tmp_path / "lonely" / "run_config.json").unlink()
  proc = run_tool("convert_orbax_to_hf.py", "--ckpt", lonely, "--out", tmp_path / "hf")
  assert proc.returncode == 2
  assert_one_error_line(proc.stderr, f"{tmp_path / 'lonely' / 'run_config.json'} is missing", str(lonely))

  proc = run_tool("convert_orbax_to_hf.py", "--ckpt", run_dir / "checkpoints", "--out", tmp_path / "hf")
  assert proc.returncode == 2
  assert_one_error_line(proc.stderr, f"name one of its steps, {run_dir / 'checkpoints'}/<step>",
                        "steps present: 1, 2, 3")
  assert not (tmp_path / "hf").exists()


def test_stages_refuse_a_run_directory_naming_the_steps(run_dir, tmp_path):
  for named in (run_dir, run_dir / "checkpoints"):
    with pytest.raises(UserError, match=r"steps present: 1, 2, 3\)$") as info:
      common.inspect_checkpoint(sft_config(named, tmp_path / "out"))
    assert f"{named} is a training run's" in str(info.value) and "\n" not in str(info.value)


def _replace(path: Path, text: str) -> None:
  path.unlink()
  path.write_text(text)


def _start_checkpoint(run: Path, spec: str) -> None:
  record = json.loads((run / "run_config.json").read_text())
  _replace(run / "run_config.json", json.dumps({**record, "checkpoint": {"path": spec}}))


BAD_STEPS = {  # kind -> (corrupt(step), file or directory named, what is wrong)
    "metadata_not_json": (lambda s: _replace(s / "state" / "_METADATA", "{\"tree"), "state/_METADATA",
                          "not valid JSON"),
    "metadata_missing": (lambda s: (s / "state" / "_METADATA").unlink(), "state/_METADATA", "is missing"),
    "manifest_missing": (lambda s: (s / "state" / "manifest.ocdbt").unlink(), "state/manifest.ocdbt", "is missing"),
    "state_missing": (lambda s: shutil.rmtree(s / "state"), "state", "is missing"),
    "run_config_not_json": (lambda s: _replace(s.parent.parent / "run_config.json", "{"), "../../run_config.json",
                            "not valid JSON"),
    "start_checkpoint_missing": (lambda s: _start_checkpoint(s.parent.parent, "/nonexistent/ckpt"),
                                 "../../run_config.json", "start checkpoint /nonexistent/ckpt does not exist"),
    "start_checkpoint_not_recorded": (lambda s: _start_checkpoint(s.parent.parent, ""), "../../run_config.json",
                                      "no start checkpoint is recorded"),
}


@pytest.mark.parametrize("kind", sorted(BAD_STEPS))
def test_a_corrupted_step_is_named(run_dir, tmp_path, kind):
  corrupt, named, what = BAD_STEPS[kind]
  step = copy_run(run_dir, tmp_path / "run")
  corrupt(step)
  for read in (checkpoint.inspect_checkpoint, checkpoint.load_model):
    with pytest.raises(checkpoint.CheckpointError, match=what) as info:
      read(step)
    assert os.path.normpath(step / named) in str(info.value) and "\n" not in str(info.value)


def test_a_step_of_another_architecture_than_its_source_is_named(run_dir, tmp_path):
  other = tmp_path / "other"
  make_tiny_llama31_hf(other, vocab_size=512)
  step = copy_run(run_dir, tmp_path / "run")
  _start_checkpoint(step.parent.parent, str(other))
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.inspect_checkpoint(step)
  assert str(info.value) == (f"{step / 'state'} (params): tensor embed: expected shape (512, 64), found (49152, 64) "
                             f"(the run's start checkpoint {other / 'config.json'})")


def test_an_unfinished_save_is_named(run_dir, tmp_path):
  step = copy_run(run_dir, tmp_path / "run", step="4.orbax-checkpoint-tmp")
  with pytest.raises(checkpoint.CheckpointError, match=r"unfinished checkpoint save; name a finished step, .*"
                                                       r"\(no finished step is present\)"):
    checkpoint.inspect_checkpoint(step)
