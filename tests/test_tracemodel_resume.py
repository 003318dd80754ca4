"""A training run stopped by --max-minutes and continued with --resume ends with exactly the weights of
an uninterrupted run (optimizer state, step, data order and RNG all restored)."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

from rpc_py.tracemodel import train  # noqa: E402

TINY = ["--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--kv-heads", "1",
        "--tokens-per-batch", "256", "--induction-steps", "2", "--warmup", "2", "--steps", "6",
        "--eval-every", "100", "--threads", "1", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _keep_torch_state():
    # train.main sets the thread count and seeds torch: give the rest of the suite back what it had
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _weights(folder):
    return safetensors.load_file(os.path.join(folder, "model.safetensors"))


def test_resume_equals_uninterrupted_run(tmp_path):
    straight, parts = str(tmp_path / "straight"), str(tmp_path / "parts")
    assert train.main(["--out", straight] + TINY) == 0
    # --max-minutes 0 stops after the first step, leaving a resumable checkpoint
    assert train.main(["--out", parts, "--max-minutes", "0"] + TINY) == 0
    assert os.path.exists(os.path.join(parts, train.RESUME_FILE))
    with open(os.path.join(parts, "training.json")) as f:
        rec = json.load(f)
    assert rec["complete"] is False and rec["steps_done"] == 1
    assert train.main(["--out", parts, "--resume"] + TINY) == 0
    assert not os.path.exists(os.path.join(parts, train.RESUME_FILE))
    a, b = _weights(straight), _weights(parts)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with open(os.path.join(parts, "training.json")) as f:
        rec = json.load(f)
    assert rec["complete"] is True and rec["steps_done"] == 6
    assert rec["command"].count("python -m rpc_py.tracemodel.train") == 2
    with open(os.path.join(straight, "training.json")) as f:
        ref = json.load(f)
    assert [e["loss"] for e in rec["log"]] == [e["loss"] for e in ref["log"]]


def test_resume_refuses_other_arguments_and_missing_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(["--out", out, "--resume"] + TINY)
    assert train.main(["--out", out, "--max-minutes", "0"] + TINY) == 0
    with pytest.raises(SystemExit, match="--lr 0.004"):
        train.main(["--out", out, "--resume"] + TINY + ["--lr", "0.004"])


def test_long_trace_options_are_checked_and_old_checkpoints_resume(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="--min-iterations"):
        train.main(["--out", out, "--min-iterations", "0"] + TINY)
    for bad in ("12", "20:12", "a:b", "0:4"):
        with pytest.raises(SystemExit, match="--monitor-iterations"):
            train.main(["--out", out, "--monitor-iterations", bad] + TINY)
    # a checkpoint written before these options existed has no entry for them: it still resumes
    assert train.main(["--out", out, "--max-minutes", "0"] + TINY) == 0
    path = os.path.join(out, train.RESUME_FILE)
    state = torch.load(path, weights_only=False)
    for key in ("min_iterations", "monitor_iterations"):
        del state["args"][key]
    torch.save(state, path)
    assert train.main(["--out", out, "--resume"] + TINY) == 0
    # long-trace training from a checkpoint: batches of 3-4 iterations only, monitored on 5-6
    drawn, monitored = [], []
    make_batch, accuracy = train.make_batch, train.teacher_forced_accuracy
    monkeypatch.setattr(train, "make_batch", lambda tok, seeds, spec: drawn.append(spec.iterations) or make_batch(tok, seeds, spec))
    monkeypatch.setattr(train, "teacher_forced_accuracy",
                        lambda model, tok, spec, seeds: monitored.append(spec.iterations) or accuracy(model, tok, spec, seeds))
    ft = str(tmp_path / "ft")
    assert train.main(["--out", ft, "--init", out] + TINY + ["--min-iterations", "3", "--phases", "1.0:4",
                                                             "--monitor-iterations", "5:6", "--induction-steps", "0"]) == 0
    with open(os.path.join(ft, "training.json")) as f:
        rec = json.load(f)
    assert rec["complete"] and rec["args"]["min_iterations"] == 3 and rec["args"]["monitor_iterations"] == "5:6"
    # six training batches, then the monitor batch (the one evaluation, at the last step)
    assert len(drawn) == 7 and all(hi in (3, 4) and lo == max(1, int(hi * 0.8)) for lo, hi in drawn[:6]), drawn
    assert monitored == [(5, 6)] and drawn[6] == (5, 6)
