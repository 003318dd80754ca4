"""CUDA kernels of one RPC compression (csrc/kernels/score_cuda.cu, select_cuda.cu, compact_cuda.cu) against the float64 torch oracle.

The whole module is skipped unless the CUDA backend is built and a device is usable. Inputs are
random with awkward sizes (odd lengths, head dims that are not multiples of 16, several row groups
per KV head, strided and transposed layouts) so that every path of the kernels runs.

Tolerances: the oracle (rpc_py.reference) computes in float64 from the very same input values, and
the kernels accumulate in float32 whatever the input dtype (16-bit products are exact in float32),
so scores must agree to float32 accuracy for every dtype. Kept sets are compared with "tie
semantics": a position may differ from the oracle's choice only if the oracle's score there is
within tolerance of the cutoff score. Selection alone is compared exactly, on identical scores.
"""

import math

import pytest

rpc_py = pytest.importorskip("rpc_py")
torch = pytest.importorskip("torch")

if not rpc_py.cuda_available() or not torch.cuda.is_available():
    pytest.skip("needs the CUDA backend of rpc_py and a CUDA device", allow_module_level=True)

from rpc_py import _C  # noqa: E402
from rpc_py.reference import (  # noqa: E402
    compact_reference,
    compress_reference,
    score_reference,
    select_reference,
)

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda", torch.cuda.current_device())
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _t(x):
    """A DLPack result of rpc_py (NumPy array or View) as a torch tensor."""
    return torch.from_dlpack(x)


def _score(q, k, start, end, **kw):
    pooled, raw = _C.score(q, k, start, end, stream=_stream(), raw=True, **kw)
    return _t(pooled), _t(raw)


def _select(scores, keep):
    return _t(_C.select(scores, keep, stream=_stream()))


def _assert_kept_equivalent(kept, ref_scores, keep, tol):
    """kept [B, A, keep] (any device) is a valid top-`keep` set of ref_scores [B, A, N] up to ties
    within `tol`: sorted ascending, distinct, and every position where it differs from the oracle's
    choice has an oracle score within tol of the oracle's cutoff."""
    kept = kept.cpu()
    ref_scores = ref_scores.double().cpu()
    assert kept.shape == ref_scores.shape[:2] + (keep,)
    if keep == 0:
        return
    assert bool((kept[..., 1:] > kept[..., :-1]).all()), "indices not strictly ascending"
    ref = select_reference(ref_scores, keep)
    cutoff = torch.sort(ref_scores, dim=-1, descending=True).values[..., keep - 1]
    B, A, _ = ref_scores.shape
    for b in range(B):
        for a in range(A):
            got, want = set(kept[b, a].tolist()), set(ref[b, a].tolist())
            for i in got ^ want:
                assert abs(ref_scores[b, a, i].item() - cutoff[b, a].item()) <= tol, (
                    f"row [{b}, {a}] index {i}: score {ref_scores[b, a, i].item():.9g} is not a near-tie "
                    f"of the cutoff {cutoff[b, a].item():.9g}"
                )


