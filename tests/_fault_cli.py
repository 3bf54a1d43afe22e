"""``python -m contrastjax.train`` with a fault point, for the subprocess fault tests.

``CONTRASTJAX_TEST_PAUSE_COMMIT=checkpoints/4``: the asynchronous save of that checkpoint
writes all its files into orbax's temporary folder and then stops just before the commit
(the rename to its final name), after writing the temporary folder's path to
``CONTRASTJAX_TEST_PAUSE_MARKER``. A test that sees the marker kills the process with
SIGKILL: a kill during an asynchronous save, every time rather than by luck of timing.
Training goes on meanwhile until the next save waits for this one.
"""
import asyncio
import os
import runpy
import sys

from orbax.checkpoint._src.path import atomicity

_TARGET = os.environ["CONTRASTJAX_TEST_PAUSE_COMMIT"].strip("/").split("/")
_MARKER = os.environ["CONTRASTJAX_TEST_PAUSE_MARKER"]
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _paused_finalize(self):
  final = str(self.get_final()).rstrip("/").split("/")
  if final[-len(_TARGET):] == _TARGET:
    with open(_MARKER + ".tmp", "w") as f:
      f.write(str(self.get()))
    os.replace(_MARKER + ".tmp", _MARKER)
    await asyncio.sleep(3600)  # until the test's SIGKILL
  return await _finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = _paused_finalize
sys.argv[0] = "contrastjax.train"
runpy.run_module("contrastjax.train", run_name="__main__", alter_sys=True)
