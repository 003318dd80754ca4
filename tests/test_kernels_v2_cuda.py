"""The v2 CUDA kernels against the torch oracles and against the v1 kernels, on awkward sizes.

* decode attention v2 (tensor cores, 16-key tiles per warp, query group padded to 16 rows): every
  GQA group size from 1 to past 16 (two row groups), head_dim 64/128/256, lengths that end inside,
  at and just past a tile, left padding (poisoned with NaN), NaN in the unused capacity, explicit
  split counts including more splits than tiles (empty CTAs), fp16 and bf16; the v1 kernel on the
  same inputs (version=1) as a second, independent implementation.
* scoring v2 (mma.sync, Q in registers): candidate counts around the 32-key tile, odd selector
  windows (query rows not a multiple of 16), several row groups per KV head, head dims that are
  multiples of 16 but not powers of two (ksteps < the register bound), strided queries; tight
  agreement with v1.
* compaction (column slices, 8 loads in flight per thread): few and many rows, word sizes 2..16
  bytes, keep 0 / N / N - 1, indices that leave long runs in place, many chunks.
* the per-device compression scratch shared by two streams.

The whole module skips without a CUDA device (tests/conftest.py); tolerances follow the decode and
scoring test files (kernels accumulate in float32; P is rounded to the input type for P V, as flash
attention does).
"""

import pytest
import torch

rpc_py = pytest.importorskip("rpc_py")

if not rpc_py.cuda_available() or not torch.cuda.is_available():
    pytest.skip("needs the CUDA backend of rpc_py and a CUDA device", allow_module_level=True)

from rpc_py import _C  # noqa: E402
from rpc_py.decode_reference import decode_attention_ref  # noqa: E402
from rpc_py.reference import compact_reference, score_reference  # noqa: E402

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda", torch.cuda.current_device())
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _stream():
    return torch.cuda.current_stream().cuda_stream


# ------------------------------------------------------------------------------------ decode attention


