"""The pure-torch kernels (rpc_py.set_kernels("torch")) end to end: the same generation as rpc_py's own
kernels, token for token and kept set for kept set, for RPC and every policy; the switch itself.

On the CPU both paths run, so the torch path (what a user falls back to when a CUDA kernel fails its
self-check) is checked here against the native one, whose kept sets the other suites check against
the float64 oracles.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import rpc_py  # noqa: E402
from rpc_py import RPCConfig, kernel_choice as kernels_mod  # noqa: E402
from rpc_py.hf.generate import graph_generate  # noqa: E402
from rpc_py.hf.graph import GraphFallbackWarning, static_decode  # noqa: E402
from rpc_py.hf.layer_ops import NativeOps, TorchOps  # noqa: E402

from hf_testing import make_model, prompts  # noqa: E402


def _generate(kernels, policy, *, arch="qwen2", aggregation="all", capacity=0, max_capacity=None, new=40):
    model = make_model(arch, layers=2)
    ids, mask, _ = prompts(3, [7, 4, 6])
    rpc = RPCConfig(interval=8, window=4, ratio=2, policy=policy, aggregation=aggregation)
    events = []
    with rpc_py.use_kernels(kernels):
        cache = rpc_py.RPCCache(model, rpc, padding=(mask.cumsum(-1) == 0).sum(-1), capacity=capacity,
                                max_capacity=max_capacity)
        cache.compression_hook = events.append
        out = rpc_py.generate(model, ids, attention_mask=mask, rpc=rpc, max_new_tokens=new, do_sample=False,
                              past_key_values=cache)
    assert cache.ops is (TorchOps if kernels == "torch" else NativeOps)
    return out, events


@pytest.mark.parametrize("policy, aggregation, arch", [
    ("rpc", "all", "qwen2"), ("rpc", "group", "llama"), ("recent", "all", "qwen2"), ("random", "all", "llama"),
    ("tova", "all", "qwen2"), ("h2o", "all", "llama"), ("snapkv", "all", "qwen2"), ("rkv", "all", "llama"),
])
def test_torch_kernels_generate_what_the_native_ones_do(policy, aggregation, arch):
    native, ev_native = _generate("native", policy, arch=arch, aggregation=aggregation)
    torch_out, ev_torch = _generate("torch", policy, arch=arch, aggregation=aggregation)
    assert len(ev_native) == len(ev_torch) > 0
    for a, b in zip(ev_native, ev_torch):
        assert (a.layer, a.length_after) == (b.layer, b.length_after)
        assert torch.equal(a.indices, b.indices), f"layer {a.layer}: kept sets differ"
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.keys, a.keys, rtol=0, atol=0)
    assert torch.equal(native, torch_out)


def test_torch_kernels_grow_the_storage_themselves():
    """Without a preallocated capacity the layer grows several times; the live tokens are copied by torch."""
    native, ev_native = _generate("native", "rpc", capacity=0, max_capacity=None, new=300)
    torch_out, ev_torch = _generate("torch", "rpc", capacity=0, max_capacity=None, new=300)
    assert torch.equal(native, torch_out)
    assert [torch.equal(a.indices, b.indices) for a, b in zip(ev_native, ev_torch)] == [True] * len(ev_native)


def test_the_setting_and_its_environment_variable(monkeypatch):
    assert rpc_py.kernels() == "native"
    with rpc_py.use_kernels("torch"):
        assert rpc_py.kernels() == "torch"
    assert rpc_py.kernels() == "native"
    previous = rpc_py.set_kernels("torch")
    assert previous == "native" and rpc_py.kernels() == "torch"
    rpc_py.set_kernels(previous)
    with pytest.raises(ValueError, match="kernels: expected one of"):
        rpc_py.set_kernels("cuda")
    monkeypatch.setattr(kernels_mod, "_current", None)
    monkeypatch.setenv("RPC_PY_KERNELS", "torch")
    assert rpc_py.kernels() == "torch"
    monkeypatch.setattr(kernels_mod, "_current", None)
    monkeypatch.setenv("RPC_PY_KERNELS", "fast")
    with pytest.raises(ValueError, match="RPC_PY_KERNELS"):
        rpc_py.kernels()
    monkeypatch.setattr(kernels_mod, "_current", "native")


def test_cuda_graph_decoding_falls_back_under_the_torch_kernels():
    model = make_model("qwen2", layers=2)
    ids, mask, _ = prompts(2, [5, 6])
    rpc = RPCConfig(interval=8, window=4, ratio=2)
    with rpc_py.use_kernels("torch"):
        with pytest.raises(ValueError, match="pure-torch kernels"):
            static_decode(model, ids, mask, rpc=rpc, max_new_tokens=20, capture=False, do_sample=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = graph_generate(model, ids, mask, rpc=rpc, max_new_tokens=20, do_sample=False)
    assert any(issubclass(w.category, GraphFallbackWarning) for w in caught)
    expected = rpc_py.generate(model, ids, attention_mask=mask, rpc=rpc, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, expected)
