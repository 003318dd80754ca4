"""``python -m rpc_py``, README's first command: the main job runs on the shipped model (and on the
random-weight model) and prints what it promises."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from rpc_py.__main__ import main  # noqa: E402


def test_main_job_on_the_shipped_trace_model(capsys):
    assert main(["--problems", "8", "--batch", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "loop-trace model shipped with rpc_py" in out
    for name in ("full KV", "RPC P=64 R=32 c=2", "recent (same memory)"):
        assert name in out
    full_row = next(line for line in out.splitlines() if line.startswith("full KV "))
    # Full KV solves these held-out problems (the model reaches 200/200; 8 here, greedy)
    assert full_row.split()[3] == "1.000", full_row


def test_main_job_random_model(capsys):
    assert main(["--model", "random", "--new-tokens", "96", "--batch", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens identical to full KV" in out and "compressions" in out.lower()


def test_main_job_rejects_a_missing_model_folder(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model", "/nonexistent/folder", "--threads", "1"])
    assert info.value.code == 2
    assert "--model: '/nonexistent/folder' is not" in capsys.readouterr().err
