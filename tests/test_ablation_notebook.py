"""notebooks/ablation.ipynb in quick mode (RPC_PY_QUICK=1), and the fidelity measures it is built on
(benchmarks/fidelity.py) against independent expectations."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rpc_py.api import RPCConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "ablation.ipynb"


def _fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fidelity", module)
    spec.loader.exec_module(module)
    return module


F = _fidelity()
SETUP = F.ModelSetup(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256,
                     batch=2, prompt=10, new_tokens=48)
RPC = RPCConfig(interval=8, window=4, ratio=2)


@pytest.fixture(scope="module")
def model_and_ids():
    return F.make_model(SETUP), F.make_prompts(SETUP)


def _reference(model, ids, points):
    return F.full_kv_reference(model, ids, SETUP.new_tokens, F.probes_for(points, SETUP.new_tokens - 1))


def test_reference_matches_model_generate(model_and_ids):
    model, ids = model_and_ids
    ref = _reference(model, ids, [])
    expected = model.generate(ids, max_new_tokens=SETUP.new_tokens, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.tokens, expected[:, ids.shape[1]:])
    assert ref.logprobs.shape == (SETUP.new_tokens - 1, SETUP.batch, SETUP.vocab)


def test_uncompressed_cache_is_exact(model_and_ids):
    model, ids = model_and_ids
    ref = _reference(model, ids, [])
    row = F.evaluate(model, ids, ref, [("full", "off", None)])[0]
    assert row["kl_all"] < 1e-9 and row["top1_all"] == 1.0
    assert row["compressions"] == 0 and row["kv_fraction"] == 1.0


@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_unpooled_selection_equals_full_attention_oracle(model_and_ids, aggregation):
    """With pooling width 1, RPC's first compression keeps exactly the top-k by attention mass of
    the last R queries over the candidates; the reference computes that mass independently from
    the full-KV cache and the tapped queries."""
    model, ids = model_and_ids
    rpc = RPC.replace(kernel_size=1, aggregation=aggregation)
    ref = _reference(model, ids, [("x", "x", rpc)])
    row = F.evaluate(model, ids, ref, [("x", "x", rpc)])[0]
    assert row["overlap_first"] == 1.0
    assert row["overlap_random"] < 1.0
    assert row["repeatable"] is True


def test_schedule_memory_and_metrics(model_and_ids):
    model, ids = model_and_ids
    points = [("x", "x", RPC), ("b", "b", RPC.replace(budget=2))]
    ref = _reference(model, ids, points)
    rows = F.evaluate(model, ids, ref, points)
    steps = SETUP.new_tokens - 1
    for row, (_, _, rpc) in zip(rows, points):
        assert row["lengths"] == rpc.length_schedule(SETUP.prompt, steps)
        assert row["compressions"] == rpc.compressions_after(steps) == len(F.compression_steps(rpc, steps))
        assert row["peak_cache_len"] == rpc.peak_length(SETUP.prompt, steps + 1)
        assert row["kv_fraction"] == row["peak_cache_len"] / (SETUP.prompt + steps)
        assert row["steps_after"] == steps - (rpc.interval + rpc.window)
        assert 0.0 <= row["top1_after"] <= 1.0 and row["kl_after"] >= 0.0
        assert 0.0 <= row["overlap"] <= 1.0 and 0.0 < row["overlap_random"] < 1.0
    assert rows[1]["peak_cache_len"] < rows[0]["peak_cache_len"]  # the budget caps the kept tokens
    # Predictions before the first compression takes effect are those of full KV.
    run = F.teacher_forced(model, ids, ref, RPC, track_kept=False)
    first = RPC.interval + RPC.window
    assert torch.equal(run.logprobs[:first], ref.logprobs[:first])


def test_spearman():
    assert F.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert F.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert F.spearman([1, 2], [1, 2]) is None
    assert F.spearman([1, 1, 1], [1, 2, 3]) is None


@pytest.mark.slow  # runs the trace model; the sanitizer job skips it, the suite runs it
def test_notebook_quick_mode(monkeypatch):
    """The ablation notebook in quick mode: it runs benchmarks/ablations.py --quick itself (the loop-trace
    model at two schedules and three policies; SmolLM2 when installed), plots and interprets."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("RPC_PY_QUICK", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            text.append(out.get("text", "") + out.get("data", {}).get("text/markdown", ""))
    joined = "\n".join(text)
    assert "quick mode" in joined
    assert "pass@1" in joined and "rpc:P=32,R=16,c=4" in joined and "recent:P=32,R=16,c=4" in joined
    assert "Full KV:" in joined and "comparisons" in joined  # the computed interpretation
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
