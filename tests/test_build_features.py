"""What the built extension enables on this machine. A build linked another way (the manylinux wheel
links with zig against an old glibc) must not lose a feature silently: these checks compare the
extension's own report with what the processor and the build say independently."""

import platform

import pytest

import rpc_py
from rpc_py import _C


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the CPU fast paths are x86-64 only")
def test_cpu_fast_path_matches_the_processor():
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no CPU flags in /proc/cpuinfo")
    # The kernel lists only the features the OS has enabled, the same condition the dispatch checks.
    if "avx512f" in flags:
        expected = "avx512"
    elif {"avx2", "fma"} <= flags:
        expected = "avx2"
    else:
        expected = "generic"
    assert _C._cpu_isa() == expected


def test_backend_features_agree_with_the_build():
    feats = rpc_py.backend_features
    assert "cpu" in feats
    assert ("openmp" in feats) == bool(_C.openmp_built())
    assert ("cuda_built" in feats) == bool(_C.cuda_built())
    assert "cuda" not in feats or "cuda_built" in feats