def _inputs(B, Hq, Hkv, R, D, L, dtype, seed, layout="contiguous"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Spread-out logits (scale 2) so that the softmax is neither flat nor one-hot.
    q = (2.0 * torch.randn(B, Hq, R, D, generator=g)).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    if layout == "strided":
        # queries as a model produces them ([B, R, Hq, D] transposed), keys inside a larger cache
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        big = torch.zeros(B, Hkv, L + 37, D, dtype=dtype)
        big[:, :, :L] = k
        k = big[:, :, :L]
    elif layout == "dstride":
        # head-dim stride != 1: keys stored [B, Hkv, D, L]
        k = k.transpose(2, 3).contiguous().transpose(2, 3)
    return q.to(DEV), k.to(DEV)


# (B, Hq, Hkv, R, D, L, start, end, kernel_size)
SCORE_CASES = [
    (3, 3, 3, 8, 64, 150, 5, 142, 1),        # G = 1, N = 137
    (3, 8, 2, 32, 128, 1040, 8, 1008, 3),    # G = 4, N = 1000
    (3, 14, 2, 32, 128, 4300, 12, 4268, 7),  # G = 7, N = 4256
    (2, 7, 1, 5, 80, 20, 3, 4, 7),           # N = 1, D not a multiple of 16
    (2, 6, 2, 17, 96, 60, 0, 33, 5),         # odd R
    (2, 16, 2, 64, 128, 330, 10, 310, 7),    # 512 query rows per KV head: several row groups
    (1, 4, 2, 16, 256, 520, 4, 504, 3),      # D = 256
    (2, 4, 4, 3, 3, 50, 1, 45, 3),           # odd tiny D: scalar staging everywhere
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("aggregation", ["all", "group"])
@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: "B{}Hq{}Hkv{}R{}D{}N{}k{}".format(*c[:5], c[7] - c[6], c[8]))
def test_score_matches_reference(case, dtype, aggregation, pooling):
    B, Hq, Hkv, R, D, L, start, end, ks = case
    q, k = _inputs(B, Hq, Hkv, R, D, L, DTYPES[dtype], seed=hash(case) % 1000)
    pooled, raw = _score(q, k, start, end, aggregation=aggregation, pooling=pooling, kernel_size=ks)
    ref_pooled, ref_raw = score_reference(q, k, start, end, aggregation, pooling, ks)
    A = 1 if aggregation == "all" else Hkv
    assert pooled.shape == (B, A, end - start) and pooled.dtype == torch.float32
    assert pooled.device == DEV
    # scores are sums of R probabilities averaged over heads: magnitude ~R/N
    atol = 1e-6 * R / (end - start) + 1e-9
    torch.testing.assert_close(raw.double(), ref_raw, rtol=2e-5, atol=atol)
    torch.testing.assert_close(pooled.double(), ref_pooled, rtol=2e-5, atol=atol)
    # probabilities sum to R per query head: the raw scores of a row sum to R
    torch.testing.assert_close(raw.double().sum(-1), torch.full((B, A), float(R), dtype=torch.float64, device=DEV),
                               rtol=1e-4, atol=0)
    keep = (end - start) // 3
    _assert_kept_equivalent(_select(pooled, keep), ref_pooled, keep, tol=4 * atol + 1e-5 * ref_pooled.abs().max().item())


@pytest.mark.parametrize("layout", ["strided", "dstride"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_score_strided_inputs(layout, dtype):
    B, Hq, Hkv, R, D, L = 2, 12, 2, 16, 64, 700
    q, k = _inputs(B, Hq, Hkv, R, D, L, DTYPES[dtype], seed=7, layout=layout)
    pooled, raw = _score(q, k, 20, 680, aggregation="group", pooling="avg", kernel_size=7)
    ref_pooled, ref_raw = score_reference(q, k, 20, 680, "group", "avg", 7)
    atol = 1e-6 * R / 660
    torch.testing.assert_close(raw.double(), ref_raw, rtol=2e-5, atol=atol)
    torch.testing.assert_close(pooled.double(), ref_pooled, rtol=2e-5, atol=atol)


def test_score_cpu_and_cuda_agree():
    B, Hq, Hkv, R, D, L = 3, 8, 2, 32, 128, 1100
    q, k = _inputs(B, Hq, Hkv, R, D, L, torch.float32, seed=11)
    for agg in ("all", "group"):
        gpu, _ = _score(q, k, 40, 1068, aggregation=agg, pooling="avg", kernel_size=7)
        cpu = _t(_C.score(q.cpu(), k.cpu(), 40, 1068, aggregation=agg, pooling="avg", kernel_size=7))
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(_select(gpu, 300).cpu(), _t(_C.select(gpu.cpu(), 300)))


def test_score_is_deterministic():
    q, k = _inputs(2, 14, 2, 32, 128, 3000, torch.bfloat16, seed=3)
    a, _ = _score(q, k, 0, 2968, aggregation="all", pooling="avg", kernel_size=7)
    b, _ = _score(q, k, 0, 2968, aggregation="all", pooling="avg", kernel_size=7)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- select

def _tricky_scores(rows, N, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randint(0, 7, (rows, N), generator=g).float() / 7  # many exact ties
    s[:, ::11] = torch.randn(rows, len(range(0, N, 11)), generator=g)
    if N > 5:
        s[:, 1] = float("nan")
        s[:, 2] = -0.0
        s[:, 3] = 0.0
        s[:, 4] = float("-inf")
        s[0, -1] = float("inf")
    return s


@pytest.mark.parametrize("N", [1, 2, 37, 1000, 4256, 65536, 100_003])
def test_select_exact(N):
    rows = 3 if N > 10_000 else 8
    s = _tricky_scores(rows, N, seed=N).reshape(rows, 1, N).to(DEV)
    for keep in sorted({0, 1, N // 4, N // 2, N - 1, N} - {-1}):
        got = _select(s, keep)
        want = select_reference(s.cpu(), keep)
        assert got.dtype == torch.int64 and got.shape == (rows, 1, keep)
        assert torch.equal(got.cpu(), want), f"N={N} keep={keep}"


def test_select_all_nan_and_all_equal():
    s = torch.full((2, 3, 500), float("nan"), device=DEV)
    s[1] = 0.25
    for keep in (0, 1, 250, 500):
        assert torch.equal(_select(s, keep).cpu(), select_reference(s.cpu(), keep))


def test_select_many_rows_cpu_agrees():
    s = torch.randn(64, 28, 300, device=DEV)
    s[:, :, ::3] = s[:, :, 1::3]  # ties across positions
    got = _select(s, 77)
    assert torch.equal(got.cpu(), _t(_C.select(s.cpu(), 77)))
    assert torch.equal(got.cpu(), select_reference(s.cpu(), 77))


# ------------------------------------------------------------------------------------------ compact

def _random_indices(B, A, N, keep, seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = [torch.sort(torch.randperm(N, generator=g)[:keep]).values for _ in range(B * A)]
    idx = torch.stack(rows).reshape(B, A, keep) if keep else torch.zeros(B, A, 0, dtype=torch.int64)
    return idx.to(device)


# (B, H, L, D, start, end, keep, A)
COMPACT_CASES = [
    (3, 4, 1200, 128, 10, 1168, 300, 1),
    (3, 4, 1200, 128, 10, 1168, 300, 4),
    (2, 3, 500, 80, 0, 468, 467, 3),     # keep = N - 1
    (2, 2, 300, 64, 5, 268, 0, 1),       # keep = 0: the window moves down
    (2, 2, 300, 64, 5, 268, 263, 2),     # keep = N: nothing moves
    (2, 2, 5000, 3, 7, 4990, 1000, 2),   # odd D: 2- or 4-byte copies
    (1, 1, 40, 256, 3, 40, 10, 1),       # empty window
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", COMPACT_CASES, ids=lambda c: "B{}H{}L{}D{}keep{}A{}".format(*c[:4], c[6], c[7]))
def test_compact_matches_gather(case, dtype):
    B, H, L, D, start, end, keep, A = case
    g = torch.Generator(device="cpu").manual_seed(L + keep)
    # a cache with spare capacity, as the KVCache stores it
    kbuf = torch.randn(B, H, L + 64, D, generator=g).to(DTYPES[dtype]).to(DEV)
    vbuf = torch.randn(B, H, L + 64, D, generator=g).to(DTYPES[dtype]).to(DEV)
    k, v = kbuf[:, :, :L], vbuf[:, :, :L]
    idx = _random_indices(B, A, end - start, keep, seed=keep, device=DEV)
    want_k, want_v = compact_reference(k.clone(), v.clone(), idx, start, end)
    spare_k, spare_v = kbuf[:, :, L:].clone(), vbuf[:, :, L:].clone()
    new_len = _C.compact(k, v, idx, start, end, stream=_stream())
    assert new_len == start + keep + (L - end) == want_k.shape[2]
    assert torch.equal(k[:, :, :new_len], want_k)
    assert torch.equal(v[:, :, :new_len], want_v)
    assert torch.equal(kbuf[:, :, L:], spare_k) and torch.equal(vbuf[:, :, L:], spare_v)  # nothing past L


def test_compact_cpu_and_cuda_agree():
    B, H, L, D, start, end, keep = 2, 4, 900, 128, 16, 868, 200
    k = torch.randn(B, H, L, D, dtype=torch.bfloat16)
    v = torch.randn(B, H, L, D, dtype=torch.bfloat16)
    idx = _random_indices(B, H, end - start, keep, seed=5, device="cpu")
    kc, vc = k.clone(), v.clone()
    kg, vg = k.to(DEV), v.to(DEV)
    n_cpu = _C.compact(kc, vc, idx, start, end)
    n_gpu = _C.compact(kg, vg, idx.to(DEV), start, end, stream=_stream())
    assert n_cpu == n_gpu
    assert torch.equal(kg[:, :, :n_gpu].cpu(), kc[:, :, :n_cpu])
    assert torch.equal(vg[:, :, :n_gpu].cpu(), vc[:, :, :n_cpu])


# ------------------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_compress_end_to_end(dtype, aggregation):
    B, Hq, Hkv, R, D, Lp, window = 3, 14, 2, 32, 128, 40, 32
    L = Lp + 1024 + window
    keep = 256
    q, k = _inputs(B, Hq, Hkv, R, D, L, DTYPES[dtype], seed=21)
    v = torch.randn(B, Hkv, L, D, device=DEV).to(DTYPES[dtype])
    end = L - window
    pooled, _ = _score(q, k, Lp, end, aggregation=aggregation, pooling="avg", kernel_size=7)
    idx = _select(pooled, keep)
    ref_k, ref_v, ref_idx, ref_scores = compress_reference(q, k, v, Lp, keep, window, aggregation, "avg", 7)
    _assert_kept_equivalent(idx, ref_scores, keep, tol=1e-5 * ref_scores.abs().max().item())
    # compaction of our own choice is bit-exact against a gather of it
    want_k, want_v = compact_reference(k.clone(), v.clone(), idx, Lp, end)
    new_len = _C.compact(k, v, idx, Lp, end, stream=_stream())
    assert new_len == Lp + keep + window
    assert torch.equal(k[:, :, :new_len], want_k) and torch.equal(v[:, :, :new_len], want_v)
    if torch.equal(idx, ref_idx.to(DEV)):
        assert torch.equal(k[:, :, :new_len], ref_k)


def test_runs_on_a_side_stream():
    q, k = _inputs(2, 8, 2, 32, 128, 2000, torch.bfloat16, seed=9)
    ref, _ = _score(q, k, 0, 1968, aggregation="all", pooling="avg", kernel_size=7)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got, _ = _score(q, k, 0, 1968, aggregation="all", pooling="avg", kernel_size=7)
        got = got.clone()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------- errors

def test_errors_on_bad_input():
    q, k = _inputs(2, 8, 2, 4, 64, 100, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="keys"):
        _C.score(q, k.float(), 0, 50)  # dtype mismatch
    with pytest.raises(ValueError):
        _C.score(q, k.cpu(), 0, 50)  # device mismatch
    with pytest.raises(ValueError, match="start"):
        _C.score(q, k, 60, 50)
    with pytest.raises(ValueError, match="kernel_size"):
        _C.score(q, k, 0, 50, kernel_size=4)
    s = torch.randn(2, 1, 30, device=DEV)
    with pytest.raises(ValueError, match="keep"):
        _C.select(s, 31)
    kk = torch.randn(1, 2, 50, 8, device=DEV)
    vv = torch.randn(1, 2, 50, 8, device=DEV)
    idx = torch.arange(10, device=DEV).reshape(1, 1, 10)
    with pytest.raises(ValueError):
        _C.compact(kk.transpose(2, 3).contiguous().transpose(2, 3), vv, idx, 0, 40)  # D stride != 1
    with pytest.raises(ValueError):
        _C.compact(kk, vv, idx, 0, 5)  # keep > end - start


def test_large_head_dim_is_an_error_not_a_crash():
    # D = 4096 float32 does not fit the scoring kernel's shared memory: a clean ValueError
    q = torch.randn(1, 1, 2, 4096, device=DEV)
    k = torch.randn(1, 1, 40, 4096, device=DEV)
    with pytest.raises(ValueError, match="head dim"):
        _C.score(q, k, 0, 40)
    assert math.isfinite(float(torch.ones(1, device=DEV).sum()))  # the context is still usable
