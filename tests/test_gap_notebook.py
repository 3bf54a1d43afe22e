"""Executes notebooks/gradient_flow.ipynb with small sizes (CONTRASTJAX_NOTEBOOK_SMALL=1)."""
from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "notebooks")


def test_gradient_flow_notebook_executes(monkeypatch, tmp_path):
  monkeypatch.setenv("CONTRASTJAX_NOTEBOOK_SMALL", "1")
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, "gradient_flow.ipynb"), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
  assert "small run" in text and "S3        gap=" in text
  assert "fig2 final gap" in text and "d= 16: sampled" in text
