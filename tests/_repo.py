"""The repository root, and modules loaded from files outside the package (benchmarks/)."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_module(relative_path: str):
  """Imports ``REPO/relative_path`` as a fresh module (e.g. ``benchmarks/apc_torch.py``)."""
  name = os.path.splitext(os.path.basename(relative_path))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
