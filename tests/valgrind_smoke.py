"""Small workout of every rpc_py._C entry point, for ci/valgrind.sh (memcheck).

NumPy only (importing torch under valgrind takes minutes). Not a pytest module: run it directly.
Each entry point runs on valid input and on a few invalid ones (error paths are where leaks and
uninitialised reads hide); the script asserts results so a silent wrong answer also fails.
"""

import gc

import numpy as np

from rpc_py import KVCache, _C


def expect_error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (TypeError, ValueError, IndexError, BufferError, RuntimeError):
        return
    raise AssertionError(f"{fn} should have raised")


def main():
    rng = np.random.default_rng(0)
    B, H, G, D, W = 2, 2, 2, 8, 4
    for dtype, npdt in (("float32", np.float32), ("float16", np.float16)):
        c = KVCache(2, B, H, D, dtype, window=W)
        k = rng.standard_normal((B, H, 300, D)).astype(npdt)  # > 256: the layer grows once
        v = rng.standard_normal((B, H, 300, D)).astype(npdt)
        assert c.append(0, k[:, :, :200], v[:, :, :200]) == 200
        old_view = c.keys(0)
        assert c.append(0, k[:, :, 200:], v[:, :, 200:]) == 300  # growth: old_view is a snapshot
        np.testing.assert_array_equal(np.from_dlpack(old_view), k[:, :, :200])
        c.append(1, k[:, :, ::2][:, :, :10], v[:, :, :10])  # strided input
        q = rng.standard_normal((B, H * G, 6, D)).astype(npdt)
        assert c.record_query(0, q) == W
        c.set_padding([1, 0])
        n, scores, idx = c.compress(0, 10, 50, aggregation="group", return_details=True)
        assert n == 10 + 50 + W and idx.shape == (B, H, 50)
        assert c.compress(0, 10, 20, pooling="max", kernel_size=3) == 10 + 20 + W
        np.testing.assert_array_equal(np.from_dlpack(c.device_lengths(0)), [10 + 20 + W, 300])
        sk = c.storage_keys(0)
        assert sk.shape[2] == c.capacity(0)
        expect_error(c.append, 0, k.astype(np.float64), v)
        expect_error(c.append, 0, k[:, :, ::-1], v)
        expect_error(c.append, 7, k, v)
        expect_error(c.record_query, 0, q[:, :3])
        expect_error(c.compress, 0, 0, 10_000)
        expect_error(c.set_padding, [1])
        c.reset()
        assert c.length(0) == 0 and c.padding == (0, 0)
        live = c.values(1)
        c.close()
        expect_error(c.append, 0, k, v)
        assert np.from_dlpack(live).shape == (B, H, 0, D)  # after reset, length 0
        del c, live, old_view, sk

    q = rng.standard_normal((1, 4, 3, 16)).astype(np.float32)
    keys = rng.standard_normal((1, 2, 64, 16)).astype(np.float32)
    pooled, raw = _C.score(q, keys, 4, 60, aggregation="group", kernel_size=5, raw=True)
    assert pooled.shape == (1, 2, 56)
    idx = _C.select(pooled, 10)
    values = keys.copy()
    assert _C.compact(keys, values, idx, 4, 60) == 4 + 10 + 4
    expect_error(_C.score, q, keys, 0, 65)
    expect_error(_C.select, pooled, 57)
    expect_error(_C.compact, keys, values, idx[:, :, ::-1].copy(), 4, 60)
    ro = keys.copy()
    ro.flags.writeable = False
    expect_error(_C.compact, ro, values, idx, 4, 60)
    gc.collect()
    print("valgrind smoke: ok")


if __name__ == "__main__":
    main()
