"""KVCache behaviour: round trips against NumPy/torch, growth, views, validation, rings, lifecycle.

The oracle everywhere is plain NumPy/torch concatenation of what was appended.
"""

import gc
import os
import sys
import threading

import numpy as np
import pytest

import rpc_py
from rpc_py import KVCache

torch = pytest.importorskip("torch")

from conftest import requires_cuda  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_torch(view):
    return torch.from_dlpack(view)


def rand(shape, dtype="float32", gen=None):
    return torch.randn(*shape, generator=gen).to(TORCH_DTYPES[dtype])


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("B,H,D,steps", [(3, 3, 16, [137]), (1, 5, 8, [1, 1, 3]), (2, 1, 64, [7, 0, 130, 1])])
def test_round_trip_torch(dtype, B, H, D, steps):
    cache = KVCache(2, B, H, D, dtype)
    ks, vs = [], []
    for t in steps:
        k, v = rand((B, H, t, D), dtype), rand((B, H, t, D), dtype)
        ks.append(k)
        vs.append(v)
        n = cache.append(1, k, v)
        assert n == sum(x.shape[2] for x in ks)
    K, V = torch.cat(ks, 2), torch.cat(vs, 2)
    kv, vv = cache.keys(1), cache.values(1)
    assert kv.shape == (B, H, K.shape[2], D)
    assert kv.dtype == dtype and kv.device == "cpu"
    assert torch.equal(as_torch(kv), K)
    assert torch.equal(as_torch(vv), V)
    assert cache.length(1) == K.shape[2] == cache.seen(1)
    assert cache.length(0) == 0 and cache.capacity(0) == 0


@pytest.mark.parametrize("dtype,np_dtype", [("float32", np.float32), ("float16", np.float16)])
def test_round_trip_numpy_producer(dtype, np_dtype, rng):
    B, H, D = 3, 2, 16
    cache = KVCache(1, B, H, D, dtype)
    k1 = rng.standard_normal((B, H, 5, D)).astype(np_dtype)
    v1 = rng.standard_normal((B, H, 5, D)).astype(np_dtype)
    k2 = rng.standard_normal((B, H, 9, D)).astype(np_dtype)
    v2 = rng.standard_normal((B, H, 9, D)).astype(np_dtype)
    cache.append(0, k1, v1)
    cache.append(0, k2, v2)
    np.testing.assert_array_equal(np.from_dlpack(cache.keys(0)), np.concatenate([k1, k2], 2))
    np.testing.assert_array_equal(np.from_dlpack(cache.values(0)), np.concatenate([v1, v2], 2))


def test_read_only_numpy_input_is_fine_for_append(rng):
    k = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    k.flags.writeable = False
    cache = KVCache(1, 1, 2, 4)
    cache.append(0, k, k)
    np.testing.assert_array_equal(np.from_dlpack(cache.keys(0)), k)


def test_raw_capsule_input():
    k = torch.randn(2, 2, 3, 4)
    cache = KVCache(1, 2, 2, 4)
    cache.append(0, k.__dlpack__(), torch.utils.dlpack.to_dlpack(k))
    assert torch.equal(as_torch(cache.keys(0)), k)
    assert torch.equal(as_torch(cache.values(0)), k)


def test_non_contiguous_inputs_round_trip():
    B, H, T, D = 3, 4, 11, 8
    cache = KVCache(1, B, H, D, "float32")
    base = torch.randn(B, T, H, D)
    k = base.transpose(1, 2)  # [B, H, T, D], token stride H*D
    v = torch.randn(B, H, 2 * T, 2 * D)[:, :, ::2, 1::2]  # sliced in tokens and head_dim
    assert not k.is_contiguous() and not v.is_contiguous()
    cache.append(0, k, v)
    w = torch.randn(B, H, 1, D).expand(B, H, 5, D)  # zero stride along tokens
    cache.append(0, w, w)
    assert torch.equal(as_torch(cache.keys(0)), torch.cat([k, w], 2))
    assert torch.equal(as_torch(cache.values(0)), torch.cat([v, w], 2))


