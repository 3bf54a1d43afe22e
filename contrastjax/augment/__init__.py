"""Device-side (jit-able JAX) augmentations, applied by a method inside its jitted loss, not by
the host data pipeline: ``photometric`` (ConDSeg's stage-1 strong view; its ops also serve
SiamSeg's), ``views`` (SiamSeg: DACS's strong transform of the mixed images and the two SimSiam
views of each target image)."""
