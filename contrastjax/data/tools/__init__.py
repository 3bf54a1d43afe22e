"""Command-line dataset preparation tools, run as ``python -m contrastjax.data.tools.<name>``."""
