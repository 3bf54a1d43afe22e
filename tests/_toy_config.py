"""Config file for subprocess spine tests.

python -m contrastjax.train --config=tests/_toy_config.py --workdir=workdirs/toy
"""
import _toy


def get_config(arg=None):
  c = _toy.toy_config()
  if arg:
    for kv in arg.split(","):
      k, v = kv.split("=")
      c[k] = type(c[k])(v)
  return c
