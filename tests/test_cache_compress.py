"""KVCache.compress end to end against rpc_py.reference.compress_reference.

The cache is filled the way the HF integration fills it (prompt, then generated tokens in small
appends, queries recorded into the ring), compressed, and its keys/values, lengths and returned
details compared with the float64 oracle run on the same keys and the last `window` queries.
"""

import numpy as np
import pytest
import torch

from rpc_py import KVCache
from rpc_py.reference import compress_reference, select_reference


def as_torch(view):
    return torch.from_dlpack(view)


def cut_margin(pooled, keep):
    """Relative distance from the keep-th oracle score to the nearest different score (see
    test_compress_cpu.margin)."""
    N = pooled.shape[-1]
    if keep == 0 or keep == N:
        return float("inf")
    rows = pooled.reshape(-1, N)
    cut = rows.sort(dim=-1, descending=True).values[:, keep - 1 : keep]
    dist = (rows - cut).abs()
    dist[dist == 0] = float("inf")
    return (dist.min(dim=-1).values / cut[:, 0].abs()).min().item()


class Filler:
    """Appends random K/V and records random queries, remembering every query in order."""

    def __init__(self, cache, layers, B, Hq, Hkv, D, dtype, seed):
        self.cache, self.layers = cache, layers
        self.shape = (B, Hq, Hkv, D)
        self.dtype = dtype
        self.g = torch.Generator().manual_seed(seed)
        self.queries = {layer: [] for layer in range(layers)}

    def step(self, t):
        B, Hq, Hkv, D = self.shape
        for layer in range(self.layers):
            k = torch.randn(B, Hkv, t, D, generator=self.g).to(self.dtype)
            v = torch.randn(B, Hkv, t, D, generator=self.g).to(self.dtype)
            q = torch.randn(B, Hq, t, D, generator=self.g).to(self.dtype)
            self.cache.append(layer, k, v)
            self.cache.record_query(layer, q)
            self.queries[layer].append(q)

    def last_queries(self, layer, R):
        return torch.cat(self.queries[layer], dim=2)[:, :, -R:]


@pytest.mark.parametrize("dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
@pytest.mark.parametrize("agg", ["all", "group"])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_compress_matches_reference_over_two_cycles(dtype, name, agg, pool):
    B, Hq, Hkv, D, R, Lp, P, T = 3, 8, 2, 32, 6, 9, 40, 10
    for seed in range(10):
        cache = KVCache(2, B, Hkv, D, name, window=R, q_heads=Hq)
        cache.set_padding([0, 4, 7])  # metadata only: candidates exclude the prompt
        fill = Filler(cache, 2, B, Hq, Hkv, D, dtype, seed)
        fill.step(Lp)
        ok = True
        for n in range(2):
            for _ in range((P + R if n == 0 else P) // 2):
                fill.step(2)
            L = cache.length(0)
            assert L == Lp + n * T + P + R
            keys, values = as_torch(cache.keys(0)).clone(), as_torch(cache.values(0)).clone()
            other = as_torch(cache.keys(1)).clone()
            q = fill.last_queries(0, R)
            keep = (n + 1) * T
            want_k, want_v, want_idx, want_scores = compress_reference(q, keys, values, Lp, keep, R, agg, pool, 7)
            if cut_margin(want_scores, keep) < 1e-6:
                ok = False
                break
            seen = cache.seen(0)
            new_len, scores, idx = cache.compress(0, Lp, keep, aggregation=agg, pooling=pool, return_details=True)
            assert new_len == Lp + keep + R == cache.length(0)
            assert cache.seen(0) == seen  # logical positions are not lowered
            A = 1 if agg == "all" else Hkv
            assert isinstance(scores, np.ndarray) and scores.shape == (B, A, L - R - Lp)
            assert idx.dtype == np.int64 and idx.shape == (B, A, keep)
            np.testing.assert_allclose(scores, want_scores.numpy(), rtol=1e-5,
                                       atol=1e-6 * want_scores.abs().max().item())
            np.testing.assert_array_equal(idx, want_idx.numpy())
            assert torch.equal(as_torch(cache.keys(0)), want_k)
            assert torch.equal(as_torch(cache.values(0)), want_v)
            assert torch.equal(as_torch(cache.keys(1)), other)  # other layers untouched
            # keep layer 1 in step with the schedule too
            cache.compress(1, Lp, keep, aggregation=agg, pooling=pool)
        if ok:
            return
    pytest.skip("could not draw inputs without a near tie")


def test_padding_does_not_change_selection():
    B, Hq, Hkv, D, R, Lp = 3, 4, 2, 16, 4, 12
    results = []
    for padding in ([0, 0, 0], [0, 5, 11]):
        cache = KVCache(1, B, Hkv, D, "float32", window=R, q_heads=Hq)
        cache.set_padding(padding)
        fill = Filler(cache, 1, B, Hq, Hkv, D, torch.float32, 123)
        fill.step(Lp)
        for _ in range(10):
            fill.step(5)
        n, scores, idx = cache.compress(0, Lp, 17, return_details=True)
        results.append((n, scores, idx, as_torch(cache.keys(0)).clone()))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])
    assert torch.equal(results[0][3], results[1][3])


def test_ring_order_is_irrelevant_and_queries_match():
    # The ring wraps (more queries recorded than `window`): scores only depend on the set of queries.
    B, Hq, Hkv, D, R, Lp = 2, 6, 3, 8, 5, 4
    cache = KVCache(1, B, Hkv, D, "float32", window=R, q_heads=Hq)
    fill = Filler(cache, 1, B, Hq, Hkv, D, torch.float32, 7)
    fill.step(Lp)
    for t in (3, 1, 4, 1, 5, 9, 2):
        fill.step(t)
    ring = as_torch(cache.queries(0))
    want = fill.last_queries(0, R)
    # same set of query vectors per (b, h), in some order: sort both by their first coordinate
    def by_first(x):
        return torch.gather(x, 2, x[..., :1].argsort(dim=2).expand_as(x))
    assert torch.equal(by_first(ring), by_first(want))
    keys = as_torch(cache.keys(0)).clone()
    values = as_torch(cache.values(0)).clone()
    want_k, _, want_idx, pooled = compress_reference(want, keys, values, Lp, 8, R, "group")
    n, scores, idx = cache.compress(0, Lp, 8, aggregation="group", return_details=True)
    np.testing.assert_array_equal(idx, select_reference(pooled, 8).numpy())
    assert torch.equal(as_torch(cache.keys(0)), want_k)
