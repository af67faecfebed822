"""The example notebook runs headlessly, top to bottom, in a fresh kernel."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    os.environ["RLLOOP_EXAMPLE_OUT"] = str(tmp_path)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    texts = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(t.startswith("reward ") for t in texts), texts
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the plot cell must render a figure"
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 20