def _decode_case(B, Hq, Hkv, D, cap, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k = (2.0 * torch.randn(B, Hkv, cap, D, generator=g)).to(dtype)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    return q.to(DEV), k.to(DEV), v.to(DEV)


def _decode(q, k, v, length, padding=None, splits=0, version=0):
    B, Hq, _, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    s, n = _C.decode_workspace_size(B, Hq, Hkv, D, cap, splits)
    ws = torch.full((n,), float("nan"), dtype=torch.float32, device=DEV)  # nothing may read unwritten floats
    out = torch.full((B, 1, Hq, D), float("nan"), dtype=q.dtype, device=DEV).transpose(1, 2)
    lengths = torch.tensor([length, length], dtype=torch.int64, device=DEV)
    pad = None if padding is None else torch.as_tensor(padding, dtype=torch.int64, device=DEV)
    _C.decode_attention(q, k, v, out, lengths, padding=pad, workspace=ws, splits=s, stream=_stream(),
                        version=version)
    torch.cuda.synchronize()
    return out


def _check(out, ref, dtype):
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("D", [64, 128, 256], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("G", [1, 3, 7, 16, 20], ids=lambda g: f"G{g}")
def test_decode_v2_matches_oracle_and_v1(dtype, D, G):
    Hkv = 2
    q, k, v = _decode_case(3, Hkv * G, Hkv, D, 700, dtype, seed=G * 7 + D)
    padding = [0, 5, 333]
    for length in (1, 15, 16, 17, 137, 334, 700):
        ref = decode_attention_ref(q, k, v, length, padding)
        got = _decode(q, k, v, length, padding, version=2)
        _check(got, ref, dtype)
        v1 = _decode(q, k, v, length, padding, version=1)
        torch.testing.assert_close(got.float(), v1.float(), atol=2 * TOL[dtype], rtol=2 * TOL[dtype])


@pytest.mark.parametrize("splits", [1, 2, 3, 47, 1000], ids=lambda s: f"S{s}")
def test_decode_v2_split_counts_and_empty_ctas(splits):
    q, k, v = _decode_case(2, 28, 4, 128, 2100, torch.bfloat16, seed=splits)
    for length in (40, 1999, 2100):  # 1000 splits of at least 64 keys: most CTAs get nothing
        ref = decode_attention_ref(q, k, v, length, [0, 17])
        _check(_decode(q, k, v, length, [0, 17], splits=splits, version=2), ref, torch.bfloat16)


def test_decode_v2_never_reads_padding_or_unused_capacity():
    q, k, v = _decode_case(3, 14, 2, 128, 400, torch.bfloat16, seed=3)
    padding, length = [0, 31, 250], 260
    ref = decode_attention_ref(q, k, v, length, padding)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, length:] = float("nan")
    v2[:, :, length:] = float("nan")
    for b, p in enumerate(padding):
        k2[b, :, :p] = float("inf")
        v2[b, :, :p] = float("nan")
    _check(_decode(q, k2, v2, length, padding, version=2), ref, torch.bfloat16)
    # padding past the live length: zeros; length 0: zeros
    out = _decode(q, k, v, 100, [0, 0, 150], version=2)
    assert torch.count_nonzero(out[2]) == 0 and not torch.isnan(out).any()
    assert torch.count_nonzero(_decode(q, k, v, 0, version=2)) == 0


def test_decode_v2_long_and_strided_query():
    q, k, v = _decode_case(1, 28, 4, 128, 65536, torch.bfloat16, seed=11)
    qs = torch.empty(1, 1, 28, 128, dtype=q.dtype, device=DEV).transpose(1, 2)  # [B, Hq, 1, D] non-contiguous
    qs.copy_(q)
    ref = decode_attention_ref(q, k, v, 65536, dtype=torch.float32)
    _check(_decode(qs, k, v, 65536, version=2), ref, torch.bfloat16)


def test_decode_version_errors():
    q, k, v = _decode_case(1, 4, 2, 64, 64, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="version"):
        _decode(q.float(), k.float(), v.float(), 10, version=2)
    with pytest.raises(ValueError, match="version"):
        _decode(q, k, v, 10, version=3)


# --------------------------------------------------------------------------------------------- score

# (B, Hq, Hkv, R, D, L, start, end)
SCORE_V2 = [
    (2, 7, 1, 32, 128, 300, 0, 1),        # N = 1
    (2, 4, 2, 8, 64, 200, 3, 34),         # N = 31
    (2, 4, 2, 8, 64, 200, 3, 35),         # N = 32
    (2, 4, 2, 8, 64, 200, 3, 36),         # N = 33
    (3, 14, 2, 32, 128, 1200, 40, 1168),  # GQA 7 x R 32: 224 rows = 7 warps x 2 stripes
    (2, 6, 2, 17, 80, 400, 11, 370),      # odd R: 51 rows; D = 80 (5 of 8 register k-steps)
    (2, 16, 2, 64, 96, 700, 5, 650),      # 512 rows per KV head: two row groups; D = 96
    (1, 8, 1, 33, 256, 900, 0, 870),      # D = 256: one stripe per warp, 264 rows, two row groups
    (4, 28, 4, 32, 128, 4300, 128, 4268),  # R1-7B heads
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("aggregation", ["all", "group"])
@pytest.mark.parametrize("case", SCORE_V2, ids=lambda c: "B{}Hq{}Hkv{}R{}D{}N{}".format(*c[:5], c[7] - c[6]))
def test_score_v2_matches_oracle_and_v1(case, dtype, aggregation):
    B, Hq, Hkv, R, D, L, start, end = case
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(sum(case))
    q = (2.0 * torch.randn(B, Hq, R, D, generator=g)).to(dt).to(DEV)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dt).to(DEV)
    kw = dict(aggregation=aggregation, pooling="avg", kernel_size=7, stream=_stream(), raw=True)
    p2, r2 = (torch.from_dlpack(x) for x in _C.score(q, k, start, end, version=2, **kw))
    p1, r1 = (torch.from_dlpack(x) for x in _C.score(q, k, start, end, version=1, **kw))
    ref_p, ref_r = score_reference(q, k, start, end, aggregation, "avg", 7)
    atol = 1e-6 * R / (end - start) + 1e-9
    torch.testing.assert_close(r2.double(), ref_r, rtol=2e-5, atol=atol)
    torch.testing.assert_close(p2.double(), ref_p, rtol=2e-5, atol=atol)
    torch.testing.assert_close(r2, r1, rtol=1e-5, atol=atol)
    A = 1 if aggregation == "all" else Hkv
    torch.testing.assert_close(r2.double().sum(-1), torch.full((B, A), float(R), dtype=torch.float64, device=DEV),
                               rtol=1e-4, atol=0)


def test_score_v2_strided_queries_and_keys_in_a_bigger_cache():
    B, Hq, Hkv, R, D, L = 2, 12, 2, 16, 128, 900
    g = torch.Generator().manual_seed(5)
    q = (2.0 * torch.randn(B, R, Hq, D, generator=g)).to(torch.bfloat16).to(DEV).transpose(1, 2)
    big = torch.randn(B, Hkv, L + 100, D, generator=g).to(torch.bfloat16).to(DEV)
    k = big[:, :, :L]
    pooled = torch.from_dlpack(_C.score(q, k, 30, 860, aggregation="group", stream=_stream(), version=2))
    ref, _ = score_reference(q, k, 30, 860, "group", "avg", 7)
    torch.testing.assert_close(pooled.double(), ref, rtol=2e-5, atol=1e-6 * R / 830)


def test_score_v2_deterministic_and_version_errors():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 14, 32, 128, generator=g).to(torch.bfloat16).to(DEV)
    k = torch.randn(2, 2, 3000, 128, generator=g).to(torch.bfloat16).to(DEV)
    a = torch.from_dlpack(_C.score(q, k, 0, 2968, stream=_stream(), version=2)).clone()
    b = torch.from_dlpack(_C.score(q, k, 0, 2968, stream=_stream(), version=2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="v2"):
        _C.score(q.float(), k.float(), 0, 100, version=2)
    with pytest.raises(ValueError, match="v2"):
        _C.score(q[..., :24].contiguous(), k[..., :24].contiguous(), 0, 100, version=2)  # D % 16 != 0
    with pytest.raises(ValueError, match="version"):
        _C.score(q, k, 0, 100, version=5)


# ------------------------------------------------------------------------------------------- compact

# (B, H, L, D, dtype, start, end, keep, A)
COMPACT_V2 = [
    (1, 1, 3000, 128, torch.bfloat16, 7, 2968, 2000, 1),   # 1 row: 4 column slices per tensor
    (16, 8, 600, 128, torch.bfloat16, 0, 568, 300, 8),     # 128 rows: 1 slice
    (2, 2, 900, 256, torch.float32, 3, 870, 500, 2),       # 1 KiB rows
    (2, 3, 700, 3, torch.float16, 5, 690, 400, 1),         # 6-byte rows: 2-byte words
    (2, 2, 700, 6, torch.float16, 5, 690, 689 - 5, 2),     # keep = N - 1; 12-byte rows: 4-byte words
    (2, 2, 500, 64, torch.bfloat16, 10, 468, 0, 1),        # keep = 0: only the window moves
    (3, 2, 5000, 64, torch.bfloat16, 100, 4968, 4000, 1),  # many chunks
]


@pytest.mark.parametrize("case", COMPACT_V2, ids=lambda c: "B{}H{}L{}D{}{}keep{}".format(*c[:4], str(c[4])[6:], c[7]))
def test_compact_v2_matches_gather(case):
    B, H, L, D, dt, start, end, keep, A = case
    g = torch.Generator().manual_seed(L + keep)
    kbuf = torch.randn(B, H, L + 16, D, generator=g).to(dt).to(DEV)
    vbuf = torch.randn(B, H, L + 16, D, generator=g).to(dt).to(DEV)
    k, v = kbuf[:, :, :L], vbuf[:, :, :L]
    N = end - start
    rows = []
    for r in range(B * A):
        if r % 2 == 0 and keep > 0:  # long in-place runs at the start, then a jump
            head = torch.arange(keep // 2)
            tail = torch.sort(torch.randperm(N - keep // 2, generator=g)[: keep - keep // 2]).values + keep // 2
            rows.append(torch.cat([head, tail]))
        else:
            rows.append(torch.sort(torch.randperm(N, generator=g)[:keep]).values)
    idx = torch.stack(rows).reshape(B, A, keep).to(DEV)
    want_k, want_v = compact_reference(k.clone(), v.clone(), idx, start, end)
    spare = kbuf[:, :, L:].clone()
    n = _C.compact(k, v, idx, start, end, stream=_stream())
    assert n == start + keep + (L - end)
    assert torch.equal(k[:, :, :n], want_k) and torch.equal(v[:, :, :n], want_v)
    assert torch.equal(kbuf[:, :, L:], spare)


# ----------------------------------------------------------------------------------------- scratch


def test_compress_scratch_shared_by_two_streams():
    """Two layers of one cache compressed on two streams: the shared scratch is ordered by an event,
    so the result equals compressing both on one stream."""
    B, H, Hq, D, W, L = 2, 4, 28, 128, 32, 3000
    g = torch.Generator().manual_seed(4)
    k = [torch.randn(B, H, L, D, generator=g).to(torch.bfloat16).to(DEV) for _ in range(2)]
    v = [torch.randn(B, H, L, D, generator=g).to(torch.bfloat16).to(DEV) for _ in range(2)]
    q = [torch.randn(B, Hq, W, D, generator=g).to(torch.bfloat16).to(DEV) for _ in range(2)]

    def run(streams):
        kv = _C.KVCache(2, B, H, D, "bfloat16", capacity=L, window=W, q_heads=Hq)
        for i in range(2):
            s = streams[i].cuda_stream
            streams[i].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[i]):
                kv.append(i, k[i], v[i], stream=s)
                kv.record_query(i, q[i], stream=s)
        for i in range(2):
            with torch.cuda.stream(streams[i]):
                kv.compress(i, 64, 1000, stream=streams[i].cuda_stream)
        torch.cuda.synchronize()
        out = [torch.from_dlpack(kv.keys(i)).clone() for i in range(2)]
        kv.close()
        return out

    one = torch.cuda.Stream()
    a = run([one, one])
    b = run([torch.cuda.Stream(), torch.cuda.Stream()])
    assert a[0].shape[2] == 64 + 1000 + W
    assert all(torch.equal(x, y) for x, y in zip(a, b))