def test_negative_strides_are_rejected(rng):
    k = rng.standard_normal((1, 2, 6, 4)).astype(np.float32)
    cache = KVCache(1, 1, 2, 4)
    with pytest.raises(ValueError, match="keys: expected non-negative strides"):
        cache.append(0, k[:, :, ::-1], k)
    with pytest.raises(ValueError, match="values: expected non-negative strides"):
        cache.append(0, k, k[:, :, :, ::-1])
    assert cache.length(0) == 0


# ----------------------------------------------------------------------------------------- growth


def test_growth_preserves_content_and_bumps_generation():
    B, H, D = 2, 3, 8
    cache = KVCache(1, B, H, D, "float16")
    ks, vs, gens = [], [], []
    for i in range(12):
        t = 37 + 11 * i
        k, v = rand((B, H, t, D), "float16"), rand((B, H, t, D), "float16")
        ks.append(k)
        vs.append(v)
        cache.append(0, k, v)
        gens.append(cache.generation(0))
        total = sum(x.shape[2] for x in ks)
        assert cache.length(0) == total == cache.seen(0)
        assert cache.capacity(0) >= total
    assert cache.capacity(0) >= 256
    assert gens[0] == 1 and gens == sorted(gens) and gens[-1] > 1
    assert torch.equal(as_torch(cache.keys(0)), torch.cat(ks, 2))
    assert torch.equal(as_torch(cache.values(0)), torch.cat(vs, 2))


def test_growth_policy_doubles_with_floor():
    cache = KVCache(1, 1, 1, 4)
    cache.append(0, torch.zeros(1, 1, 10, 4), torch.zeros(1, 1, 10, 4))
    assert cache.capacity(0) == 256
    cache.append(0, torch.zeros(1, 1, 250, 4), torch.zeros(1, 1, 250, 4))
    assert cache.capacity(0) == 512
    cache.append(0, torch.zeros(1, 1, 2000, 4), torch.zeros(1, 1, 2000, 4))
    assert cache.capacity(0) == 2260  # needed > 2 * capacity
    assert cache.generation(0) == 3


def test_explicit_initial_capacity_and_nbytes():
    B, H, D = 2, 2, 8
    cache = KVCache(2, B, H, D, "bfloat16", capacity=40)
    cache.append(0, rand((B, H, 3, D), "bfloat16"), rand((B, H, 3, D), "bfloat16"))
    assert cache.capacity(0) == 40
    kv_bytes = 2 * B * H * 40 * D * 2
    assert cache.nbytes == kv_bytes
    cache.append(1, rand((B, H, 50, D), "bfloat16"), rand((B, H, 50, D), "bfloat16"))
    assert cache.capacity(1) == 50  # first allocation: max(capacity, needed)
    cache.append(1, rand((B, H, 1, D), "bfloat16"), rand((B, H, 1, D), "bfloat16"))
    assert cache.capacity(1) == 256  # growth: max(2 * capacity, needed, 256)
    assert cache.nbytes == kv_bytes + 2 * B * H * cache.capacity(1) * D * 2
    assert cache.peak_nbytes >= cache.nbytes


def test_storage_views_show_capacity():
    cache = KVCache(1, 2, 2, 4, capacity=16)
    k = torch.randn(2, 2, 5, 4)
    cache.append(0, k, -k)
    sk, sv = as_torch(cache.storage_keys(0)), as_torch(cache.storage_values(0))
    assert sk.shape == (2, 2, 16, 4)
    assert torch.equal(sk[:, :, :5], k) and torch.equal(sv[:, :, :5], -k)
    assert torch.count_nonzero(sk[:, :, 5:]) == 0  # storage is zero-initialised
    kv = cache.keys(0)
    assert kv.strides == (2 * 16 * 4, 16 * 4, 4, 1)


def test_fixed_capacity_overflow():
    cache = KVCache(1, 1, 2, 4, capacity=8, fixed_capacity=True)
    cache.append(0, torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4))
    with pytest.raises(ValueError, match="capacity 8"):
        cache.append(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert cache.length(0) == 6 and cache.capacity(0) == 8
    cache.append(0, torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))
    assert cache.length(0) == 8 and cache.generation(0) == 1
    with pytest.raises(ValueError, match="capacity"):
        KVCache(1, 1, 1, 4, fixed_capacity=True)


