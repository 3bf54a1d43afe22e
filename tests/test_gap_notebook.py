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
  """Runs where Colab runs it: in a fresh folder with only the installed package (not
  from the repository's notebooks/ folder)."""
  monkeypatch.setenv("CONTRASTJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.setenv("TMPDIR", str(tmp_path))   # the kernel's mkdtemp output, not in /tmp
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, "gradient_flow.ipynb"), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
  assert "small run" in text and "S3        gap=" in text
  assert "fig2 final gap" in text and "d= 16: sampled" in text


def test_repository_url_is_the_same_in_notebook_readme_and_pyproject():
  import re  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(NOTEBOOK_DIR)
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    url = tomllib.load(f)["project"]["urls"]["Repository"]
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, "gradient_flow.ipynb"), as_version=4)
  code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert re.search(r'REPOSITORY = "([^"]+)"', code).group(1) == url
  readme = open(os.path.join(root, "README.md")).read()
  slug = url.split("github.com/", 1)[1]
  assert (f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/"
          "gradient_flow.ipynb") in readme

