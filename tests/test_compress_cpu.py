"""CPU operator (rpc_py._C score/select/compact, rpc_py.ops) against the float64 oracle.

Kept index sets must equal the oracle's exactly on float32 inputs without near ties (the oracle's
relative gap between the keep-th and (keep+1)-th score is checked; draws with a gap < 1e-6 are
redrawn). Every fast-path instruction set this CPU supports is exercised, plus the scalar kernel.
"""

import numpy as np
import pytest
import torch

from rpc_py import _C, ops
from rpc_py.reference import compact_reference, score_reference, select_reference

def _supported_isas():
    best = _C._cpu_isa()
    order = ["generic", "avx2", "avx512"]
    return order[: order.index(best) + 1]


ISAS = _supported_isas()
BEST_ISA = ISAS[-1]


@pytest.fixture(params=ISAS + ["scalar"])
def scorer(request):
    """A score function using one kernel: a fast-path ISA, or the scalar reference kernel."""
    if request.param == "scalar":
        yield _C._score_scalar
        return
    _C._cpu_isa(request.param)
    try:
        yield _C.score
    finally:
        _C._cpu_isa(BEST_ISA)


def margin(pooled, keep):
    """Smallest relative distance between the oracle's keep-th score and any *different* score of its
    row. Exactly equal scores (max-pooling plateaus copy one value) are not near ties: the kernels
    copy the same value too, and both break the tie by index."""
    N = pooled.shape[-1]
    if keep == 0 or keep == N:
        return float("inf")
    rows = pooled.reshape(-1, N)
    cut = rows.sort(dim=-1, descending=True).values[:, keep - 1 : keep]
    dist = (rows - cut).abs()
    dist[dist == 0] = float("inf")
    return (dist.min(dim=-1).values / cut[:, 0].abs().clamp_min(1e-300)).min().item()


def draw(seed, B, Hq, Hkv, R, D, L, start, end, keep, agg, pool, ksize, dtype=torch.float32):
    """Random inputs whose oracle ranking has no near tie at the cut-off (redraws up to 20 times)."""
    for attempt in range(20):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        q = torch.randn(B, Hq, R, D, generator=g).to(dtype)
        k = (torch.randn(B, Hkv, L, D, generator=g) * 1.5).to(dtype)
        pooled, raw = score_reference(q, k, start, end, agg, pool, ksize)
        if margin(pooled, keep) >= 1e-6:
            return q, k, pooled, raw
    pytest.skip("could not draw inputs without a near tie")


