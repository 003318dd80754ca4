"""The no-sync compression policy: every compression of a generation after the first allocates and
frees nothing (on CUDA that would be cudaMalloc/cudaFree, each a device sync with the GIL held).

All of rpc_py's host and device blocks are Storage objects, allocated and freed in one place that
counts (``_C._alloc_counts()``): the cache's storage and scratch, and every result or argument copy a
binding makes, on the CPU as on CUDA (binding_util.c). A CPU build therefore takes exactly the
branches a CUDA build takes (only the block's device differs), so the host counts here stand for the
device calls on a GPU; the CUDA variant of the generation test checks the device counts directly.
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
    """Records the Storage counters after every compression (RPC's fused compress, or the policies'
    compact after their own scores and select)."""

    after = []

    def compress(self, *args, **kwargs):
        result = super().compress(*args, **kwargs)
        CountingKVCache.after.append((counts(), self.scratch_nbytes))
        return result

    def compact(self, *args, **kwargs):
        result = super().compact(*args, **kwargs)
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


@pytest.mark.parametrize("policy", ["recent", "random", "tova", "h2o", "snapkv", "rkv"])
def test_policy_generation_allocates_nothing_after_first_compression(counting_cache, policy):
    """Every policy's scores, selection and compaction write into torch tensors the cache owns; query
    positions and padding are built on the device: no rpc_py block per compression."""
    model = make_model("llama", layers=2)
    ids, mask, _ = prompts(3, [7, 4, 6])
    rpc = RPCConfig(interval=8, window=4, ratio=2, policy=policy)
    rpc_py.generate(model, input_ids=ids, attention_mask=mask, rpc=rpc, max_new_tokens=45, do_sample=False)
    after = counting_cache.after
    assert len(after) == 2 * ((45 - 1 - (8 + 4)) // 8 + 1)
    first = after[0][0]
    for got, _ in after[1:]:
        assert got == first, f"{policy}: a compression after the first allocated or freed a block"


def test_counters_see_host_results_like_device_ones():
    """A result the binding allocates counts on the CPU as on CUDA; an out= tensor replaces it."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 3, 40, generator=g)
    a0, _ = counts()
    _C.select(scores, 5)
    assert counts()[0] == a0 + 1
    out = torch.empty(2, 3, 5, dtype=torch.int64)
    a1, _ = counts()
    assert _C.select(scores, 5, out=out) is out
    assert counts()[0] == a1
    kv = _C.KVCache(1, 2, 2, 8, "float32", capacity=64, window=2, q_heads=2)
    kv.append(0, torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g))
    kv.record_query(0, torch.randn(2, 2, 2, 8, generator=g))
    kv.compress(0, 4, 10)  # first compression: the scratch block
    a2, _ = counts()
    kv.append(0, torch.randn(2, 2, 20, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g))
    length, s, i = kv.compress(0, 4, 10, return_details=True)
    assert counts()[0] == a2 + 2  # scores and indices handed to the caller: two counted blocks
    kept = torch.empty(2, 1, 10, dtype=torch.int64)
    kv.append(0, torch.randn(2, 2, 20, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g))
    a3, _ = counts()
    kv.compress(0, 4, 10, indices_out=kept)
    assert counts()[0] == a3
    rows = kept[:, 0]
    assert bool((rows[:, 1:] > rows[:, :-1]).all()) and int(rows.min()) >= 0
    kv.close()


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
