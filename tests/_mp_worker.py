"""One process of the 2-process jax.distributed spine test (see test_multiprocess.py).

usage: python _mp_worker.py WORKDIR NUM_LOCAL_DEVICES [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""
import sys

import jax

from contrastjax import platform

platform.configure_cpu()
jax.config.update("jax_num_cpu_devices", int(sys.argv[2]))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import _toy  # noqa: E402
from contrastjax import parallel  # noqa: E402
from contrastjax import train as train_lib  # noqa: E402

if len(sys.argv) > 3:
  parallel.maybe_initialize_distributed(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
cfg = _toy.toy_config(total_steps=6, eval_every_steps=3, ckpt_every_steps=3,
                      log_every_steps=3)
result = train_lib.train_and_evaluate(cfg, sys.argv[1])
print("RESULT", jax.process_index(), result["val/mIoU"], result["val/num_images"])