AGGS = ["all", "group"]
POOLS = ["avg", "max"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("ksize", [1, 3, 7])
@pytest.mark.parametrize("G", [1, 4, 7])
def test_kept_sets_equal_oracle(scorer, agg, pool, ksize, G):
    B, Hkv, R, D, T, P, prompt = 3, 2, 4, 40, 8, 32, 5
    for n in range(6):
        keep, N = (n + 1) * T, n * T + P
        start, end = prompt, prompt + N
        L = end + R
        q, k, ref, ref_raw = draw(G * 100 + n + ksize * 10, B, G * Hkv, Hkv, R, D, L, start, end, keep, agg, pool,
                                  ksize)
        pooled, raw = scorer(q, k, start, end, aggregation=agg, pooling=pool, kernel_size=ksize, raw=True)
        A = 1 if agg == "all" else Hkv
        assert pooled.shape == (B, A, N) and pooled.dtype == np.float32
        scale = ref.abs().max().item()
        np.testing.assert_allclose(pooled, ref.numpy(), rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(raw, ref_raw.numpy(), rtol=1e-5, atol=1e-6 * scale)
        idx = _C.select(pooled, keep)
        assert idx.dtype == np.int64 and idx.shape == (B, A, keep)
        np.testing.assert_array_equal(idx, select_reference(ref, keep).numpy())


@pytest.mark.parametrize("agg", AGGS)
def test_awkward_length_137(scorer, agg):
    B, Hq, Hkv, R, D, prompt, N, keep = 3, 7, 1, 5, 72, 11, 137, 41
    L = prompt + N + R
    q, k, ref, _ = draw(137, B, Hq, Hkv, R, D, L, prompt, prompt + N, keep, agg, "avg", 7)
    pooled = scorer(q, k, prompt, prompt + N, aggregation=agg)
    np.testing.assert_allclose(pooled, ref.numpy(), rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    np.testing.assert_array_equal(_C.select(pooled, keep), select_reference(ref, keep).numpy())


def test_strided_and_broadcast_inputs(scorer):
    B, Hq, Hkv, R, D, L, cap = 2, 6, 3, 4, 20, 60, 80
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, R, Hq, D, generator=g).transpose(1, 2)  # head stride != R*D
    k_store = torch.randn(B, Hkv, D, cap, generator=g)
    k = k_store.transpose(2, 3)[:, :, :L]  # D stride != 1, capacity slice
    ref, _ = score_reference(q, k, 3, 50, "group", "max", 3)
    got = scorer(q, k, 3, 50, aggregation="group", pooling="max", kernel_size=3)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-7)
    q0 = torch.randn(1, Hq, 1, D, generator=g).expand(B, Hq, R, D)  # zero strides
    ref0, _ = score_reference(q0, k, 0, L, "all", "avg", 5)
    np.testing.assert_allclose(scorer(q0, k, 0, L, kernel_size=5), ref0.numpy(), rtol=1e-5, atol=1e-7)


def test_large_rows_use_several_tiles(scorer):
    # N larger than one logit row block per thread, and B * Hkv = 1 (rows split across threads).
    if scorer is _C._score_scalar:
        pytest.skip("the scalar kernel has no tiling")
    B, Hq, Hkv, R, D, N = 1, 5, 1, 7, 33, 9000
    q, k, ref, _ = draw(77, B, Hq, Hkv, R, D, N, 0, N, 1000, "all", "avg", 7)
    got = scorer(q, k, 0, N)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    np.testing.assert_array_equal(_C.select(got, 1000), select_reference(ref, 1000).numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGS)
def test_half_precision_inputs(dtype, agg):
    B, Hq, Hkv, R, D, prompt, N, keep = 2, 8, 2, 6, 64, 3, 120, 30
    L = prompt + N + R
    g = torch.Generator().manual_seed(21)
    q = torch.randn(B, Hq, R, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    ref, _ = score_reference(q, k, prompt, prompt + N, agg, "avg", 7)
    tol = 1e-5
    for fn in (_C.score, _C._score_scalar):
        pooled = fn(q, k, prompt, prompt + N, aggregation=agg)
        np.testing.assert_allclose(pooled, ref.numpy(), rtol=tol, atol=tol * ref.abs().max().item())
        got = _C.select(pooled, keep)
        want = select_reference(ref, keep).numpy()
        for b in range(B):
            for a in range(want.shape[1]):
                diff = set(got[b, a].tolist()) ^ set(want[b, a].tolist())
                if diff:  # only candidates whose oracle score sits at the cut-off may differ
                    row = ref[b, a]
                    cut = row.sort(descending=True).values[keep - 1].item()
                    for i in diff:
                        assert abs(row[i].item() - cut) <= 2 * tol * abs(cut)


def test_ops_wrappers_torch_roundtrip():
    B, Hq, Hkv, R, D, prompt, N, keep = 2, 4, 2, 3, 16, 4, 50, 12
    L = prompt + N + R
    q, k, ref, _ = draw(5, B, Hq, Hkv, R, D, L, prompt, prompt + N, keep, "group", "avg", 7)
    v = torch.randn(B, Hkv, L, D)
    pooled = ops.score(q, k, prompt, prompt + N, aggregation="group")
    assert isinstance(pooled, torch.Tensor) and pooled.dtype == torch.float32
    idx = ops.select(pooled, keep)
    assert isinstance(idx, torch.Tensor) and torch.equal(idx, select_reference(ref, keep))
    want_k, want_v = compact_reference(k, v, idx, prompt, prompt + N)
    k2, v2 = k.clone(), v.clone()
    new_len, idx2 = ops.compress(q, k2, v2, prompt, keep, R, aggregation="group")
    assert new_len == prompt + keep + R and torch.equal(idx2, idx)
    assert torch.equal(k2[:, :, :new_len], want_k) and torch.equal(v2[:, :, :new_len], want_v)
    # numpy in -> numpy out
    out = ops.score(q.numpy(), k.numpy(), prompt, prompt + N)
    assert isinstance(out, np.ndarray)


# ------------------------------------------------------------------------------------------ select

def test_select_ties_nan_and_edges():
    s = np.array([[[1.0, 3.0, 3.0, np.nan, 3.0, 2.0, -np.inf]]], dtype=np.float32)
    assert _C.select(s, 2).tolist() == [[[1, 2]]]
    assert _C.select(s, 4).tolist() == [[[1, 2, 4, 5]]]
    assert _C.select(s, 6).tolist() == [[[0, 1, 2, 4, 5, 6]]]
    assert _C.select(s, 7).tolist() == [[list(range(7))]]
    assert _C.select(s, 0).shape == (1, 1, 0)


@pytest.mark.parametrize("N", [1, 17, 500, 3001])
def test_select_random_with_ties(N):
    rng = np.random.default_rng(N)
    s = rng.integers(0, 7, size=(3, 2, N)).astype(np.float32)  # many exact ties
    s[0, 0, rng.integers(0, N)] = np.nan
    for keep in sorted({0, 1, N // 3, N - 1, N}):
        if keep < 0:
            continue
        np.testing.assert_array_equal(_C.select(s, keep), select_reference(torch.from_numpy(s), keep).numpy())
    # descending / ascending inputs (quickselect worst cases)
    for row in (np.arange(N, dtype=np.float32), np.arange(N, 0, -1).astype(np.float32)):
        x = np.broadcast_to(row, (1, 1, N)).copy()
        np.testing.assert_array_equal(_C.select(x, N // 2), select_reference(torch.from_numpy(x), N // 2).numpy())


def test_select_non_contiguous_scores():
    s = np.random.default_rng(0).standard_normal((4, 3, 50)).astype(np.float32)
    view = s.transpose(1, 0, 2)  # [3, 4, 50], not C-contiguous
    np.testing.assert_array_equal(_C.select(view, 9), select_reference(torch.from_numpy(view.copy()), 9).numpy())


# ----------------------------------------------------------------------------------------- compact

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True])
def test_compact_equals_gather(dtype, per_head):
    B, H, L, D, start, end, keep = 3, 4, 137, 24, 9, 120, 40
    g = torch.Generator().manual_seed(3)
    k = torch.randn(B, H, L, D, generator=g).to(dtype)
    v = torch.randn(B, H, L, D, generator=g).to(dtype)
    A = H if per_head else 1
    idx = torch.stack([torch.randperm(end - start, generator=g)[:keep].sort().values for _ in range(B * A)])
    idx = idx.reshape(B, A, keep)
    want_k, want_v = compact_reference(k, v, idx, start, end)
    k2, v2 = k.clone(), v.clone()
    new_len = _C.compact(k2, v2, idx, start, end)
    assert new_len == start + keep + (L - end)
    assert torch.equal(k2[:, :, :new_len], want_k) and torch.equal(v2[:, :, :new_len], want_v)


def test_compact_strided_storage_and_identity():
    # A capacity-padded cache: [B, H, cap, D] storage, compact the first L tokens.
    B, H, cap, L, D = 2, 3, 64, 50, 8
    store_k = torch.randn(B, H, cap, D)
    store_v = torch.randn(B, H, cap, D)
    k, v = store_k[:, :, :L], store_v[:, :, :L]
    idx = torch.arange(0, 30, 3).expand(B, 1, 10).contiguous()
    want_k, want_v = compact_reference(k.clone(), v.clone(), idx, 5, 35)
    tail = store_k[:, :, L:].clone()
    n = _C.compact(k, v, idx, 5, 35)
    assert torch.equal(store_k[:, :, :n], want_k) and torch.equal(store_v[:, :, :n], want_v)
    assert torch.equal(store_k[:, :, L:], tail)  # beyond L untouched
    # keep everything: nothing moves
    k0 = torch.randn(1, 1, 10, 4)
    before = k0.clone()
    assert _C.compact(k0, k0.clone(), torch.arange(8).reshape(1, 1, 8), 1, 9) == 10
    assert torch.equal(k0, before)


def test_compact_numpy_and_readonly():
    k = np.random.default_rng(1).standard_normal((1, 2, 20, 4)).astype(np.float32)
    v = k.copy() + 1
    idx = np.array([[[0, 2, 5]]], dtype=np.int64)
    want_k, want_v = compact_reference(torch.from_numpy(k.copy()), torch.from_numpy(v.copy()),
                                       torch.from_numpy(idx), 4, 16)
    n = _C.compact(k, v, idx, 4, 16)
    assert n == 4 + 3 + 4
    np.testing.assert_array_equal(k[:, :, :n], want_k.numpy())
    np.testing.assert_array_equal(v[:, :, :n], want_v.numpy())
    ro = k.copy()
    ro.flags.writeable = False
    with pytest.raises(BufferError, match="keys"):
        _C.compact(ro, v, idx, 4, 16)


# ------------------------------------------------------------------------------------------ errors

def _inputs():
    q = torch.randn(2, 4, 3, 8)
    k = torch.randn(2, 2, 30, 8)
    return q, k


@pytest.mark.parametrize("call,exc,needle", [
    (lambda q, k: _C.score(q, k, 0, 31), ValueError, "start, end"),
    (lambda q, k: _C.score(q, k, -1, 10), ValueError, "start, end"),
    (lambda q, k: _C.score(q, k, 10, 10), ValueError, "start, end"),
    (lambda q, k: _C.score(q, k, 0, 10, kernel_size=4), ValueError, "kernel_size"),
    (lambda q, k: _C.score(q, k, 0, 10, kernel_size=0), ValueError, "kernel_size"),
    (lambda q, k: _C.score(q, k, 0, 10, aggregation="none"), ValueError, "aggregation"),
    (lambda q, k: _C.score(q, k, 0, 10, pooling="min"), ValueError, "pooling"),
    (lambda q, k: _C.score(q, k.double(), 0, 10), ValueError, "keys"),
    (lambda q, k: _C.score(q.double(), k.double(), 0, 10), ValueError, "queries"),
    (lambda q, k: _C.score(q, k.half(), 0, 10), ValueError, "keys"),
    (lambda q, k: _C.score(q, k[:, :, :, :4], 0, 10), ValueError, "keys"),
    (lambda q, k: _C.score(q, k[:1], 0, 10), ValueError, "keys"),
    (lambda q, k: _C.score(q[:, :3], k, 0, 10), ValueError, "keys"),
    (lambda q, k: _C.score(q[0], k, 0, 10), ValueError, "queries"),
    (lambda q, k: _C.score([1, 2], k, 0, 10), TypeError, "queries"),
    (lambda q, k: _C.select(np.zeros((1, 1, 5), np.float32), 6), ValueError, "keep"),
    (lambda q, k: _C.select(np.zeros((1, 1, 5), np.float32), -1), ValueError, "keep"),
    (lambda q, k: _C.select(np.zeros((1, 1, 5), np.float64), 2), ValueError, "scores"),
    (lambda q, k: _C.select(np.zeros((1, 5), np.float32), 2), ValueError, "scores"),
])
def test_bad_inputs(call, exc, needle):
    q, k = _inputs()
    with pytest.raises(exc, match=needle):
        call(q, k)


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda k, v, i: (k, v, i.int(), 5, 20), ValueError, "indices"),
    (lambda k, v, i: (k, v, torch.zeros(2, 2, 3, dtype=torch.int64), 5, 20), ValueError, "indices"),
    (lambda k, v, i: (k, v, torch.tensor([[[3, 2, 7]], [[1, 2, 3]]]), 5, 20), ValueError, "indices"),
    (lambda k, v, i: (k, v, torch.tensor([[[3, 4, 15]], [[1, 2, 3]]]), 5, 20), ValueError, "indices"),
    (lambda k, v, i: (k, v, torch.tensor([[[-1, 4, 5]], [[1, 2, 3]]]), 5, 20), ValueError, "indices"),
    (lambda k, v, i: (k, v, i, 5, 41), ValueError, "start, end"),
    (lambda k, v, i: (k, v, i, 6, 5), ValueError, "start, end"),
    (lambda k, v, i: (k, v, i, 5, 7), ValueError, "indices"),  # keep > end - start
    (lambda k, v, i: (k, v.half(), i, 5, 20), ValueError, "values"),
    (lambda k, v, i: (k, v[:, :, :30], i, 5, 20), ValueError, "values"),
    (lambda k, v, i: (k, k, i, 5, 20), ValueError, "values"),
    (lambda k, v, i: (k.transpose(2, 3).contiguous().transpose(2, 3), v, i, 5, 20), ValueError, "keys"),
    (lambda k, v, i: (k.double(), v.double(), i, 5, 20), ValueError, "keys"),
    (lambda k, v, i: (k, v, i.unsqueeze(0), 5, 20), ValueError, "indices"),
])
def test_compact_bad_inputs(mutate, exc, needle):
    k = torch.randn(2, 3, 40, 8)
    v = torch.randn(2, 3, 40, 8)
    i = torch.tensor([[[0, 4, 9]], [[1, 2, 3]]])
    k0, v0 = k.clone(), v.clone()
    args = mutate(k, v, i)
    with pytest.raises(exc, match=needle):
        _C.compact(*args)
    assert torch.equal(k, k0) and torch.equal(v, v0)  # nothing touched on error


def test_error_messages_say_expected_and_got():
    q, k = _inputs()
    with pytest.raises(ValueError, match=r"keep: expected 0 <= keep <= 5.*got 6"):
        _C.select(np.zeros((1, 1, 5), np.float32), 6)
    with pytest.raises(ValueError, match=r"start, end: expected 0 <= start < end <= 30.*end=31"):
        _C.score(q, k, 0, 31)
