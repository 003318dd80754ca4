"""The no-sync compression policy: every compression of a generation after the first allocates and
frees nothing (on CUDA that would be cudaMalloc/cudaFree, each a device sync with the GIL held).

All of rpc_py's host and device blocks are Storage objects, allocated and freed in one place that
counts (``_C._alloc_counts()``). A CPU build runs exactly the scratch logic a CUDA build runs (only
the block's device differs), so the host counts here stand for the device calls on a GPU; the CUDA
variant of the generation test checks the device counts directly.
"""

import pytest
import torch

import rpc_py
from rpc_py import _C
from rpc_py.config import RPCConfig
from rpc_py.hf import cache as cache_mod

from hf_testing import make_model, prompts


def counts():
    c = _C._alloc_counts()
    return c["host_allocs"] + c["device_allocs"], c["host_frees"] + c["device_frees"]


class CountingKVCache(_C.KVCache):
    """Records the Storage counters after every compress call."""

    after = []

    def compress(self, *args, **kwargs):
        result = super().compress(*args, **kwargs)
        CountingKVCache.after.append((counts(), self.scratch_nbytes))
        return result


@pytest.fixture
def counting_cache(monkeypatch):
    CountingKVCache.after = []
    monkeypatch.setattr(cache_mod, "_KVCACHE_CLASS", CountingKVCache)
    yield CountingKVCache


def test_alloc_counts_track_storage():
    a0, f0 = counts()
    kv = _C.KVCache(1, 2, 2, 8, "float32", capacity=16)
    kv.append(0, torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8))
    a1, f1 = counts()
    assert a1 - a0 == 2 and f1 == f0  # the K/V block and the device-lengths block
    kv.close()
    assert counts() == (a1, f1 + 2)


@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_generation_allocates_nothing_after_first_compression(counting_cache, aggregation):
    model = make_model("qwen2", layers=3)
    ids, mask, _ = prompts(3, [7, 4, 6])
    rpc = RPCConfig(interval=8, window=4, ratio=2, kernel_size=3, aggregation=aggregation)
    rpc_py.generate(model, input_ids=ids, attention_mask=mask, rpc=rpc, max_new_tokens=60, do_sample=False)
    after = counting_cache.after
    # 3 layers x (60 - 1 - (P + R)) // P + 1 = 6 compressions each
    assert len(after) == 3 * 6
    (first, scratch), rest = after[0], after[1:]
    assert scratch > 0
    for got, s in rest:
        assert got == first, "a compression after the first allocated or freed a block"
        assert s == scratch


def test_direct_compress_reuses_scratch_and_close_frees_it():
    B, H, Hq, D, W = 2, 2, 4, 16, 4
    kv = _C.KVCache(2, B, H, D, "float32", capacity=200, window=W, q_heads=Hq)
    g = torch.Generator().manual_seed(0)
    for layer in (0, 1):
        kv.append(layer, torch.randn(B, H, 150, D, generator=g), torch.randn(B, H, 150, D, generator=g))
        kv.record_query(layer, torch.randn(B, Hq, W, D, generator=g))
    kv.compress(0, 10, 40)
    first = counts()
    size = kv.scratch_nbytes
    assert size > 0
    kv.compress(1, 10, 60)  # another layer on the same device shares the block
    for t in (30, 25):
        for layer in (0, 1):
            kv.append(layer, torch.randn(B, H, t, D, generator=g), torch.randn(B, H, t, D, generator=g))
            kv.compress(layer, 10, 70, aggregation="all")
    assert counts() == first and kv.scratch_nbytes == size
    kv.reset()
    assert kv.scratch_nbytes == size  # reset keeps allocations
    a, f = counts()
    kv.close()
    assert counts()[1] - f == 2 * 2 + 2 + 1  # per layer: K/V, lengths, ring; plus the scratch block


def test_scratch_regrows_only_when_the_capacity_grows():
    B, H, Hq, D, W = 1, 2, 2, 8, 2
    kv = _C.KVCache(1, B, H, D, "float32", window=W, q_heads=Hq)  # grows on demand
    kv.append(0, torch.randn(B, H, 100, D), torch.randn(B, H, 100, D))
    kv.record_query(0, torch.randn(B, Hq, W, D))
    kv.compress(0, 0, 50)
    size, first = kv.scratch_nbytes, counts()
    kv.compress(0, 0, 20)  # smaller: reused
    assert counts() == first and kv.scratch_nbytes == size
    kv.append(0, torch.randn(B, H, 1000, D), torch.randn(B, H, 1000, D))  # the K/V block grows
    a, f = counts()
    kv.compress(0, 0, 500)
    assert kv.scratch_nbytes > size
    assert counts() == (a + 1, f + 1)  # one new scratch block, the old one freed


@pytest.mark.cuda
def test_cuda_generation_allocates_nothing_on_the_device_after_first_compression(counting_cache):
    model = make_model("qwen2", layers=3).cuda()
    ids, mask, _ = prompts(3, [7, 4, 6])
    rpc = RPCConfig(interval=8, window=4, ratio=2, kernel_size=3)
    rpc_py.generate(model, input_ids=ids.cuda(), attention_mask=mask.cuda(), rpc=rpc, max_new_tokens=60,
                    do_sample=False)
    after = counting_cache.after
    assert len(after) == 3 * 6
    first = after[0][0]
    assert all(got == first for got, _ in after[1:])
    assert _C._alloc_counts()["device_allocs"] > 0
