"""Test set-up: 8 simulated CPU devices, parsed absl flags, fast XLA:CPU flags."""
import os
import sys

from contrastjax import platform

platform.configure_cpu()

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

# grain's multiprocessing reads absl flags; pytest never parses them.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

# Subprocess tests import tests/_toy.py by module path.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
  sys.path.insert(0, TESTS_DIR)
