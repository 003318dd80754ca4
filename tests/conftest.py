"""Shared pytest setup: seeds, the `requires_cuda` skip marker and small tensor helpers."""

import random

import numpy as np
import pytest

import rpc_py

try:
    import torch
except ImportError:  # torch is an optional (hf/test) dependency
    torch = None

HAS_CUDA = rpc_py.cuda_available() and torch is not None and torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device and a CUDA build of rpc_py (backend_features lacks 'cuda')"
)
requires_torch = pytest.mark.skipif(torch is None, reason="needs torch")


def pytest_collection_modifyitems(config, items):
    # Tests marked @pytest.mark.cuda skip on machines without a usable device.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no usable CUDA device (rpc_py.cuda_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
    yield


@pytest.fixture
def rng():
    """A fresh NumPy generator with a fixed seed."""
    return np.random.default_rng(1234)


@pytest.fixture
def torch_gen():
    if torch is None:
        pytest.skip("needs torch")
    return torch.Generator().manual_seed(1234)


# ---- hypothesis profiles (tests/test_fuzz.py). "ci" is bounded and derandomized so that a CI failure
# reproduces exactly; "long" explores far more: RPC_PY_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py
try:
    import os as _os

    from hypothesis import HealthCheck as _HC
    from hypothesis import settings as _hyp_settings

    _common = dict(deadline=None, print_blob=True,
                   suppress_health_check=[_HC.too_slow, _HC.data_too_large, _HC.filter_too_much])
    _hyp_settings.register_profile("ci", max_examples=300, stateful_step_count=30, derandomize=True,
                                   database=None, **_common)
    _hyp_settings.register_profile("long", max_examples=3000, stateful_step_count=50, **_common)
    _hyp_settings.load_profile(_os.environ.get("RPC_PY_FUZZ_PROFILE", "ci"))
except ImportError:  # hypothesis is a test dependency; the fuzz tests importorskip it
    pass
