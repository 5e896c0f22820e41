"""User errors: bad config, bad input, bad checkpoint. The entry points print their message as one line and exit
with status 2; anything else is an internal error and keeps its traceback."""
from __future__ import annotations

from typing import Any


class UserError(ValueError):
  """Something the user gave is wrong; the message names what and where (file, line, key, tensor)."""


class ConfigError(UserError):
  """An unknown config key, a wrong type or a bad value."""


EXIT_USER_ERROR = 2


def require(ok: bool, key: str, value: Any, why: str) -> None:
  """A ConfigError naming the key, its value and what it must be, unless `ok`."""
  if not ok:
    raise ConfigError(f"config key {key!r} = {value!r}: {why}")
