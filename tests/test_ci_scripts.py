"""The scripts that spend scarce GPU time: they must fail loudly when they cannot check anything, fit
their time budget by their own plan, and keep what they measured when a time limit stops them.

ci/test_wheel.sh copies ci/*.sh and benchmarks/ next to tests/, so these run against the wheel too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SANITIZER = ROOT / "ci" / "compute_sanitizer.sh"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _run(cmd, env=None, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def test_sanitizer_stage_fails_when_its_python_lacks_rpc_py(tmp_path):
    fake = tmp_path / "python-without-rpc-py"
    # -S: no site-packages, so neither an editable install nor a wheel of rpc_py is importable
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    fake.chmod(0o755)
    proc = _run(["bash", str(SANITIZER)], env={"PYTHON": str(fake)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot import rpc_py" in proc.stderr


def test_sanitizer_stage_skips_without_a_gpu_unless_required():
    import rpc_py

    if rpc_py.cuda_available():
        pytest.skip("a GPU is present: the stage would run for real")
    proc = _run(["bash", str(SANITIZER)], env={"PYTHON": sys.executable})
    assert proc.returncode == 0 and "SKIP" in proc.stdout, proc.stdout + proc.stderr
    proc = _run(["bash", str(SANITIZER)], env={"PYTHON": sys.executable, "RPC_PY_CS_REQUIRE": "1"})
    assert proc.returncode != 0 and "FAIL" in proc.stderr


def _plan(stage):
    proc = _run(["bash", str(GPU_CHECK), stage, "--dry-run"])
    steps = re.findall(r"^\s+(\w+)\s+budget\s+(\d+) s$", proc.stdout, re.M)
    total = int(re.search(r"total budget: (\d+) s of the (\d+) s", proc.stdout).group(1))
    limit = int(re.search(r"total budget: (\d+) s of the (\d+) s", proc.stdout).group(2))
    return proc, [(n, int(b)) for n, b in steps], total, limit


def test_quick_stage_fits_seven_minutes_by_its_own_plan():
    proc, steps, total, limit = _plan("quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [n for n, _ in steps]
    assert names == ["device", "build", "copy_bandwidth", "selfcheck", "bench_decode", "bench_compress",
                     "generate_graph", "cuda_tests"]
    assert names.index("copy_bandwidth") < names.index("bench_decode")  # the yardstick comes first
    assert total == sum(b for _, b in steps) <= limit == 420


@pytest.mark.parametrize("stage", ["tests", "bench", "generate16k", "generate32k", "sanitizer"])
def test_longer_stages_fit_one_command(stage):
    proc, steps, total, limit = _plan(stage)
    assert proc.returncode == 0 and total <= limit <= 600 - 30, proc.stdout


def test_unknown_stage_is_refused():
    proc = _run(["bash", str(GPU_CHECK), "2"])
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_quick_stage_smoke_run_on_the_cpu(tmp_path):
    """The quick stage's own machinery on the CPU at toy sizes: every step runs under its budget and the
    report is rewritten after each one, with what the step measured."""
    out = tmp_path / "out"
    proc = _run(["bash", str(GPU_CHECK), "quick", "--cpu-smoke"], env={"OUT": str(out), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check_quick.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == [n for n, _ in _plan("quick")[1]]
    assert all(s["exit"] == 0 and not s["timed_out"] for s in steps.values())
    copy = steps["copy_bandwidth"]["output"]["copy_GBps"]
    assert copy > 0
    assert all(r["ok"] for r in steps["selfcheck"]["output"])
    decode = steps["bench_decode"]["output"][0]
    assert decode["copy_GBps"] == pytest.approx(copy) and decode["v1_of_copy"] > 0
    assert steps["bench_compress"]["output"]["rows"][0]["rpc_py_of_copy"] > 0
    generate = steps["generate_graph"]["output"]
    assert generate["partial"] is False and {r["config"] for r in generate["results"]} == {"rpc_off", "rpc"}
    assert steps["cuda_tests"]["output"]["counts"]["passed"] >= 1
    assert "all steps passed" in proc.stdout


def test_bench_generate_keeps_what_it_measured_when_stopped(tmp_path, monkeypatch):
    """A run stopped after its first measurement (here: an interrupt) leaves that measurement on disk."""
    spec = importlib.util.spec_from_file_location("bench_generate_ci", ROOT / "benchmarks" / "bench_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = module.generate_once
    calls = {"timed": 0}

    def stop_on_second_timed_run(*args, **kwargs):
        if kwargs.get("record", True):
            calls["timed"] += 1
            if calls["timed"] == 2:
                raise KeyboardInterrupt("time limit")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "generate_once", stop_on_second_timed_run)
    out = tmp_path / "g.json"
    with pytest.raises(KeyboardInterrupt):
        module.main(["--shape", "tiny", "--device", "cpu", "--batch", "2", "--prompt", "8", "--output", "20",
                     "--interval", "8", "--window", "4", "--ratio", "2", "--warmup", "2", "--threads", "1",
                     "--configs", "rpc_off", "rpc", "--repeats", "1", "--no-progress", "--no-plot",
                     "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["partial"] is True
    assert [r["config"] for r in data["details"]["runs"]] == ["rpc_off"]
