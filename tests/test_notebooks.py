"""The quickstart notebook runs top to bottom on a CPU (executed with nbclient; the stored notebook has no outputs)."""

import os
import pathlib

import pytest

import rpc_py

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")
pytest.importorskip("tqdm")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The kernel must run the rpc_py under test (the installed wheel in CI), not some other copy.
    nb.cells.append(nbformat.v4.new_code_cell("import rpc_py as _r, os as _o\nprint('RPC_PY_AT', _o.path.realpath(_r._C.__file__))"))
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"RPC_PY_AT {os.path.realpath(rpc_py._C.__file__)}" in text
    assert "RPC cache summary" in text
    assert "identical up to the first compression: True" in text
    assert "LengthHistory(2 layers, 399 steps, 12 compressions)" in text  # 6 per layer over 399 steps
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot cell produced no figure"
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("RPCCache, 2 layers" in h for h in html), "the cache did not render as a table"
    assert any("RPC cache statistics" in h and "budget 48" in h for h in html), "the stats did not render"
    # The progress bar: a widget where ipywidgets is installed, else text in the cell's stderr.
    widget = any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert widget or "400/400" in text, "no progress bar"
