r"""Prepares a dataset once into TFDS ArrayRecord shards, for reading on any number of hosts.

  python -m contrastjax.data.prepare --config=configs/condseg_kvasir.py \
      --source=/data/Kvasir-SEG --out=/data/prepared

writes ``/data/prepared/medseg/1.0.0/`` (``--dataset`` names it otherwise): every split the
config's dataset maker reads from its folder, as the folder readers yield them
(``contrastjax.data.prepared``). Train from it with

  python -m contrastjax.train --config=configs/condseg_kvasir.py --workdir=... \
      --config.data.format=tfds --config.data.tfds_dir=/data/prepared

The config's ``data`` section decides the examples (``--config.data.KEY=VALUE`` overrides
work as in training); ``--source`` is shorthand for ``--config.data.root``. A dataset
already prepared at the path is kept (``--overwrite`` rewrites it). Every bad source file is
named, and nothing of a split with one is written. No TensorFlow is needed.

Exit statuses as the trainer's (``contrastjax.cli``): 2 config, 4 data.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags

from contrastjax import cli
from contrastjax.data import builder
from contrastjax.data import prepared


def prepare_from_config(config, out: str, name: str = "", *, overwrite: bool = False,
                        progress: bool = True) -> prepared.Summary:
  """Prepares ``config.data``'s dataset (read from its folders) into ``out``."""
  dcfg = config.data
  with dcfg.ignore_type():
    dcfg.format = "folder"   # the source of a preparation is always the folder reader
  spec = builder.make_spec(config)
  sources = spec.sources if spec.prepare_sources is None else spec.prepare_sources
  return prepared.prepare(name or str(dcfg.name), sources, out, info=spec.info,
                          content=spec.content, data_config=dcfg.to_dict(),
                          overwrite=overwrite, progress=progress)


def config_from_flags(argv):
  """``--config`` of a data tool (``prepare``, ``benchmark``), ``--source`` applied as
  ``config.data.root``; usage errors for extra arguments or a missing ``--config``."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/condseg_kvasir.py")
  config = f.config
  if f.source:
    with config.data.ignore_type():
      config.data.root = f.source
  return config


def main(argv):
  config = config_from_flags(argv)
  f = flags.FLAGS
  if not f.out:
    raise app.UsageError("--out is required: the folder (or bucket path) to write to")
  summary = prepare_from_config(config, f.out, f.dataset, overwrite=f.overwrite,
                                progress=f.progress)
  print("\n".join(summary.lines()))
  print(f"train from it with --config.data.format=tfds --config.data.tfds_dir={f.out}"
        + (f" --config.data.tfds_name={f.dataset}" if f.dataset else ""), file=sys.stderr)


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Config file whose data section names the dataset, e.g. "
      "configs/condseg_kvasir.py.", lock_config=False)
  flags.DEFINE_string("out", None, "Folder to write the prepared dataset into "
                      "(<out>/<dataset>/1.0.0).")
  flags.DEFINE_string("source", None, "The dataset folder (sets config.data.root).")
  flags.DEFINE_string("dataset", "", "Name of the prepared dataset (default: "
                      "config.data.name); readers then need config.data.tfds_name.")
  flags.DEFINE_bool("overwrite", False, "Rewrite a dataset already prepared at the path.")
  flags.DEFINE_bool("progress", True, "Show a progress bar per split.")
  cli.run(main)
