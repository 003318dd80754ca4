"""``python -m rpc_py``, README's first command: the main job runs on the shipped model (and on the
random-weight model) and prints what it promises."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from rpc_py.__main__ import main  # noqa: E402


def test_main_job_on_the_shipped_trace_model(capsys):
    assert main(["--problems", "8", "--batch", "8", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "loop-trace model shipped with rpc_py" in out
    assert "torch threads: 1 (--threads)" in out
    for name in ("full KV", "RPC P=64 R=32 c=2", "recent (same memory)"):
        assert name in out
    full_row = next(line for line in out.splitlines() if line.startswith("full KV "))
    # Full KV solves these held-out problems (the model reaches 200/200; 8 here, greedy)
    assert full_row.split()[3] == "1.000", full_row
    # The conclusion is worded from the run's own counts and Wilson intervals
    assert "full KV 8/8 = 100% [95% CI 68%-100%]" in out, out
    assert "=> " in out

    # Progress goes to stderr as plain lines: the estimate before the long part, then one line per
    # setting (one batch each here), in order, with the count correct so far
    err = [line for line in captured.err.splitlines() if line.startswith(("estimate:", "["))]
    assert err and err[0].startswith("estimate: ~") and " s on this machine for 3 generation(s)" in err[0], err
    assert "1 torch thread(s)" in err[0]
    assert [line.split(":")[0] for line in err[1:]] == ["[1/3] full KV", "[2/3] RPC P=64 R=32 c=2",
                                                        "[3/3] recent (same memory)"], err
    assert err[1].startswith("[1/3] full KV: 8/8 correct") and "s left" in err[1], err


def test_main_job_progress_per_batch_and_default_threads(capsys):
    # Two batches per setting: a line per batch with the batch number; no --threads: 1 thread, printed
    assert main(["--problems", "4", "--batch", "2"]) == 0
    captured = capsys.readouterr()
    assert "torch threads: 1 (default for this small model" in captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(lines) == 6, lines
    assert lines[0].startswith("[1/6] full KV: batch 1/2, ") and "s left" in lines[0], lines
    assert lines[-1].startswith("[6/6] recent (same memory): batch 2/2, ") and "s left" not in lines[-1], lines
    assert sum(line.startswith("estimate: ~") for line in captured.err.splitlines()) == 1


def test_main_job_random_model(capsys):
    assert main(["--model", "random", "--new-tokens", "96", "--batch", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens identical to full KV" in out and "compressions" in out.lower()


def test_main_job_rejects_a_missing_model_folder(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model", "/nonexistent/folder", "--threads", "1"])
    assert info.value.code == 2
    assert "--model: '/nonexistent/folder' is not" in capsys.readouterr().err
