"""A method's options (``config.<method>``) as a frozen dataclass, checked in one place.

Each method declares its options once::

  @dataclasses.dataclass(frozen=True)
  class SiamSegOptions:
    variant: str = options.choice("siamseg", ("siamseg", "dacs", "source_only"))
    alpha: float = 0.999          # EMA teacher momentum
    slide_crop: tuple[int, ...] = (512, 512)

    def check(self, where):       # optional: rules between fields
      ...

and reads them with ``opts = options.parse(SiamSegOptions, config.siamseg,
"config.siamseg")``: a key the dataclass does not have, a value of the wrong type or not
among the choices is a :class:`~contrastjax.errors.ConfigError` naming the key, the value
and what was expected. :func:`defaults` gives the dataclass's defaults as a plain dict, so
that a config file can declare every option (configs are locked: only declared keys can
be overridden from the command line).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Sequence

from contrastjax.errors import ConfigError


def choice(default: Any, choices: Sequence[Any]) -> Any:
  """A field whose value must be one of ``choices``."""
  return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def _plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return value


def _convert(value: Any, hint: Any, where: str) -> Any:
  """``value`` as the annotated type ``hint`` (int, float, bool, str, tuple[...],
  dict, Optional/Union of those)."""
  value = _plain(value)
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(hint)
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _convert(value, a, where)
      except ConfigError as e:
        errors.append(str(e))
    if not errors:
      raise ConfigError(f"{where}={value!r}: unexpected None")
    # One message naming every accepted type ("expected a string or an integer"), unless
    # an error is about an element (config.x.y[0]), which then names it.
    head = f"{where}={value!r}: expected "
    if all(e.startswith(head) for e in errors):
      accepted = [e[len(head):] for e in errors]
      if type(None) in args:
        accepted.append("None")
      raise ConfigError(head + " or ".join(accepted))
    raise ConfigError(errors[0])
  if hint is Any:
    return value
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}={value!r}: expected a list or tuple")
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if args and len(args) != len(value):
      raise ConfigError(f"{where}={value!r}: expected {len(args)} values")
    return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in
                 enumerate(zip(value, args or [Any] * len(value))))
  if origin is dict or hint is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{where}={value!r}: expected a dict")
    return {k: _plain(v) for k, v in value.items()}
  if hint is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{where}={value!r}: expected True or False")
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, float) and value.is_integer():
        return int(value)
      raise ConfigError(f"{where}={value!r}: expected an integer")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where}={value!r}: expected a number")
    return float(value)
  if hint is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}={value!r}: expected a string")
    return value
  return value


def parse(cls: type, section: Any, where: str):
  """``cls`` (a dataclass of options) from the config section ``section`` (a ConfigDict,
  a dict or None: all defaults).

  Raises:
    ConfigError: an unknown key (naming the known ones), a value of the wrong type, a
      value outside its ``choices``, or a rule of ``cls.check`` broken.
  """
  section = dict(_plain(section) or {})
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(section) - set(fields))
  if unknown:
    raise ConfigError(f"unknown key(s) {where}.{unknown[0]} ({unknown}); known keys: "
                      f"{sorted(fields)}")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, f in fields.items():
    if name not in section:
      continue
    value = _convert(section[name], hints[name], f"{where}.{name}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
      raise ConfigError(f"{where}.{name}={value!r}; expected one of {choices}")
    kwargs[name] = value
  opts = cls(**kwargs)
  for name, f in fields.items():  # defaults must satisfy the choices too
    choices = f.metadata.get("choices")
    if choices is not None and getattr(opts, name) not in choices:
      raise ConfigError(f"{where}.{name}={getattr(opts, name)!r}; expected one of {choices}")
  if hasattr(opts, "check"):
    opts.check(where)
  return opts


def defaults(cls: type, **overrides) -> dict[str, Any]:
  """The options' defaults (with ``overrides``) as a dict for a config file. ``None``
  defaults are left out (a locked ConfigDict cannot change a None field's type)."""
  out = {}
  for f in dataclasses.fields(cls):
    if f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
      value = f.default_factory()  # type: ignore[misc]
    else:
      continue
    out[f.name] = value
  unknown = sorted(set(overrides) - set(out))
  if unknown:
    raise ConfigError(f"{cls.__name__} has no option(s) {unknown}")
  out.update(overrides)
  return {k: v for k, v in out.items() if v is not None}
