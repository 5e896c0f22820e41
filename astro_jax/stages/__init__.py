"""Stage registry: every `stage` of `python -m astro_jax.main` is a module here with `defaults()` and `run(config)`."""
from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "convert": "astro_jax.stages.convert",
    "generate": "astro_jax.stages.generate",
    "eval": "astro_jax.stages.eval",
}


def get(name: str) -> ModuleType:
  if name not in STAGES:
    raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
  return importlib.import_module(STAGES[name])


def defaults(name: str):
  """The complete, locked default config of a stage: config files start from it and may only change keys."""
  config = get(name).defaults()
  config.lock()
  return config