# ----------------------------------------------------------------------------------------- views


def test_views_share_memory_with_cache():
    cache = KVCache(1, 2, 2, 8)
    cache.append(0, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    t = as_torch(cache.keys(0))
    t[1, 0, 3, :] = 7.5
    assert np.all(np.from_dlpack(cache.keys(0))[1, 0, 3] == 7.5)
    tv = as_torch(cache.values(0))
    tv.zero_()
    assert not np.any(np.from_dlpack(cache.values(0)))
    # Legacy capsule path (no max_version) works too.
    legacy = torch.utils.dlpack.from_dlpack(cache.keys(0).__dlpack__())
    assert legacy.data_ptr() == t.data_ptr()


def test_view_is_a_snapshot_after_growth_and_survives_close():
    cache = KVCache(1, 1, 1, 4, capacity=4)
    k = torch.arange(12.0).reshape(1, 1, 3, 4)
    cache.append(0, k, k)
    old = cache.keys(0)
    cache.append(0, torch.ones(1, 1, 300, 4), torch.ones(1, 1, 300, 4))
    assert cache.generation(0) == 2
    assert torch.equal(as_torch(old), k)  # old block, still alive
    cache.close()
    del cache
    gc.collect()
    assert torch.equal(as_torch(old), k)
    arr = np.from_dlpack(old)
    del old
    gc.collect()
    np.testing.assert_array_equal(arr, k.numpy())  # the array alone keeps the block alive


def test_view_attributes_and_dlpack_protocol():
    cache = KVCache(1, 2, 3, 4, "bfloat16")
    cache.append(0, rand((2, 3, 5, 4), "bfloat16"), rand((2, 3, 5, 4), "bfloat16"))
    v = cache.values(0)
    assert v.__dlpack_device__() == (1, 0)
    assert (v.shape, v.dtype, v.device) == ((2, 3, 5, 4), "bfloat16", "cpu")
    cap = v.__dlpack__(max_version=(1, 0))
    assert "dltensor_versioned" in repr(cap)
    cap = v.__dlpack__()
    assert '"dltensor"' in repr(cap)
    with pytest.raises(BufferError):
        v.__dlpack__(copy=True)
    with pytest.raises(BufferError):
        v.__dlpack__(dl_device=(2, 0))
    # Unconsumed capsules are freed by their destructor without leaking the view.
    before = sys.getrefcount(v)
    for _ in range(100):
        v.__dlpack__(max_version=(1, 0))
        v.__dlpack__()
    assert sys.getrefcount(v) == before


def test_empty_layer_views():
    cache = KVCache(2, 2, 3, 4)
    kv = cache.keys(1)
    assert kv.shape == (2, 3, 0, 4)
    assert as_torch(kv).numel() == 0


# ----------------------------------------------------------------------------------------- validation


def test_bad_inputs_raise_named_errors():
    B, H, D = 3, 2, 16
    cache = KVCache(2, B, H, D, "bfloat16")
    good = rand((B, H, 5, D), "bfloat16")
    cases = [
        (ValueError, r"keys: expected shape \[3, 2, \*, 16\], got \[3, 2, 5, 8\]",
         lambda: cache.append(0, rand((B, H, 5, 8), "bfloat16"), good)),
        (ValueError, r"values: expected shape \[3, 2, \*, 16\], got \[3, 3, 5, 16\]",
         lambda: cache.append(0, good, rand((B, 3, 5, D), "bfloat16"))),
        (ValueError, "keys: expected dtype bfloat16 \\(the cache dtype\\), got float32",
         lambda: cache.append(0, torch.randn(B, H, 5, D), good)),
        (ValueError, "values: expected dtype bfloat16", lambda: cache.append(0, good, rand((B, H, 5, D), "float16"))),
        (ValueError, r"values: expected the same number of tokens as keys \(5\), got 4",
         lambda: cache.append(0, good, good[:, :, :4])),
        (ValueError, "keys: expected a 4-D tensor", lambda: cache.append(0, good[0], good)),
        (ValueError, "keys: unsupported dtype bool", lambda: cache.append(0, torch.zeros(B, H, 5, D, dtype=torch.bool), good)),
        (ValueError, "keys: unsupported dtype float64", lambda: cache.append(0, torch.zeros(B, H, 5, D, dtype=torch.float64), good)),
        (IndexError, "layer: index 5 out of range for a cache of 2 layers", lambda: cache.append(5, good, good)),
        (IndexError, "layer: index -1 out of range", lambda: cache.keys(-1)),
        (TypeError, "layer: expected an int", lambda: cache.length("0")),
        (TypeError, "keys: expected a DLPack tensor", lambda: cache.append(0, [[1.0]], good)),
        (TypeError, "values: expected a DLPack tensor", lambda: cache.append(0, good, None)),
        (TypeError, "stream: expected None or an int", lambda: cache.append(0, good, good, stream="s")),
        (ValueError, "stream: expected None or a CUDA stream handle >= 0", lambda: cache.append(0, good, good, stream=-5)),
        (ValueError, "dtype: expected one of", lambda: KVCache(1, 1, 1, 1, "float8")),
        (ValueError, "dtype: expected float32, float16 or bfloat16", lambda: KVCache(1, 1, 1, 1, "int32")),
        (ValueError, "batch: expected an int >= 1, got 0", lambda: KVCache(1, 0, 1, 1)),
        (ValueError, "q_heads: expected a multiple of kv_heads", lambda: KVCache(1, 1, 2, 4, q_heads=3)),
        (ValueError, "counts: expected 3 padding counts", lambda: cache.set_padding([1, 2])),
        (ValueError, "counts: expected counts >= 0", lambda: cache.set_padding([1, -2, 0])),
        (TypeError, "counts: expected ints", lambda: cache.set_padding([1, "x", 0])),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()
    # Nothing was appended by the failed calls.
    assert cache.length(0) == 0 and cache.seen(0) == 0


def test_device_mismatch_names_layer_device():
    cache = KVCache(1, 1, 1, 4)
    cache.allocate(0, "cpu", 0, 8)
    assert cache.device(0) == "cpu" and cache.capacity(0) == 8
    with pytest.raises(ValueError, match="device_type: layer 0 is already on cpu"):
        cache.allocate(0, "cuda", 0, 8)
    with pytest.raises(ValueError, match="device_type: expected 'cpu' or 'cuda'"):
        cache.allocate(0, "tpu", 0, 8)


@pytest.mark.skipif("cuda_built" in rpc_py.backend_features, reason="checks the CPU-only build")
def test_cuda_not_built_message():
    cache = KVCache(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="without CUDA"):
        cache.allocate(0, "cuda", 0, 8)


def test_closed_cache_misuse():
    cache = KVCache(1, 1, 1, 4)
    cache.append(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    assert not cache.closed
    cache.close()
    assert cache.closed
    cache.close()  # idempotent
    for fn in [lambda: cache.append(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)),
               lambda: cache.keys(0), lambda: cache.length(0), lambda: cache.reset(),
               lambda: cache.record_query(0, torch.zeros(1, 1, 1, 4)), lambda: cache.nbytes,
               lambda: cache.padding, lambda: cache.compress(0, 0, 0)]:
        with pytest.raises(ValueError, match="KVCache is closed"):
            fn()
    with pytest.raises(ValueError, match="closed"):
        with cache:
            pass


def test_context_manager_closes():
    with KVCache(1, 1, 1, 4) as cache:
        cache.append(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
        view = cache.keys(0)
    assert cache.closed
    assert as_torch(view).shape == (1, 1, 2, 4)


# ----------------------------------------------------------------------------------------- reset / padding


def test_reset_semantics():
    B, H, D = 2, 2, 4
    cache = KVCache(2, B, H, D, window=3)
    for layer in range(2):
        cache.append(layer, torch.randn(B, H, 9, D), torch.randn(B, H, 9, D))
        cache.record_query(layer, torch.randn(B, 4, 5, D))
    cache.set_padding([2, 0])
    cap, gen, nbytes = cache.capacity(0), cache.generation(0), cache.nbytes
    cache.reset()
    for layer in range(2):
        assert cache.length(layer) == 0 and cache.seen(layer) == 0 and cache.num_queries(layer) == 0
        assert cache.keys(layer).shape == (B, H, 0, D)
    assert cache.padding == (0, 0)
    assert cache.capacity(0) == cap and cache.generation(0) == gen and cache.nbytes == nbytes  # allocations kept
    k = torch.randn(B, H, 4, D)
    cache.append(0, k, k)
    assert torch.equal(as_torch(cache.keys(0)), k)
    assert cache.seen(0) == 4
    # The ring restarts: one new query is not a full window.
    cache.record_query(0, torch.randn(B, 4, 1, D))
    assert cache.num_queries(0) == 1
    with pytest.raises(ValueError, match="recorded queries"):
        cache.compress(0, 0, 0)


def test_padding_roundtrip():
    cache = KVCache(1, 3, 1, 4)
    assert cache.padding == (0, 0, 0)
    cache.set_padding([1, 0, 5])
    assert cache.padding == (1, 0, 5)
    cache.set_padding(np.array([2, 2, 2], dtype=np.int64))
    assert cache.padding == (2, 2, 2)


# ----------------------------------------------------------------------------------------- query ring


def test_record_query_keeps_last_window():
    B, H, Hq, D, W = 2, 2, 6, 4, 5
    cache = KVCache(1, B, H, D, window=W)
    history = []
    for t in [1, 2, 1, 3, 7, 1, 1, 4, 2]:
        q = torch.randn(B, Hq, t, D)
        history.append(q)
        n = cache.record_query(0, q)
        total = sum(x.shape[2] for x in history)
        assert n == min(total, W) == cache.num_queries(0)
        expect = torch.cat(history, 2)[:, :, -W:]
        ring = as_torch(cache.queries(0))
        assert ring.shape == (B, Hq, W, D)
        got = ring[:, :, :n]
        # Same multiset of query vectors per (batch, head): compare sorted by first coordinate.
        e = expect[:, :, -n:]
        key_e = torch.sort(e[..., 0], dim=-1).values
        key_g = torch.sort(got[..., 0], dim=-1).values
        assert torch.equal(key_e, key_g)
        # Full vectors too: every expected query appears in the ring.
        for j in range(n):
            hits = (got == e[:, :, j : j + 1]).all(-1).any(-1)
            assert bool(hits.all())
    assert cache.q_heads == Hq


def test_record_query_validation():
    cache = KVCache(1, 2, 2, 4, window=3)
    with pytest.raises(ValueError, match="q: expected a number of query heads that is a multiple of kv_heads"):
        cache.record_query(0, torch.randn(2, 3, 1, 4))
    cache.record_query(0, torch.randn(2, 4, 1, 4))
    with pytest.raises(ValueError, match=r"q: expected shape \[2, 4, \*, 4\]"):
        cache.record_query(0, torch.randn(2, 6, 1, 4))
    with pytest.raises(ValueError, match="q: expected dtype float32"):
        cache.record_query(0, torch.randn(2, 4, 1, 4, dtype=torch.float16))
    nowin = KVCache(1, 2, 2, 4)
    with pytest.raises(ValueError, match="window"):
        nowin.record_query(0, torch.randn(2, 4, 1, 4))
    with pytest.raises(ValueError, match="no recorded queries"):
        nowin.queries(0)


def test_fixed_q_heads():
    cache = KVCache(1, 1, 2, 4, window=2, q_heads=4)
    assert cache.q_heads == 4
    with pytest.raises(ValueError, match=r"q: expected shape \[1, 4, \*, 4\]"):
        cache.record_query(0, torch.randn(1, 2, 1, 4))


# ----------------------------------------------------------------------------------------- compress arguments


def test_compress_argument_errors():
    B, H, D, W = 1, 2, 4, 2
    cache = KVCache(1, B, H, D, window=W)
    with pytest.raises(ValueError, match="holds no tokens"):
        cache.compress(0, 0, 0)
    cache.append(0, torch.randn(B, H, 10, D), torch.randn(B, H, 10, D))
    with pytest.raises(ValueError, match="recorded queries"):
        cache.compress(0, 0, 1)
    cache.record_query(0, torch.randn(B, 4, 2, D))
    with pytest.raises(ValueError, match="start: expected an int >= 0"):
        cache.compress(0, -1, 1)
    with pytest.raises(ValueError, match="start: expected start < length - window = 8"):
        cache.compress(0, 8, 0)
    with pytest.raises(ValueError, match=r"keep: expected 0 <= keep <= 6"):
        cache.compress(0, 2, 7)
    with pytest.raises(ValueError, match="aggregation: expected 'all' or 'group'"):
        cache.compress(0, 2, 1, aggregation="none")
    with pytest.raises(ValueError, match="pooling: expected 'avg' or 'max'"):
        cache.compress(0, 2, 1, pooling="min")
    with pytest.raises(ValueError, match="kernel_size: expected an odd int >= 1"):
        cache.compress(0, 2, 1, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size"):
        cache.compress(0, 2, 1, kernel_size=0)
    assert cache.length(0) == 10
    with pytest.raises(ValueError, match="window"):
        KVCache(1, 1, 1, 4).compress(0, 0, 0)


# ----------------------------------------------------------------------------------------- device lengths


def test_device_lengths_on_cpu_layer():
    cache = KVCache(1, 1, 1, 4)
    with pytest.raises(ValueError, match="no storage"):
        cache.device_lengths(0)
    cache.append(0, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    dl = cache.device_lengths(0)
    assert dl.dtype == "int64" and dl.shape == (2,)
    arr = np.from_dlpack(dl)
    assert arr.tolist() == [3, 3]
    cache.append(0, torch.zeros(1, 1, 300, 4), torch.zeros(1, 1, 300, 4))  # growth keeps the buffer
    assert arr.tolist() == [303, 303]
    cache.reset()
    assert arr.tolist() == [0, 0]


# ----------------------------------------------------------------------------------------- leaks and threads


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def test_refcounts_and_rss_flat_over_many_cycles():
    B, H, D = 1, 2, 8
    cache = KVCache(1, B, H, D, capacity=4096)
    k = torch.randn(B, H, 1, D)
    v = torch.randn(B, H, 1, D)
    kn = np.zeros((B, H, 1, D), np.float32)
    rk, rv, rn = sys.getrefcount(k), sys.getrefcount(v), sys.getrefcount(kn)

    def cycle(n):
        for i in range(n):
            if cache.length(0) >= 4000:
                cache.reset()
            cache.append(0, k, v if i % 2 else kn)
            t = torch.from_dlpack(cache.keys(0))
            a = np.from_dlpack(cache.values(0))
            del t, a

    cycle(2000)  # warm-up: allocator pools, torch caches
    gc.collect()
    rss0 = _rss_bytes()
    cycle(10000)
    gc.collect()
    rss1 = _rss_bytes()
    assert (sys.getrefcount(k), sys.getrefcount(v), sys.getrefcount(kn)) == (rk, rv, rn)
    if rss0 is not None:
        assert rss1 - rss0 < 20 * 1024 * 1024, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"


def test_failed_calls_do_not_leak_references():
    cache = KVCache(1, 1, 1, 4)
    good = torch.zeros(1, 1, 2, 4)
    bad = torch.zeros(1, 1, 3, 4)
    r = sys.getrefcount(good), sys.getrefcount(bad)
    for _ in range(200):
        with pytest.raises(ValueError):
            cache.append(0, good, bad)
    assert (sys.getrefcount(good), sys.getrefcount(bad)) == r


def test_concurrent_use_is_refused_or_serialised():
    """Two threads hammer one cache: every call either works or raises the busy RuntimeError."""
    B, H, D = 2, 4, 128
    cache = KVCache(1, B, H, D, capacity=80 * 64)
    big = torch.randn(B, H, 64, D)  # 256 KiB per tensor: the copy releases the GIL
    errors, busy = [], [0]

    def worker():
        try:
            for _ in range(40):
                try:
                    cache.append(0, big, big)
                except RuntimeError as e:
                    assert "in use by another thread" in str(e)
                    busy[0] += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    n = cache.length(0)
    assert n % 64 == 0 and n == 64 * (80 - busy[0])
    got = as_torch(cache.keys(0))
    assert torch.equal(got, big.repeat(1, 1, n // 64, 1))


# ----------------------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_append_views_and_device_lengths(dtype):
    B, H, D = 3, 5, 64
    s = torch.cuda.Stream()
    cache = KVCache(2, B, H, D, dtype)
    with torch.cuda.stream(s):
        ks = [rand((B, H, t, D), dtype).cuda() for t in (137, 1, 200)]
        vs = [x.flip(-1).contiguous() for x in ks]
        for k, v in zip(ks, vs):
            cache.append(1, k.transpose(2, 3).contiguous().transpose(2, 3), v, stream=s.cuda_stream)
        got_k = torch.from_dlpack(cache.keys(1))
        got_v = torch.from_dlpack(cache.values(1))
        assert got_k.device.type == "cuda"
        assert torch.equal(got_k, torch.cat(ks, 2))
        assert torch.equal(got_v, torch.cat(vs, 2))
        dl = torch.from_dlpack(cache.device_lengths(1))
        assert dl.tolist() == [338, 338]
        assert cache.generation(1) >= 2
        got_k[0, 0, 0, 0] = 3.0
        assert torch.from_dlpack(cache.keys(1))[0, 0, 0, 0].item() == 3.0
    s.synchronize()
    assert cache.device(1) == "cuda:0"
    with pytest.raises(ValueError, match="keys: expected a tensor on cuda:0"):
        cache.append(1, torch.zeros(B, H, 1, D, dtype=TORCH_DTYPES[dtype]), torch.zeros(B, H, 1, D, dtype=TORCH_DTYPES[dtype]))
    cache.reset(stream=s.cuda_stream)
    s.synchronize()
    assert torch.from_dlpack(cache.device_lengths(1)).tolist() == [0, 0]


@requires_cuda
def test_cuda_record_query_ring():
    B, H, Hq, D, W = 2, 2, 4, 16, 4
    cache = KVCache(1, B, H, D, window=W)
    hist = []
    for t in (3, 2, 6, 1):
        q = torch.randn(B, Hq, t, D, device="cuda")
        hist.append(q)
        cache.record_query(0, q)
    torch.cuda.synchronize()
    ring = torch.from_dlpack(cache.queries(0))
    expect = torch.cat(hist, 2)[:, :, -W:]
    assert torch.equal(torch.sort(ring[..., 0], -1).values, torch.sort(expect[..., 0], -1).values)


@pytest.mark.parametrize("aggregation", ["all", "group"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compress_plumbing_matches_reference(aggregation, dtype):
    """compress() hands the ring, K/V strides and offsets to the kernels as the contract says.

    The oracle is rpc_py.reference (pure torch), fed with the last `window` recorded queries.
    """
    reference = pytest.importorskip("rpc_py.reference")
    B, H, G, D, W, L, start, keep = 3, 2, 3, 16, 4, 137, 11, 50
    cache = KVCache(1, B, H, D, dtype, window=W)
    k, v = rand((B, H, L, D), dtype), rand((B, H, L, D), dtype)
    cache.append(0, k, v)
    qs = rand((B, H * G, 9, D), dtype)
    cache.record_query(0, qs[:, :, :5])
    cache.record_query(0, qs[:, :, 5:])  # wraps around the ring
    n, scores, idx = cache.compress(0, start, keep, aggregation=aggregation, return_details=True)
    rk, rv, ridx, rscores = reference.compress_reference(qs[:, :, -W:], k, v, start, keep, W, aggregation=aggregation)
    assert n == start + keep + W == cache.length(0)
    assert cache.seen(0) == L
    A = 1 if aggregation == "all" else H
    assert scores.shape == (B, A, L - W - start) and idx.shape == (B, A, keep)
    np.testing.assert_allclose(scores, rscores.float().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(idx, ridx.numpy())
    assert torch.equal(as_torch(cache.keys(0)), rk.to(TORCH_DTYPES[dtype]))
    assert torch.equal(as_torch(cache.values(0)), rv.to(TORCH_DTYPES[dtype]))
    assert np.from_dlpack(cache.device_lengths(0)).tolist() == [n, L]
    assert cache.compress(0, start, 0) == start + W  # keep nothing: prefix + window remain
