"""contrastjax: contrastive segmentation and multimodal learning methods in JAX/Flax.

One jit-compiled, sharded training spine (``contrastjax.train``) shared by ConDSeg,
SiamSeg and the CLIP modality-gap study (APC in progress), plus the gradient-flow
simulations of the modality gap (``contrastjax.gap``).
"""

__version__ = "0.1.0"
