"""One declaration per config key: its default, what it means and the check of its value, written once.

A stage lists its keys as a table `{dotted key: Key(default, help, check)}`; its defaults (a ConfigDict), its help
text (the README's generated tables) and its per-value checks all derive from that table:

  KEYS = {**common.base_keys("eval"), "samples": Key(1, "k responses per problem", at_least(1)), ...}
  defaults(KEYS) -> ConfigDict;  helps(KEYS) -> {key: help};  check_values(config, KEYS) -> ConfigError or None

A check is a function of the value alone that returns what is wrong with it (the end of the error line: "must be
>= 1") or None. Checks that relate several keys (minibatches divides batch_prompts x group_size) stay in the stage's
`check`, after these. Shared groups (mesh, sampling, the optimizer, ...) are tables too, merged into a stage's with
`group(prefix, keys)` and adapted with `changed(keys, defaults=..., helps=...)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from astro_jax.errors import require

Check = Callable[[Any], "str | None"]  # what is wrong with a value, or None


@dataclasses.dataclass(frozen=True)
class Key:
  default: Any
  help: str
  check: Check | None = None


Keys = dict[str, Key]


# --- checks -------------------------------------------------------------------------------------------------------

def satisfies(ok: Callable[[Any], bool], why: str) -> Check:
  return lambda value: None if ok(value) else why


def at_least(n: float, note: str = "") -> Check:
  return satisfies(lambda v: v >= n, f"must be >= {n}" + (f" ({note})" if note else ""))


def above(n: float, note: str = "") -> Check:
  return satisfies(lambda v: v > n, f"must be > {n}" + (f" ({note})" if note else ""))


def within(lo: float, hi: float, *, upper_open: bool = False, note: str = "") -> Check:
  """lo <= value <= hi (value < hi with upper_open)."""
  ok = (lambda v: lo <= v < hi) if upper_open else (lambda v: lo <= v <= hi)
  return satisfies(ok, f"must be in [{lo}, {hi}{')' if upper_open else ']'}" + (f" ({note})" if note else ""))


def one_of(options: Iterable[Any], *, blank_ok: bool = False) -> Check:
  """One of `options` (or "" with blank_ok: the key's "use the default" value)."""
  options = tuple(options)
  if blank_ok:
    return satisfies(lambda v: v in ("",) + options, f"must be \"\" or one of {options}")
  return satisfies(lambda v: v in options, f"must be one of {options}")


def finite(check: Check | None = None) -> Check:
  """A finite number (then `check`)."""
  def problem(value):
    if not math.isfinite(value):
      return "must be a finite number"
    return check(value) if check else None
  return problem


def given(why: str) -> Check:
  """Not empty (a required path or name); `why` says what is required."""
  return satisfies(bool, why)


def all_of(*checks: Check) -> Check:
  """Every check, in order: the first problem found."""
  return lambda value: next((p for p in (c(value) for c in checks) if p), None)


# --- tables -------------------------------------------------------------------------------------------------------

def group(prefix: str, keys: Keys) -> Keys:
  """A shared group's table under `prefix` (e.g. the optimizer's keys as optimizer.*)."""
  return {f"{prefix}.{name}": key for name, key in keys.items()}


def changed(keys: Keys, *, defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None,
            checks: Mapping[str, Check] | None = None, drop: Iterable[str] = ()) -> Keys:
  """A copy of `keys` with some defaults, help texts or checks replaced and the keys in `drop` removed (every name
  must exist: a stage cannot adapt a key it does not have)."""
  out = dict(keys)
  for name in drop:
    del out[name]
  for field, values in (("default", defaults), ("help", helps), ("check", checks)):
    for name, value in (values or {}).items():
      if name not in out:
        raise KeyError(f"no config key {name!r} to change")
      out[name] = dataclasses.replace(out[name], **{field: value})
  return out


def defaults(keys: Keys) -> ml_collections.ConfigDict:
  """The table's defaults as a (nested) ConfigDict, in table order."""
  config = ml_collections.ConfigDict()
  for name, key in keys.items():
    *parents, leaf = name.split(".")
    node = config
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = key.default
  return config


def helps(keys: Keys) -> dict[str, str]:
  return {name: key.help for name, key in keys.items()}


def value(config: ml_collections.ConfigDict, name: str) -> Any:
  node = config
  for part in name.split("."):
    node = node[part]
  return node


def check_values(config: ml_collections.ConfigDict, keys: Keys) -> None:
  """Each key's own check, in table order: a ConfigError naming the first bad key, its value and what it must be."""
  for name, key in keys.items():
    if key.check is not None:
      v = value(config, name)
      problem = key.check(v)
      shown = v[:60] + "..." if isinstance(v, str) and len(v) > 63 else v  # one line, even for a prompt template
      require(problem is None, name, shown, problem or "")
