"""Host-side (numpy) per-example transforms, as grain ``Map``/``RandomMap`` classes:
``medseg`` (ConDSeg's albumentations-style geometric pipeline) and ``mmseg`` (the mmseg 0.21
train pipeline SiamSeg uses). On-device augmentations are in :mod:`contrastjax.augment`."""
