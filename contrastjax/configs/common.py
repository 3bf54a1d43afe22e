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


#: The trainer's own switches (``contrastjax/train.py`` reads them with these defaults).
#: Every method's config defines them, so each can be set on the command line
#: (``--config.progress_bar=false`` in a Slurm log); none changes what is computed.
TRAINER_DEFAULTS = dict(
    progress_bar=True,         # tqdm bar over the steps
    tensorboard=True,          # TensorBoard events beside metrics.jsonl
    plot_curves=True,          # curves.png at the end of the run
    eval_samples=4,            # prediction pictures per evaluation
    keep_checkpoints=3,        # rolling checkpoints kept (the best is kept apart)
    async_checkpointing=True,  # save in the background while training goes on
    compile_ahead=True,        # compile the train/eval steps while the state initialises
    xnn_fusion=True,           # CPU only: XNNPACK graph fusion (see platform.py)
)


#: How ``config.data`` is read (``contrastjax.data.prepared``): every method's data
#: section defines them, so that ``--config.data.format=tfds`` works on the command line.
DATA_DEFAULTS = dict(
    format="folder",   # 'folder': the dataset's own layout; 'tfds': a prepared copy
    tfds_dir="",       # format='tfds': the --out of python -m contrastjax.data.prepare
    tfds_name="",      # its --dataset, when not config.data.name
)


def trainer_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds each of :data:`TRAINER_DEFAULTS` (and :data:`DATA_DEFAULTS` to ``c.data``) that
  ``c`` does not set; returns ``c``."""
  for key, value in TRAINER_DEFAULTS.items():
    if key not in c:
      c[key] = value
  if "data" in c:
    for key, value in DATA_DEFAULTS.items():
      if key not in c.data:
        c.data[key] = value
  return c
