"""Config helpers: ``:arg`` strings such as ``demo,stage1,root=/data/Kvasir-SEG``."""
from __future__ import annotations

import ml_collections

from contrastjax.errors import ConfigError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a,b=1,c=x"`` against typed ``defaults`` (bare names mean True).

  Unknown names are rejected with the list of accepted ones, so a typo in a variant
  never silently runs the default recipe.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} (in {arg!r}) is not known; accepted: "
                       f"{sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"config argument {key!r} needs a value: {key}=...")
      out[key] = True
      continue
    value = value.strip()
    if isinstance(default, bool):
      if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"config argument {key}={value!r}: expected true/false")
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, (int, float)):
      kind = type(default)
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(f"config argument {key}={value!r}: expected "
                          f"{'an integer' if kind is int else 'a number'}") from None
    else:
      out[key] = value
  return out
