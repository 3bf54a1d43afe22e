"""Exceptions for input a user can fix (see :mod:`contrastjax.cli` for the exit statuses).

* :class:`ConfigError`: a config value that cannot be used;
* :class:`DivergenceError`: training produced NaN/Inf (the last good checkpoint is kept);
* ``contrastjax.data.errors.DatasetError``: a data file, split or value;
* ``contrastjax.workdir.WorkdirError``: a workdir in use, missing or not writable;
* ``contrastjax.checkpoint.CheckpointSaveError``: a checkpoint that could not be written.
"""
from __future__ import annotations


class DivergenceError(RuntimeError):
  """The loss, the gradient or the updated parameters became NaN or Inf."""


class ConfigError(ValueError):
  """A config value that cannot be used; the message names the key (``config.x.y``) and
  what was expected. A ``ValueError``, so ``except ValueError`` keeps catching it."""
