"""contrastjax: contrastive segmentation and multimodal learning methods in JAX/Flax.

One jit-compiled, sharded training spine (``contrastjax.train``) shared by ConDSeg,
SiamSeg, APC and the CLIP modality-gap study.
"""

__version__ = "0.1.0"
