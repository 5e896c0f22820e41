"""Entry point: `python -m astro_jax.main --config=configs/<name>.py [--config.key=value ...]`.

The config names its `stage`; stages are registered in `astro_jax.stages`. Unknown keys and wrong types fail
before any work, naming the key and the valid ones.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.py"

_CONFIG = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Config file (a stage's settings).",
                                          lock_config=True)


class ConfigError(ValueError):
  pass


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py` or `path.py:arg` -> the ConfigDict its `get_config([arg])` returns."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_astro_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _child_keys(node) -> str:
  return ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "(a leaf value)"


def check_key(config: ml_collections.ConfigDict, dotted: str) -> None:
  node, walked = config, []
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(walked) or "the config"
      raise ConfigError(f"unknown config key {dotted!r} (stage {config.get('stage')!r}); "
                        f"valid keys of {where}: {_child_keys(node)}")
    node = node[part]
    walked.append(part)


def override_keys(argv: list[str]) -> list[str]:
  keys = []
  for arg in argv:
    if arg.startswith("--config.") or arg.startswith("-config."):
      keys.append(arg.split("config.", 1)[1].split("=", 1)[0])
  return keys


def config_spec(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return str(DEFAULT_CONFIG)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Check `config` against its stage's defaults: every key known, every value of the default's type."""
  from astro_jax import stages
  stage = config.get("stage")
  if stage is None:
    raise ConfigError("the config has no 'stage' key")
  try:
    reference = stages.defaults(stage)
  except KeyError as e:
    raise ConfigError(str(e.args[0])) from None

  def walk(cfg, ref, prefix):
    for key, value in cfg.items():
      name = prefix + key
      if key not in ref:
        raise ConfigError(f"unknown config key {name!r} (stage {stage!r}); valid keys"
                          f"{' of ' + prefix[:-1] if prefix else ''}: {_child_keys(ref)}")
      if isinstance(ref[key], ml_collections.ConfigDict):
        if not isinstance(value, ml_collections.ConfigDict):
          raise ConfigError(f"config key {name!r} must be a group with keys {_child_keys(ref[key])}")
        walk(value, ref[key], name + ".")
      elif ref[key] is not None and value is not None and not _same_type(ref[key], value):
        raise ConfigError(f"config key {name!r}: expected {type(ref[key]).__name__}, got "
                          f"{type(value).__name__} ({value!r})")
  walk(config, reference, "")
  return config


def _same_type(ref, value) -> bool:
  if isinstance(ref, bool) or isinstance(value, bool):
    return isinstance(ref, bool) and isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float))
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(ref))


def main(argv: list[str]) -> None:
  del argv
  config = validate(_CONFIG.value)
  from astro_jax import stages
  logging.info("stage %s\n%s", config.stage, config)
  stages.get(config.stage).run(config)


def run() -> None:
  # Fail on unknown override keys before absl parses them (its own error for those is an opaque traceback).
  try:
    base = load_config_file(config_spec(sys.argv[1:]))
    for key in override_keys(sys.argv[1:]):
      check_key(base, key)
    validate(base)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)


if __name__ == "__main__":
  run()
