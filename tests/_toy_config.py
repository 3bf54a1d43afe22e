"""Config file for subprocess spine tests.

python -m contrastjax.train --config=tests/_toy_config.py --workdir=workdirs/toy
"""
import _toy


def _parse(value: str, like):
  if isinstance(like, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected true/false, got {value!r}")
    return value.lower() in ("true", "1")
  return type(like)(value)


def get_config(arg=None):
  c = _toy.toy_config()
  if arg:
    for kv in arg.split(","):
      k, v = kv.split("=")
      c[k] = _parse(v, c[k])
  return c
