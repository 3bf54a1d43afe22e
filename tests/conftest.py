"""Test set-up: 8 simulated CPU devices, parsed absl flags, fast XLA:CPU flags."""
import os
import sys

from contrastjax import platform

platform.configure_cpu()

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402
import pytest  # noqa: E402

# grain's multiprocessing reads absl flags; pytest never parses them.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

# Subprocess tests import tests/_toy.py by module path.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
  sys.path.insert(0, TESTS_DIR)


def pytest_collection_modifyitems(config, items):
  """``@pytest.mark.heavy`` tests (several full compilations of a large train step, or
  training runs of many minutes) run only with ``CONTRASTJAX_HEAVY_TESTS=1``: they do
  not fit CI's 2-core budget. ``slow`` tests do run in CI, first: with
  ``pytest -n 2 --dist worksteal`` the minutes-long ones then start early and the quick
  ones fill the gaps, instead of one long test running alone at the end."""
  del config
  items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)  # stable
  if os.environ.get("CONTRASTJAX_HEAVY_TESTS", "") == "1":
    return
  skip = pytest.mark.skip(reason="heavy test: set CONTRASTJAX_HEAVY_TESTS=1 to run it")
  for item in items:
    if "heavy" in item.keywords:
      item.add_marker(skip)



@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module: a worker runs many modules,
  and their executables (hundreds of MB for the train steps) would otherwise stay in
  memory beside the subprocess runs of later tests."""
  yield
  jax.clear_caches()
