"""rpc_py.selfcheck: every kernel family checked against rpc_py's CPU kernels before first use on a
device, a wrong kernel refused with a clear error, and the way out (the pure-torch kernels).

Without a GPU the checks run with ``impl="torch"``: rpc_py.torch_kernels against the CPU kernels, an
independent comparison that exercises every case the GPU check builds. The CUDA tests run the native
kernels on the device.
"""

import pytest
import torch

import rpc_py
from rpc_py import selfcheck, torch_kernels
from rpc_py.selfcheck import FAMILIES, TORCH_FAMILIES, KernelCheckError, check, ensure


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_torch_kernels_pass_every_check_on_cpu(dtype, head_dim):
    results = check("cpu", dtype=dtype, head_dim=head_dim, impl="torch")
    assert [r.family for r in results] == list(TORCH_FAMILIES)
    failed = [r for r in results if not r.ok]
    assert not failed, selfcheck.report(results)
    assert all(r.seconds < 5 for r in results)


def test_native_cpu_check_runs_every_family():
    results = check("cpu", dtype=torch.bfloat16, head_dim=64)
    assert [r.family for r in results] == list(FAMILIES)
    assert selfcheck.passed(results), selfcheck.report(results)


@pytest.mark.parametrize("family, target, corrupt", [
    ("select", "select", lambda out: out.flip(-1)),
    ("score", "score", lambda out: out * 1.01),
    ("attn_scores", "attn_scores", lambda out: out + 1e-3 * out.abs().max()),
    ("redundancy", "redundancy", lambda out: out.roll(1, dims=-1)),
    ("fill", "fill_scores", lambda out: out.clone().index_fill_(-1, torch.tensor([3]), 0.5)),
])
def test_a_wrong_kernel_fails_its_check(monkeypatch, family, target, corrupt):
    real = getattr(torch_kernels, target)
    monkeypatch.setattr(torch_kernels, target, lambda *a, **k: corrupt(real(*a, **k)))
    (result,) = check("cpu", [family], impl="torch")
    assert not result.ok
    assert result.detail and result.max_error > result.tolerance


def test_a_crashing_kernel_is_a_failed_check(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(torch_kernels, "compact_", boom)
    (result,) = check("cpu", ["compact"], impl="torch")
    assert not result.ok and "illegal memory access" in result.detail


def test_a_wrong_compaction_is_caught(monkeypatch):
    real = torch_kernels.compact_

    def off_by_one(keys, values, indices, start, end, length, acc=None):
        return real(keys, values, (indices + 1).clamp(max=end - start - 1), start, end, length, acc=acc)

    monkeypatch.setattr(torch_kernels, "compact_", off_by_one)
    results = check("cpu", ["compact", "accumulate"], impl="torch")
    assert not any(r.ok for r in results), selfcheck.report(results)


def test_ensure_raises_a_clear_error_once_per_family_and_device(monkeypatch):
    """On a CUDA device a failed family raises KernelCheckError naming the kernel, the device and the
    switch to the torch path; the result is cached (one check per process and family)."""
    calls = []

    def fake_check(device, families, *, dtype, head_dim, impl="native", seed=0):
        calls.append((str(device), tuple(families)))
        ok = families[0] != "compress"
        return [selfcheck.CheckResult(families[0], str(device), impl, "bfloat16", ok, 0.0 if ok else 0.7, 2e-3,
                                      "" if ok else "compress kept indices (all): 12 of 120 entries differ")]

    monkeypatch.setattr(selfcheck, "check", fake_check)
    monkeypatch.setattr(selfcheck, "_checked", {})
    ensure("cuda:3", ["copy"], dtype=torch.bfloat16, head_dim=128)
    ensure("cuda:3", ["copy"], dtype=torch.bfloat16, head_dim=128)
    assert calls == [("cuda:3", ("copy",))]
    with pytest.raises(KernelCheckError) as err:
        ensure("cuda:3", ["copy", "compress"], dtype=torch.bfloat16, head_dim=128)
    message = str(err.value)
    for needle in ("'compress'", "cuda:3", "12 of 120 entries differ", "rpc_py.set_kernels('torch')",
                   "RPC_PY_KERNELS=torch", "python -m rpc_py.selfcheck"):
        assert needle in message, (needle, message)
    with pytest.raises(KernelCheckError):  # cached failure: raised again without a new check
        ensure("cuda:3", ["compress"], dtype=torch.bfloat16, head_dim=128)
    assert calls == [("cuda:3", ("copy",)), ("cuda:3", ("compress",))]
    ensure("cpu", ["compress"])  # the CPU kernels are the reference: nothing to check
    monkeypatch.setenv("RPC_PY_SELFCHECK", "0")
    ensure("cuda:4", ["compress"], dtype=torch.bfloat16, head_dim=128)  # switched off
    assert len(calls) == 2


def test_kernel_check_error_is_exported():
    assert rpc_py.KernelCheckError is KernelCheckError
    assert issubclass(KernelCheckError, RuntimeError)


def test_bad_arguments():
    with pytest.raises(ValueError, match="impl"):
        check("cpu", impl="triton")
    with pytest.raises(ValueError, match="decode"):
        check("cpu", ["decode"], impl="torch")
    with pytest.raises(ValueError, match="dtype"):
        check("cpu", dtype=torch.float64)


def test_cli_on_cpu_with_torch_kernels(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = selfcheck._main(["--device", "cpu", "--impl", "torch", "--dtype", "bfloat16", "--head-dim", "32",
                            "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "score" in text and "FAILED" not in text
    import json

    rows = json.loads(out.read_text())
    assert {r["family"] for r in rows} == set(TORCH_FAMILIES) and all(r["ok"] for r in rows)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_native_cuda_kernels_pass_every_check(dtype, head_dim):
    results = check("cuda", dtype=dtype, head_dim=head_dim)
    assert selfcheck.passed(results), selfcheck.report(results)


@pytest.mark.cuda
def test_torch_kernels_pass_every_check_on_cuda():
    results = check("cuda", dtype=torch.bfloat16, head_dim=128, impl="torch")
    assert selfcheck.passed(results), selfcheck.report(results)
