"""Leak checks for rpc_py._C: many create/use/destroy cycles must leave memory and refcounts flat.

Three independent meters, each catching a different kind of leak:
  * RSS from /proc/self/statm: anything malloc'd by C and never freed (storage blocks, DLPack export
    contexts, kernel scratch), including memory no Python tool can see;
  * tracemalloc: Python-heap allocations (PyMem_*, objects) that stay reachable or are never freed;
  * sys.getrefcount of the inputs: a missing DECREF on a producer (e.g. an unreleased DLPack
    keepalive on an error path) shows up as a refcount that climbs by one per call.
Bounds are generous (allocator noise, torch caches) but far below what a per-cycle leak adds up to
over the cycle counts used here: 10^5 cycles x even 64 bytes = 6.4 MB.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc

import numpy as np
import pytest

from rpc_py import KVCache, _C

torch = pytest.importorskip("torch")

PAGE = os.sysconf("SC_PAGE_SIZE")
CYCLES = int(os.environ.get("RPC_PY_LEAK_CYCLES", "100000"))


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measure(fn, cycles, warmup=2000):
    """Runs fn() warmup times, then `cycles` times; returns the RSS growth in bytes over the latter."""
    for _ in range(warmup):
        fn()
    gc.collect()
    before = rss_bytes()
    for _ in range(cycles):
        fn()
    gc.collect()
    return rss_bytes() - before


def assert_flat(growth, cycles, what, *, slack=12 << 20):
    per_cycle = growth / max(cycles, 1)
    assert growth < slack, f"{what}: RSS grew by {growth / 2**20:.1f} MiB over {cycles} cycles ({per_cycle:.0f} B/cycle)"


# Tiny shapes: the point is the number of C calls, not their size.
K = np.arange(1 * 1 * 6 * 2, dtype=np.float32).reshape(1, 1, 6, 2) / 7.0
V = -K
Q = np.linspace(-1, 1, 1 * 2 * 2 * 2, dtype=np.float32).reshape(1, 2, 2, 2)


def cache_cycle():
    c = KVCache(1, 1, 1, 2, window=2, q_heads=2)
    c.append(0, K, V)
    c.record_query(0, Q)
    c.compress(0, 1, 2, kernel_size=3)
    c.close()


def cache_cycle_no_close():
    c = KVCache(2, 1, 1, 2, window=2)
    c.append(1, K, V)
    c.record_query(1, Q)
    n, scores, idx = c.compress(1, 0, 1, return_details=True)
    assert n == 3 and idx.shape == (1, 1, 1)
    del c  # dealloc path (no close), views/results die afterwards


def test_create_append_compress_destroy_cycles_are_flat():
    refs = [sys.getrefcount(x) for x in (K, V, Q)]
    growth = measure(cache_cycle, CYCLES)
    assert_flat(growth, CYCLES, "create/append/record/compress/close")
    growth = measure(cache_cycle_no_close, CYCLES // 4)
    assert_flat(growth, CYCLES // 4, "create/append/compress(details)/dealloc")
    assert [sys.getrefcount(x) for x in (K, V, Q)] == refs


def test_error_paths_release_everything():
    """Every refused call must drop what it already took (DLPack keepalives, partial allocations)."""
    bad_dtype = np.zeros((1, 1, 6, 2), np.float16)
    bad_shape = np.zeros((1, 2, 6, 2), np.float32)
    c = KVCache(1, 1, 1, 2, window=2, capacity=8, fixed_capacity=True)
    refs = [sys.getrefcount(x) for x in (K, V, Q, bad_dtype, bad_shape)]

    def errors():
        for call in (lambda: c.append(0, K, bad_dtype), lambda: c.append(0, K, bad_shape),
                     lambda: c.append(0, bad_shape, V), lambda: c.append(5, K, V),
                     lambda: c.record_query(0, bad_dtype), lambda: c.compress(0, 0, 1),
                     lambda: _C.score(Q, bad_dtype, 0, 2), lambda: _C.select(K, 1),
                     lambda: _C.compact(K, V, np.zeros((1, 1, 9), np.int64), 0, 6)):
            try:
                call()
            except (ValueError, IndexError, TypeError):
                pass
            else:
                raise AssertionError("call should have failed")
        # A fixed-capacity overflow after a successful append.
        c.reset()
        c.append(0, K, V)
        try:
            c.append(0, K, V)
        except ValueError:
            pass

    growth = measure(errors, CYCLES // 10, warmup=200)
    assert_flat(growth, CYCLES // 10, "error paths")
    assert [sys.getrefcount(x) for x in (K, V, Q, bad_dtype, bad_shape)] == refs
    c.close()


def test_standalone_ops_are_flat():
    keys = np.random.default_rng(0).standard_normal((1, 1, 16, 4)).astype(np.float32)
    q = np.random.default_rng(1).standard_normal((1, 2, 2, 4)).astype(np.float32)
    refs = [sys.getrefcount(keys), sys.getrefcount(q)]

    def ops():
        pooled, raw = _C.score(q, keys, 2, 14, kernel_size=3, raw=True)
        idx = _C.select(pooled, 4)
        work = keys.copy()
        assert _C.compact(work, work.copy(), idx, 2, 14) == 2 + 4 + 2

    growth = measure(ops, CYCLES // 5)
    assert_flat(growth, CYCLES // 5, "score/select/compact")
    assert [sys.getrefcount(keys), sys.getrefcount(q)] == refs


def test_dlpack_round_trips_are_flat():
    c = KVCache(1, 2, 2, 4, window=0)
    x = torch.randn(2, 2, 5, 4)
    c.append(0, x, x)

    def trips():
        kv = c.keys(0)
        t = torch.from_dlpack(kv)
        a = np.from_dlpack(c.values(0))
        assert t.shape == (2, 2, 5, 4) and a.shape == (2, 2, 5, 4)
        cap = kv.__dlpack__(max_version=(1, 0))
        del cap  # unconsumed capsule: its destructor must free the export context
        cap = kv.__dlpack__()  # legacy
        del cap
        dl = c.device_lengths(0)
        assert int(np.from_dlpack(dl)[0]) == 5
        # Consumer side: a torch-produced capsule consumed by append, then the cache trimmed back.
        c2 = KVCache(1, 2, 2, 4)
        c2.append(0, t, x)
        c2.close()

    refs = sys.getrefcount(x)
    growth = measure(trips, CYCLES // 2)
    assert_flat(growth, CYCLES // 2, "DLPack round trips")
    assert sys.getrefcount(x) == refs
    c.close()


def test_views_outliving_their_cache_are_freed():
    """A View keeps its Storage alive after close(); dropping the view must then free the block."""
    big = np.ones((1, 8, 4096, 64), np.float32)  # 8 MiB per K/V block: a leak is unmissable

    def cycle():
        c = KVCache(1, 1, 8, 64)
        c.append(0, big, big)
        v = c.keys(0)
        c.close()
        assert torch.from_dlpack(v).sum().item() == big.size
        del v

    growth = measure(cycle, 120, warmup=10)
    assert_flat(growth, 120, "views after close", slack=64 << 20)


def test_tracemalloc_python_heap_is_flat():
    n = min(CYCLES // 20, 5000)
    for _ in range(500):
        cache_cycle()
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(n):
            cache_cycle()
            cache_cycle_no_close()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 256 << 10, f"Python heap grew by {after - before} B over {n} cycles"
