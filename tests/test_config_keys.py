"""One declaration per config key (astro_jax/config_keys.py): every stage's defaults, help and value checks come from
its KEYS table, and a bad value gets the one-line error naming the key."""
from __future__ import annotations

import ml_collections
import pytest

from astro_jax import config_keys, stages
from astro_jax.config_keys import Key, above, all_of, at_least, changed, given, one_of, within
from astro_jax.errors import ConfigError


def leaves(node: ml_collections.ConfigDict, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
  out = []
  for key, value in node.items():
    if not prefix and key in skip:
      continue
    if isinstance(value, ml_collections.ConfigDict):
      out += leaves(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_every_key_of_a_stage_is_declared_once_with_help(name):
  module = stages.get(name)
  declared = list(module.KEYS)
  assert sorted(leaves(stages.defaults(name), skip=getattr(module, "SUBCONFIGS", ()))) == sorted(declared)
  assert all(isinstance(k, Key) and k.help.strip() for k in module.KEYS.values())
  # The table in the README lists the same keys (the README itself is compared in test_stages).
  table = stages.config_tables_markdown()
  assert all(f"| `{key}` |" in table for key in declared)


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_the_defaults_pass_their_own_checks_but_required_inputs(name):
  """A default fails its check only where the key is a required input (an empty path the user must give)."""
  failing = {key: k.check(k.default) for key, k in stages.get(name).KEYS.items()
             if k.check is not None and k.check(k.default) is not None}
  assert all(k.default == "" for k in (stages.get(name).KEYS[key] for key in failing)), failing
  assert all("required" in why or why.startswith("name ") for why in failing.values()), failing


def test_checks_say_what_a_value_must_be():
  assert at_least(1)(0) == "must be >= 1" and at_least(1)(1) is None
  assert at_least(0, "0: off")(-1) == "must be >= 0 (0: off)"
  assert above(0)(0) == "must be > 0" and above(0)(1e-9) is None
  assert within(0, 1, upper_open=True)(1) == "must be in [0, 1)" and within(0, 1)(1) is None
  assert one_of(("a", "b"))("c") == "must be one of ('a', 'b')" and one_of(("a",), blank_ok=True)("") is None
  assert all_of(given("x is required"), at_least(3))("") == "x is required"
  assert all_of(given("x is required"), one_of(("ab",)))("cd") == "must be one of ('ab',)"


def test_tables_build_nested_defaults_and_adapt_only_existing_keys():
  keys = {"a": Key(1, "a"), "g.b": Key("x", "b", one_of(("x", "y"))), "g.h.c": Key(2.0, "c")}
  config = config_keys.defaults(keys)
  assert config.to_dict() == {"a": 1, "g": {"b": "x", "h": {"c": 2.0}}}
  adapted = changed(keys, defaults={"g.b": "y"}, helps={"a": "A"}, drop=("g.h.c",))
  assert list(adapted) == ["a", "g.b"] and adapted["g.b"].default == "y" and adapted["a"].help == "A"
  assert keys["g.b"].default == "x"  # the shared table is not changed
  with pytest.raises(KeyError, match="no config key 'nope'"):
    changed(keys, defaults={"nope": 1})
  config.g.b = "z"
  with pytest.raises(ConfigError, match=r"^config key 'g\.b' = 'z': must be one of \('x', 'y'\)$"):
    config_keys.check_values(config, keys)


@pytest.mark.parametrize("stage,key,value,message", [
    ("rl", "group_size", 1, "config key 'group_size' = 1: must be >= 2 (advantages are relative to the group)"),
    ("rl", "loss.eps_low", 1.0, "config key 'loss.eps_low' = 1.0: must be in [0, 1)"),
    ("rl", "loss.tis_cap", 0.5, "config key 'loss.tis_cap' = 0.5: must be 0 (off) or a finite number >= 1"),
    ("rl", "reward.wrong", float("nan"), "config key 'reward.wrong' = nan: must be a finite number"),
    ("sft", "optimizer.b2", 1.0, "config key 'optimizer.b2' = 1.0: must be in [0, 1)"),
    ("sft", "mesh.data", 0, "config key 'mesh.data' = 0: must be >= 1, or -1 for all remaining devices"),
    ("eval", "verifier.timeout_s", 0.0, "config key 'verifier.timeout_s' = 0.0: must be > 0"),
    ("mcts", "self_eval.prompt", "x" * 100, "config key 'self_eval.prompt' = '" + "x" * 60 + "...': must contain "
     "{problem}"),
])
def test_a_bad_value_is_named_in_one_line(stage, key, value, message):
  config = stages.defaults(stage)
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError) as e:
    config_keys.check_values(config, {key: stages.get(stage).KEYS[key]})  # (the required inputs are left empty)
  assert str(e.value) == message
