"""Procedural datasets with the contracts of the real sources (no download): polyp-like frames
(``polyps``, binary), two-domain aerial scenes (``aerial``, UDA), paired vectors (``pairs``,
CLIP) and labelled scenes (``scenes``, VOC-like)."""
