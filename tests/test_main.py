"""The entry point: config files, overrides, the stage registry and its errors."""
from __future__ import annotations

import subprocess
import sys

import ml_collections
import pytest

from astro_jax import main, stages
from tests.conftest import REPO


def run_main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "astro_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_every_stage_has_locked_defaults_that_validate(name):
  config = stages.defaults(name)
  assert config.stage == name
  main.validate(config)
  with pytest.raises(AttributeError, match="Other fields present|cannot be added"):
    config.not_a_key = 1


@pytest.mark.parametrize("path", ["configs/demo.py", "configs/generate.py", "configs/convert.py",
                                  "configs/eval.py", "configs/mcts.py", "configs/mcts_smollm2.py",
                                  "configs/mcts_8b.py", "configs/sft_tiny.py", "configs/sft_smollm2.py",
                                  "configs/sft_8b.py", "configs/sft_70b.py", "configs/sft_8b.py:h100",
                                  "configs/sft_70b.py:h100", "configs/difficulty_smollm2.py", "configs/rl_tiny.py",
                                  "configs/rl_smollm2.py", "configs/rl_8b.py", "configs/rl_70b.py",
                                  "configs/rl_8b.py:h100", "configs/rl_70b.py:h100"])
def test_shipped_configs_load_and_validate(path):
  config = main.load_config_file(f"{REPO}/{path}")
  main.validate(config)


def test_unknown_override_key_names_key_and_valid_ones():
  proc = run_main("--config=configs/generate.py", "--config.sampling.temprature=0.5")
  assert proc.returncode != 0
  assert "sampling.temprature" in proc.stderr
  assert "temperature" in proc.stderr and "top_p" in proc.stderr


def test_unknown_top_level_key():
  proc = run_main("--config=configs/generate.py", "--config.chekpoint=x")
  assert proc.returncode != 0 and "'chekpoint'" in proc.stderr and "checkpoint" in proc.stderr


def test_wrong_type_names_key():
  proc = run_main("--config=configs/generate.py", "--config.sampling.n=three")
  assert proc.returncode != 0 and "sampling.n" in proc.stderr


def test_unknown_stage_and_wrong_types_in_config_files():
  bad = ml_collections.ConfigDict({"stage": "nope"})
  with pytest.raises(main.ConfigError, match="unknown stage 'nope'"):
    main.validate(bad)
  config = stages.defaults("generate").to_dict()
  config["sampling"]["temperature"] = "hot"
  with pytest.raises(main.ConfigError, match="sampling.temperature"):
    main.validate(ml_collections.ConfigDict(config))
  config = stages.defaults("generate").to_dict()
  config["extra"] = 1
  with pytest.raises(main.ConfigError, match="unknown config key 'extra'"):
    main.validate(ml_collections.ConfigDict(config))


def test_missing_config_file():
  proc = run_main("--config=configs/does_not_exist.py")
  assert proc.returncode != 0 and "does_not_exist.py" in proc.stderr
