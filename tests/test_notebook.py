"""launch/colab.ipynb executed headless on the CPU, top to bottom, so its code cannot go stale.

SOFTPATCH_NOTEBOOK_SMOKE=1 makes the notebook shrink every run (32 px, random-init resnet_tiny, two
methods, two noise ratios, one seed); the workdir and the demo-data cache are this test's own
folders, so nothing is reused from an earlier run. Skipped cleanly without nbclient/ipykernel."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_colab_notebook_runs_headless_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPATCH_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("SOFTPATCH_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SOFTPATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", REPO)
    nb = nbformat.read(os.path.join(REPO, "launch", "colab.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any failure
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert f"checkout: {REPO}" in text
    assert "patchcore" in text and "softpatch_plus" in text  # the results table was shown
    assert "random-init backbone" in text.lower()  # as the text says, the CPU run is marked
    assert os.path.isdir(tmp_path / "runs" / "noise_curve")
    figures = [
        o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert figures  # the report's figures were displayed
