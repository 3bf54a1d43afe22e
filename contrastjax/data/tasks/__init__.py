"""Dataset makers: ``config.data`` -> :class:`~contrastjax.data.builder.DataSpec`, registered by
name in :mod:`contrastjax.data.builder`. ``binary_seg`` (binary segmentation, ConDSeg), ``uda``
(source/target domain adaptation, SiamSeg), ``clip`` (image/text or paired-vector contrastive
training)."""
