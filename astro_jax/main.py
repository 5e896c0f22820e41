"""Entry point: `python -m astro_jax.main --config=configs/<name>.py [--config.key=value ...] [--verbose]`.

The config names its `stage`; stages are registered in `astro_jax.stages`. Unknown keys and wrong types fail
before any work, naming the key and the valid ones. User errors (bad config, input or checkpoint) print one line
and exit with status 2; internal errors keep their traceback. Quiet by default: `--verbose` logs the config and
INFO messages.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from astro_jax.errors import EXIT_USER_ERROR, ConfigError, UserError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "demo.py"  # the README's main command: the ASTRO pipeline on CPU

_CONFIG = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Config file (a stage's settings).",
                                          lock_config=True)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Log the config and INFO messages (default: warnings only).")


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


def _renamed_hint(stage: str | None, key: str) -> str:
  """" (use 'samples')" when a stage spells this key differently (stage module's RENAMED table)."""
  from astro_jax import stages
  try:
    renamed = getattr(stages.get(stage), "RENAMED", {})
  except KeyError:
    return ""
  return f" (this stage calls it {renamed[key]!r})" if key in renamed else ""


def check_key(config: ml_collections.ConfigDict, dotted: str) -> None:
  node, walked = config, []
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(walked) or "the config"
      raise ConfigError(f"unknown config key {dotted!r}{_renamed_hint(config.get('stage'), dotted)} (stage "
                        f"{config.get('stage')!r}); valid keys of {where}: {_child_keys(node)}")
    node = node[part]
    walked.append(part)


def override_keys(argv: list[str]) -> list[str]:
  keys = []
  for arg in argv:
    if arg.startswith("--config.") or arg.startswith("-config."):
      keys.append(arg.split("config.", 1)[1].split("=", 1)[0])
  return keys


def override_values(argv: list[str]) -> list[tuple[str, str]]:
  """(key, raw value) of each `--config.key=value` override."""
  return [tuple(arg.split("config.", 1)[1].split("=", 1)) for arg in argv
          if arg.startswith(("--config.", "-config.")) and "=" in arg]


def check_value(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
  """An override's text must parse as the type of the key's default (what absl would fail on with a traceback)."""
  default = config
  for part in dotted.split("."):
    default = default[part]
  parse = {bool: lambda v: {"true": True, "false": False, "1": True, "0": False}[v.lower()], int: int,
           float: float}.get(type(default))
  if parse is not None:
    try:
      parse(raw)
    except (KeyError, ValueError):
      raise ConfigError(f"config key {dotted!r} = {raw!r}: expected {type(default).__name__}") from None


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
        raise ConfigError(f"unknown config key {name!r}{_renamed_hint(stage, name)} (stage {stage!r}); valid keys"
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
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO if _VERBOSE.value else absl_logging.WARNING)
  from astro_jax import stages
  try:
    config = validate(_CONFIG.value)
    logging.info("stage %s\n%s", config.stage, config)
    stages.get(config.stage).run(config)
  except UserError as e:
    fail(e)


def fail(error: Exception) -> None:
  """A user error: its message as one line on stderr, exit status 2."""
  print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def run() -> None:
  # Fail on unknown override keys before absl parses them (its own error for those is an opaque traceback).
  try:
    base = load_config_file(config_spec(sys.argv[1:]))
    for key in override_keys(sys.argv[1:]):
      check_key(base, key)
    for key, raw in override_values(sys.argv[1:]):
      check_value(base, key, raw)
    validate(base)
  except UserError as e:
    fail(e)
  app.run(main)


if __name__ == "__main__":
  run()
