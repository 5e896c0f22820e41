"""Stage registry: every `stage` of `python -m astro_jax.main` is a module here with `KEYS` (its config keys, each
declared once: `astro_jax.config_keys`), `defaults()`, `check(config)` and `run(config)`."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import ml_collections

STAGES: dict[str, str] = {
    "convert": "astro_jax.stages.convert",
    "generate": "astro_jax.stages.generate",
    "eval": "astro_jax.stages.eval",
    "mcts": "astro_jax.stages.mcts",
    "sft": "astro_jax.stages.sft",
    "difficulty": "astro_jax.stages.difficulty",
    "rl": "astro_jax.stages.rl",
    "pipeline": "astro_jax.stages.pipeline",
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


def flat_defaults(name: str) -> list[tuple[str, Any]]:
  """(dotted key, default) for every key a stage declares (its KEYS), in declaration order (a stage's SUBCONFIGS,
  other stages' configs inside the pipeline's, are theirs: not listed)."""
  return [(key, k.default) for key, k in get(name).KEYS.items()]


def key_help(name: str) -> dict[str, str]:
  """What each config key of a stage means (from its KEYS)."""
  from astro_jax import config_keys
  return config_keys.helps(get(name).KEYS)


def config_tables_markdown() -> str:
  """One markdown table per stage: key, default, meaning (the README's, generated so that it cannot drift)."""
  out = []
  for name in STAGES:
    helps = key_help(name)
    out += [f"**{name}**", "", "| key | default | meaning |", "|---|---|---|"]
    for key, value in flat_defaults(name):
      shown = repr(value) if isinstance(value, str) else str(value).replace("|", "\\|")
      if key not in helps:
        raise KeyError(f"stage {name}: config key {key!r} has no help text")
      out.append(f"| `{key}` | `{shown}` | {helps[key]} |")
    for sub in getattr(get(name), "SUBCONFIGS", ()):
      out.append(f"| `{sub}.*` | the {sub} stage's defaults | every key of the `{sub}` stage (its table above), but "
                 f"those this stage sets |")
    out.append("")
  return "\n".join(out)
