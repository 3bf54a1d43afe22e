"""The one exception type raised for bad input data.

Every reader in :mod:`contrastjax.data` raises :class:`DatasetError` when a file, a split, a key or
a value is not what it should be. The message always names the offending file (or key or value)
and says what was expected, so the user can act on it without reading the code.
"""

from __future__ import annotations

import os


class DatasetError(ValueError):
  """A dataset file, split or value is missing, unreadable or malformed.

  Attributes:
    path: The offending file or folder, when there is one.
    kind: A short machine-readable category (e.g. ``'missing_file'``, ``'unreadable'``,
      ``'size_mismatch'``, ``'bad_mask'``), used by ``validate`` to count problems per kind.
  """

  def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
               kind: str = 'invalid'):
    """Creates the error.

    Args:
      message: Human-readable message; it should already name the file/key/value and the
        expectation. If ``path`` is given and not part of ``message``, it is prepended.
      path: The offending file or folder.
      kind: Category of the problem.
    """
    self.path = None if path is None else os.fspath(path)
    self.kind = kind
    if self.path is not None and self.path not in message:
      message = f'{self.path}: {message}'
    super().__init__(message)
