"""Input data: from files (or a generator) on the host to batches of numpy arrays.

Layers, from the bottom up (each imports only the ones above it in this list)::

  errors.py       DatasetError, the one exception for bad input data
  sources/        random-access readers of datasets in their official layouts (medseg, loveda,
                  isprs, coco, cifar, voc): ``len(src)``, ``src[i]`` -> dict of numpy arrays
                  (+ strings such as ``'name'``)
  synthetic/      procedural sources with the same contracts (polyps, aerial, pairs, scenes)
  text/           tokenizers (word, CLIP BPE) for caption sources
  transforms/     host-side per-example grain transforms (numpy): ``medseg`` (ConDSeg's
                  albumentations-style pipeline), ``mmseg`` (the mmseg pipeline SiamSeg uses);
                  CLIP's image/caption transforms live with their reader in ``sources/coco.py``
  pipeline.py     the grain pipelines shared by every dataset: sharded, shuffled, batched,
                  checkpointable training stream; exact, padded evaluation batches
  builder.py      ``config.data`` -> a maker -> :class:`~contrastjax.data.builder.DataSpec`
                  (sources per split + train/eval transforms) -> ``Inputs`` (the pipelines);
                  the registry of makers by ``config.data.name``
  tasks/          the makers: ``binary_seg`` (ConDSeg: medseg, synthetic_polyps), ``uda``
                  (SiamSeg: loveda, isprs, synthetic_aerial), ``clip`` (synthetic_pairs,
                  coco_captions)
  validation.py   reads every on-disk file once at start-up (``config.data.validate``)
  tools/          command-line tools, e.g. ``python -m contrastjax.data.tools.isprs_tiles``

How a training batch flows::

  source[i]                      (sources/ or synthetic/: one example dict)
    -> host transforms           (transforms/: decode, augment, resize, normalise; numpy,
                                  in grain threads or worker processes)
    -> grain pipeline            (pipeline.py: index, shuffle, repeat, keep numeric arrays,
                                  batch, shard per process, prefetch)
    -> parallel.host_to_global   (the trainer: one global array per leaf, sharded over 'data')
    -> device-side augmentation  (inside the method's jitted loss, e.g.
                                  :mod:`contrastjax.augment.photometric` for ConDSeg)

A batch is a dict of numpy arrays with a leading batch axis, nested where a method reads
several streams: the ``uda`` makers deliver ``{'source': {'image', 'label', 'index'},
'target': {'image'[, 'label'], 'index'}, 'index'}``; evaluation batches add ``'valid'``.
"""
