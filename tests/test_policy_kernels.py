"""Selection-policy kernels (csrc/kernels/policy_*.c/.cu) against the float64 oracle rpc_py.policy_reference.

Every kernel is compared with the oracle and, on the CPU, with its plain C reference (`_*_scalar`,
`reference=True`) on fresh random inputs of awkward sizes: lengths 137 and 1000+, GQA 1/4/7, head dims
16/64/128, batch 3 with different left padding, 1/5/32 queries, every option combination. Kept sets
(RPC's select on the kernel's scores) must equal the oracle's on inputs drawn without near ties at the
cut-off. The same checks run on CUDA (marked `cuda`, skipped without a device).

Tolerances: the kernels compute in float32 from the input values, the oracle in float64 from the same
values, so float32 inputs get float32-level tolerances. For float16/bfloat16 inputs the tolerance is
twice the error that the same computation done by torch in that dtype makes (`lowp_attention` below),
as the project's rule for low-precision kernels; the float32 kernels are far inside it.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from rpc_py import KVCache, _C, ops
from rpc_py import policy_reference as P
from rpc_py.reference import compact_reference, select_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NORMS = ["candidates", "past", "causal"]
GQAS = ["mean_probs", "max_logits"]
REDUCES = ["sum", "mean"]
AGGS = ["all", "group"]
POOLINGS = [("avg", 1), ("avg", 5), ("max", 3)]


# ------------------------------------------------------------------------------------------ helpers


def stream_for(device):
    return torch.cuda.current_stream().cuda_stream if device == "cuda" else None


def as_t(x):
    """A result of rpc_py._C (NumPy array or View) as a float64 CPU torch tensor."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).double()
    return torch.from_dlpack(x).double().cpu()


def attn(q, k, start, end, *, device="cpu", scalar=False, **kw):
    """(pooled, raw) float64 CPU tensors from the kernel on `device` (or the CPU scalar reference)."""
    fn = _C._attn_scores_scalar if scalar else _C.attn_scores
    out = fn(q.to(device), k.to(device), start, end, stream=stream_for(device), raw=True, **kw)
    return as_t(out[0]), as_t(out[1])


def margin(scores, keep):
    """Smallest relative distance between the keep-th score of a row and any different score of that row
    (exact duplicates, such as max-pooling plateaus, are tie-broken by index on both sides)."""
    N = scores.shape[-1]
    if keep == 0 or keep == N:
        return math.inf
    rows = scores.reshape(-1, N)
    cut = rows.sort(dim=-1, descending=True).values[:, keep - 1 : keep]
    dist = (rows - cut).abs()
    dist[dist == 0] = math.inf
    return (dist.min(dim=-1).values / cut[:, 0].abs().clamp_min(1e-300)).min().item()


def assert_close_scaled(got, want, rtol):
    """|got - want| <= rtol * max|want| elementwise (scores are probabilities: a relative-to-max bound)."""
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:.1g} x {scale:.3g}"


def lowp_attention(q, k, start, end, *, query_positions, padding, norm, gqa, query_reduce, aggregation, dtype):
    """The oracle's steps done by torch in `dtype` (logits, masked softmax, sums): the 'low-precision torch
    computation' whose error sets the tolerance for 16-bit inputs. Returns raw scores [B, A, N] (float64)."""
    B, Hq, R, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    logits = torch.einsum("bkgrd,bknd->bkgrn", q.to(dtype).reshape(B, Hkv, G, R, D), k.to(dtype)) / math.sqrt(D)
    if gqa == "max_logits":
        logits = logits.amax(dim=2, keepdim=True)
    pos = torch.arange(L)
    allowed = torch.zeros(B, R, L, dtype=torch.bool)
    for b in range(B):
        for r in range(R):
            lo, hi = {"candidates": (start, end), "past": (padding[b], end),
                      "causal": (padding[b], query_positions[r] + 1)}[norm]
            allowed[b, r] = (pos >= lo) & (pos < hi)
    probs = torch.softmax(logits.masked_fill(~allowed[:, None, None], -math.inf), dim=-1)[..., start:end]
    probs = torch.nan_to_num(probs, nan=0.0)
    per_head = probs.sum(dim=3) if query_reduce == "sum" else probs.mean(dim=3)
    if gqa == "mean_probs":
        raw = per_head.reshape(B, Hq, -1).mean(dim=1, keepdim=True) if aggregation == "all" else per_head.mean(dim=2)
    else:
        raw = per_head[:, :, 0].mean(dim=1, keepdim=True) if aggregation == "all" else per_head[:, :, 0]
    return raw.double()


def draw_qk(seed, B, Hq, Hkv, R, D, L, dtype=torch.float32, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, R, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, L, D, generator=g) * spread).to(dtype)
    return q, k


# ------------------------------------------------------------------------------------- attn_scores

CASES = list(itertools.product(NORMS, GQAS, REDUCES, AGGS, POOLINGS))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,gqa,reduce,agg,pooling", CASES)
def test_attn_scores_every_option_matches_oracle(device, norm, gqa, reduce, agg, pooling):
    pool, ksize = pooling
    i = CASES.index((norm, gqa, reduce, agg, pooling))
    G, D, R = [1, 4, 7][i % 3], [16, 64, 128][(i // 3) % 3], [1, 5, 32][(i // 9) % 3]
    B, Hkv, L, W = 3, 2, 137, 9
    padding = [0, 5, 40]
    start, end = 11, L - W
    qpos = [L - R + r for r in range(R)]  # the window's queries sit at the last R key positions
    keep = (end - start) // 3
    kw = dict(query_positions=qpos, padding=padding, norm=norm, gqa=gqa, query_reduce=reduce, aggregation=agg,
              pooling=pool, kernel_size=ksize)
    for attempt in range(10):
        q, k = draw_qk(1000 * i + attempt, B, G * Hkv, Hkv, R, D, L)
        ref, ref_raw = P.window_attention_reference(q, k, start, end, **kw)
        if margin(ref, keep) > 1e-5:
            break
    else:
        pytest.skip("no draw without a near tie")
    impls = [dict(device=device)] + ([dict(scalar=True)] if device == "cpu" else [])
    for impl in impls:
        pooled, raw = attn(q, k, start, end, **impl, **kw)
        A = 1 if agg == "all" else Hkv
        assert pooled.shape == (B, A, end - start)
        assert_close_scaled(pooled, ref, 2e-6)
        assert_close_scaled(raw, ref_raw, 2e-6)
        kept = _C.select(pooled.float().numpy(), keep)
        np.testing.assert_array_equal(kept, select_reference(ref, keep).numpy())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,gqa,reduce,agg", [("causal", "mean_probs", "sum", "group"),
                                                 ("past", "max_logits", "mean", "group"),
                                                 ("candidates", "mean_probs", "sum", "all"),
                                                 ("causal", "max_logits", "sum", "all")])
def test_attn_scores_long_sequences(device, norm, gqa, reduce, agg):
    B, Hkv, G, R, D, L, W = 3, 2, 7, 32, 64, 1203, 32
    padding = [0, 17, 400]
    q, k = draw_qk(77, B, G * Hkv, Hkv, R, D, L)
    start, end = 20, L - W
    qpos = list(range(L - R, L))
    kw = dict(query_positions=qpos, padding=padding, norm=norm, gqa=gqa, query_reduce=reduce, aggregation=agg,
              pooling="max", kernel_size=7)
    ref, ref_raw = P.window_attention_reference(q, k, start, end, **kw)
    pooled, raw = attn(q, k, start, end, device=device, **kw)
    assert_close_scaled(pooled, ref, 2e-6)
    assert_close_scaled(raw, ref_raw, 2e-6)
    if device == "cpu":
        s_pooled, _ = attn(q, k, start, end, scalar=True, **kw)
        assert_close_scaled(pooled, s_pooled, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm,gqa", [("candidates", "mean_probs"), ("past", "max_logits"), ("causal", "mean_probs")])
def test_attn_scores_low_precision(device, dtype, norm, gqa):
    B, Hkv, G, R, D, L = 3, 2, 4, 5, 64, 300
    padding = [0, 3, 77]
    q, k = draw_qk(5, B, G * Hkv, Hkv, R, D, L, dtype=dtype)
    start, end = 9, L - 6
    qpos = list(range(L - R, L))
    kw = dict(query_positions=qpos, padding=padding, norm=norm, gqa=gqa, query_reduce="sum", aggregation="group")
    _, ref_raw = P.window_attention_reference(q, k, start, end, **kw)
    lowp = lowp_attention(q, k, start, end, dtype=dtype, **kw)
    tol = 2 * (lowp - ref_raw).abs().max().item()
    assert tol > 0
    impls = [dict(device=device)] + ([dict(scalar=True)] if device == "cpu" else [])
    for impl in impls:
        _, raw = attn(q, k, start, end, **impl, **kw)
        assert (raw - ref_raw).abs().max().item() <= tol
        # and in fact float32-accurate: the 16-bit values are exact in float32
        assert_close_scaled(raw, ref_raw, 2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_attn_scores_with_rpc_settings_agree_with_score(device, dtype, agg, pool):
    """norm='candidates', gqa='mean_probs', query_reduce='sum' is RPC's scoring: same numbers as _C.score
    to float tolerance, and the same kept set on well-separated inputs."""
    B, Hkv, G, R, D, L, W, prompt = 3, 2, 7, 32, 128, 1000, 32, 13
    start, end = prompt, L - W
    keep = 64
    for attempt in range(10):
        q, k = draw_qk(300 + attempt, B, G * Hkv, Hkv, R, D, L, dtype=dtype)
        ref, _ = P.window_attention_reference(q, k, start, end, aggregation=agg, pooling=pool, kernel_size=7)
        if margin(ref, keep) > 2e-5:
            break
    else:
        pytest.skip("no draw without a near tie")
    s = stream_for(device)
    rpc = as_t(_C.score(q.to(device), k.to(device), start, end, aggregation=agg, pooling=pool, kernel_size=7, stream=s))
    ours, _ = attn(q, k, start, end, device=device, aggregation=agg, pooling=pool, kernel_size=7)
    assert_close_scaled(ours, rpc, 2e-6)
    assert_close_scaled(ours, ref, 2e-6)
    got = _C.select(ours.float().numpy(), keep)
    np.testing.assert_array_equal(got, _C.select(rpc.float().numpy(), keep))
    np.testing.assert_array_equal(got, select_reference(ref, keep).numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_attn_scores_empty_and_degenerate_ranges(device):
    B, Hkv, G, R, D, L = 4, 1, 2, 4, 16, 60
    q, k = draw_qk(9, B, G * Hkv, Hkv, R, D, L)
    # sequence 1: padding covers some queries' causal range; 2: padding past every key; 3: past `end`
    padding = [0, 45, 60, 55]
    qpos = [-7, 10, 50, 10**12]  # before the cache, inside, inside, past the end (clamped to L)
    for norm in NORMS:
        for gqa in GQAS:
            kw = dict(query_positions=qpos, padding=padding, norm=norm, gqa=gqa, query_reduce="mean",
                      aggregation="group")
            ref, _ = P.window_attention_reference(q, k, 30, 50, **kw)
            got, _ = attn(q, k, 30, 50, device=device, **kw)
            assert_close_scaled(got, ref, 2e-6)
            if norm != "candidates":
                assert torch.count_nonzero(got[2]) == 0  # fully padded sequence: no key enters a softmax
            if device == "cpu":
                s, _ = attn(q, k, 30, 50, scalar=True, **kw)
                assert_close_scaled(s, ref, 2e-6)
    # a single candidate, a single key
    q1, k1 = draw_qk(3, 1, 2, 1, 1, 8, 1)
    for norm in NORMS:
        got, _ = attn(q1, k1, 0, 1, device=device, norm=norm, query_positions=[0])
        assert got.flatten().tolist() == [1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_attn_scores_nan_inf_keys_and_ties(device):
    """Keys holding NaN/inf give the oracle's answer (a query whose softmax is NaN contributes zero) and
    never crash; tied scores are selected by RPC's rule (lower index first)."""
    B, Hkv, G, R, D, L = 2, 2, 2, 3, 8, 40
    q, k = draw_qk(11, B, G * Hkv, Hkv, R, D, L)
    k[0, 0, 17, 3] = float("nan")
    k[1, 1, 5, :] = float("inf")
    k[1, 0, 20, :] = -float("inf")
    for norm in NORMS:
        for gqa in GQAS:
            kw = dict(query_positions=[37, 38, 39], norm=norm, gqa=gqa, aggregation="group")
            ref, _ = P.window_attention_reference(q, k, 3, 36, **kw)
            got, _ = attn(q, k, 3, 36, device=device, **kw)
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
            idx = _C.select(got.float().numpy(), 10)
            np.testing.assert_array_equal(idx, select_reference(got.float(), 10).numpy())
    # identical keys: every candidate ties; select keeps the lowest offsets
    kz = torch.ones(1, 1, 20, 8)
    got, _ = attn(torch.ones(1, 2, 2, 8), kz, 0, 20, device=device)
    assert torch.all(got == got[0, 0, 0])
    assert _C.select(got.float().numpy(), 4).tolist() == [[[0, 1, 2, 3]]]


def test_attn_scores_layouts_scale_and_position_types():
    B, Hkv, G, R, D, L = 2, 3, 2, 4, 20, 70
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, R, G * Hkv, D, generator=g).transpose(1, 2)  # head stride != R * D
    k = torch.randn(B, Hkv, D, 90, generator=g).transpose(2, 3)[:, :, :L]  # D stride != 1
    qpos = [60, 61, 62, 63]
    kw = dict(norm="causal", gqa="max_logits", query_reduce="mean", aggregation="all", padding=[2, 0])
    ref, _ = P.window_attention_reference(q, k, 5, 60, query_positions=qpos, **kw)
    for positions in (qpos, tuple(qpos), np.array(qpos), torch.tensor(qpos), range(60, 64)):
        got, _ = attn(q, k, 5, 60, query_positions=positions, **kw)
        assert_close_scaled(got, ref, 2e-6)
    got, _ = attn(q, k, 5, 60, query_positions=np.array(qpos), **{**kw, "padding": np.array([2, 0])})
    assert_close_scaled(got, ref, 2e-6)
    q0 = q[:, :, :1].expand(B, G * Hkv, R, D)  # zero stride
    ref0, _ = P.window_attention_reference(q0, k, 5, 60, query_positions=qpos, **kw)
    assert_close_scaled(attn(q0, k, 5, 60, query_positions=qpos, **kw)[0], ref0, 2e-6)
    # scale: the oracle uses 1/sqrt(D); scaling the queries instead must agree
    got, _ = attn(q, k, 5, 60, query_positions=qpos, scale=0.5 / math.sqrt(D), **kw)
    ref_half, _ = P.window_attention_reference(q * 0.5, k, 5, 60, query_positions=qpos, **kw)
    assert_close_scaled(got, ref_half, 2e-6)


def test_ops_wrappers_torch_and_numpy():
    B, Hkv, G, R, D, L = 2, 2, 2, 3, 16, 50
    q, k = draw_qk(1, B, G * Hkv, Hkv, R, D, L)
    ref, _ = P.window_attention_reference(q, k, 4, 44, query_positions=[47, 48, 49], norm="causal", padding=[0, 2])
    out = ops.attn_scores(q, k, 4, 44, query_positions=torch.tensor([47, 48, 49], dtype=torch.int32), norm="causal",
                          padding=np.array([0, 2], dtype=np.int32))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert_close_scaled(out.double(), ref, 2e-6)
    pooled, raw = ops.attn_scores(q.numpy(), k.numpy(), 4, 44, raw=True)
    assert isinstance(pooled, np.ndarray) and isinstance(raw, np.ndarray)
    red = ops.redundancy(k, padding=[0, 2])
    assert isinstance(red, torch.Tensor)
    assert_close_scaled(red.double(), P.redundancy_reference(k, padding=[0, 2]), 1e-5)
    f = ops.fill_scores("random", 2, 1, 7, seed=3, device=torch.device("cpu"))
    assert isinstance(f, torch.Tensor) and torch.equal(f.double(), P.random_scores_reference(2, 1, 7, seed=3, layer=0,
                                                                                             compression=0))
    assert isinstance(ops.fill_scores("recent", 1, 1, 4), np.ndarray)


# -------------------------------------------------------------------------------------- redundancy


def threshold_margin(k, padding, threshold):
    """How far from `threshold` the similarities that decide each row's newest near-duplicate lie (the
    newest column itself and every later one); a float32 kernel must not flip one of those comparisons."""
    B, Hkv, L, _ = k.shape
    best = math.inf
    for b in range(B):
        kd = k[b, :, padding[b]:].double()
        n = kd.shape[1]
        if n == 0:
            continue
        kn = kd / (kd.norm(dim=-1, keepdim=True) + 1e-8)
        sim = kn @ kn.transpose(-1, -2)
        sim.diagonal(dim1=-2, dim2=-1).zero_()
        newest = (torch.arange(n) * (sim > threshold)).amax(dim=-1)
        decisive = torch.arange(n)[None, None, :] >= newest[:, :, None]
        gap = torch.nan_to_num((sim - threshold).abs(), nan=math.inf)  # a NaN head is NaN whatever happens
        best = min(best, gap[decisive].min().item())
    return best


def draw_keys_with_duplicates(seed, B, Hkv, L, D, dtype, threshold, padding):
    """Random keys where a third are noisy copies of earlier keys (so the threshold rule matters), redrawn
    until the threshold decisions are not near ties."""
    for attempt in range(20):
        g = torch.Generator().manual_seed(seed * 100 + attempt)
        k = torch.randn(B, Hkv, L, D, generator=g)
        src = torch.randint(0, L, (B, Hkv, L), generator=g)
        dup = torch.rand(B, Hkv, L, generator=g) < 0.33
        copies = torch.gather(k, 2, src.unsqueeze(-1).expand(B, Hkv, L, D)) + 0.2 * torch.randn(B, Hkv, L, D, generator=g)
        k = torch.where(dup.unsqueeze(-1), copies, k).to(dtype)
        if threshold_margin(k, padding, threshold) > 1e-5:
            return k
    pytest.skip("no draw without a similarity at the threshold")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,D,Hkv", [(137, 16, 2), (137, 128, 1), (1000, 64, 2)])
@pytest.mark.parametrize("threshold", [0.5, 0.05, -0.3])
def test_redundancy_matches_oracle(device, dtype, L, D, Hkv, threshold):
    B = 3
    padding = [0, 7, L - 40]
    k = draw_keys_with_duplicates(L + D + Hkv, B, Hkv, L, D, dtype, threshold, padding)
    ref = P.redundancy_reference(k, padding=padding, threshold=threshold)
    got = as_t(_C.redundancy(k.to(device), padding=padding, threshold=threshold, stream=stream_for(device)))
    assert got.shape == (B, Hkv, L)
    assert_close_scaled(got, ref, 1e-5)
    for b, p in enumerate(padding):
        assert torch.count_nonzero(got[b, :, :p]) == 0
        torch.testing.assert_close(got[b, :, p:].sum(dim=-1), torch.ones(Hkv, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    if device == "cpu" and L <= 200:
        assert_close_scaled(as_t(_C._redundancy_scalar(k, padding=padding, threshold=threshold)), ref, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agg", AGGS)
def test_rkv_mixed_scores_keep_the_oracles_set(device, agg):
    """R-KV's full score, assembled from the two kernels the way the policy does, selects what the oracle
    selects."""
    B, Hkv, G, R, D, L, W = 3, 2, 4, 8, 64, 600, 8
    padding = [0, 11, 150]
    start, end, keep = 20, L - W, 100
    lam = 0.07
    for attempt in range(10):
        k = draw_keys_with_duplicates(40 + attempt, B, Hkv, L, D, torch.float32, 0.5, padding)
        q, _ = draw_qk(90 + attempt, B, G * Hkv, Hkv, R, D, 1)
        ref = P.rkv_scores_reference(q, k, start, end, padding=padding, mix_lambda=lam, aggregation=agg)
        if margin(ref, keep) > 2e-5:
            break
    else:
        pytest.skip("no draw without a near tie")
    imp, _ = attn(q, k, start, end, device=device, padding=padding, norm="past", gqa="max_logits", query_reduce="mean",
                  aggregation="group", pooling="max", kernel_size=7)
    red = as_t(_C.redundancy(k.to(device), padding=padding, stream=stream_for(device)))[:, :, start:end]
    mixed = lam * imp - (1 - lam) * red
    if agg == "all":
        mixed = mixed.mean(dim=1, keepdim=True)
    assert_close_scaled(mixed, ref, 1e-5)
    np.testing.assert_array_equal(_C.select(mixed.float().numpy(), keep), select_reference(ref, keep).numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_redundancy_degenerate_and_non_finite(device):
    g = torch.Generator().manual_seed(2)
    k = torch.randn(3, 2, 10, 8, generator=g)
    k[2, 1, 4, 0] = float("nan")
    padding = [9, 10, 0]  # one valid key; none; all valid (with a NaN in head 1)
    got = as_t(_C.redundancy(k.to(device), padding=padding, stream=stream_for(device)))
    ref = P.redundancy_reference(k, padding=padding)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert got[0, :, 9].tolist() == [1.0, 1.0] and torch.count_nonzero(got[1]) == 0
    assert torch.isnan(got[2, 1]).all() and not torch.isnan(got[2, 0]).any()
    # all keys identical: every row's newest duplicate is the last key, which is spared
    same = torch.ones(1, 1, 6, 4)
    got = as_t(_C.redundancy(same.to(device), stream=stream_for(device)))
    assert_close_scaled(got, P.redundancy_reference(same), 1e-6)
    assert got[0, 0, -1] < got[0, 0, 0]
    # empty shapes
    assert _C.redundancy(torch.zeros(0, 2, 5, 4)).shape == (0, 2, 5)
    assert _C.redundancy(torch.zeros(1, 2, 0, 4)).shape == (1, 2, 0)


# ------------------------------------------------------------------------------------ fill_scores


@pytest.mark.parametrize("device", DEVICES)
def test_fill_scores_bit_exact(device):
    dev = "cuda" if device == "cuda" else "cpu"
    s = stream_for(device)
    for seed, layer, comp in [(0, 0, 0), (1234, 5, 3), (-1, 27, 100), (2**64 + 7, 2**63, 2**70 - 1)]:
        got = as_t(_C.fill_scores("random", 3, 2, 137, seed=seed, layer=layer, compression=comp, device=dev, stream=s))
        want = P.random_scores_reference(3, 2, 137, seed=seed, layer=layer, compression=comp)
        assert torch.equal(got, want)
        assert got.min() >= 0 and got.max() < 1
    got = as_t(_C.fill_scores("recent", 2, 3, 1001, device=dev, stream=s))
    assert torch.equal(got, P.recent_scores_reference(2, 3, 1001))
    assert as_t(_C.fill_scores("random", 0, 3, 5, device=dev, stream=s)).shape == (0, 3, 5)
    assert as_t(_C.fill_scores("recent", 2, 3, 0, device=dev, stream=s)).shape == (2, 3, 0)
    # the newest are kept by `recent`; `random` keeps a seed-dependent set
    assert _C.select(_C.fill_scores("recent", 1, 1, 10), 3).tolist() == [[[7, 8, 9]]]


def test_fill_scores_are_uniform_and_seeded():
    a = _C.fill_scores("random", 4, 4, 5000, seed=1)
    b = _C.fill_scores("random", 4, 4, 5000, seed=2)
    assert not np.array_equal(a, b)
    assert abs(a.mean() - 0.5) < 0.01 and abs(a.var() - 1 / 12) < 0.005
    assert np.array_equal(a, _C.fill_scores("random", 4, 4, 5000, seed=1))


# --------------------------------------------------------------------------------- H2O accumulate


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,D,L", [(1, 16, 137), (4, 64, 1001), (7, 128, 300)])
def test_accumulate_kernel_matches_oracle(device, dtype, G, D, L):
    B, Hkv = 3, 2
    padding = [0, 9, L - 1]
    g = torch.Generator().manual_seed(G * L)
    q = torch.randn(B, G * Hkv, 1, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, L, D, generator=g) * 1.5).to(dtype)
    acc0 = torch.rand(B, Hkv, L, generator=g)
    want = P.h2o_accumulate_reference(acc0, q, k, padding=padding)
    impls = [dict()] + ([dict(reference=True)] if device == "cpu" else [])
    for impl in impls:
        acc = acc0.clone().to(device)
        _C._accumulate(q.to(device), k.to(device), acc, padding=padding, stream=stream_for(device), **impl)
        acc = acc.cpu()
        assert_close_scaled(acc.double(), want, 2e-6)
        for b, p in enumerate(padding):
            assert torch.equal(acc[b, :, :p], acc0[b, :, :p])  # padded positions untouched
        # the G probability rows of every KV head sum to G over the valid keys
        torch.testing.assert_close((acc - acc0).sum(-1).double(), torch.full((B, Hkv), float(G), dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)


def test_accumulate_kernel_nan_keys_and_errors():
    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 1, 12, 8)
    k[0, 0, 3, 0] = float("nan")
    acc = torch.zeros(1, 1, 12)
    _C._accumulate(q, k, acc)
    assert torch.equal(acc, P.h2o_accumulate_reference(torch.zeros(1, 1, 12), q, k).float())  # rows zeroed
    with pytest.raises(ValueError, match="acc"):
        _C._accumulate(q, k, torch.zeros(1, 1, 11))
    with pytest.raises(ValueError, match="acc"):
        _C._accumulate(q, k, torch.zeros(1, 1, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="acc"):
        _C._accumulate(q, k, torch.zeros(1, 1, 1).expand(1, 1, 12))
    with pytest.raises(ValueError, match="queries"):
        _C._accumulate(torch.randn(1, 2, 2, 8), k, acc)
    ro = np.zeros((1, 1, 12), np.float32)
    ro.flags.writeable = False
    with pytest.raises(BufferError, match="acc"):
        _C._accumulate(q, k, ro)


# ----------------------------------------------------------------------------------------- KVCache


def step_model(acc, q, keys, padding):
    """The accumulator a float32 cache must hold after one step: float32(acc + oracle probabilities)."""
    return P.h2o_accumulate_reference(acc, q, keys, padding=padding).float().double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("A_heads", [False, True])
def test_kvcache_accumulators_follow_appends_compactions_and_compress(device, dtype, A_heads):
    """A sequence of appends, accumulates, compact()s with chosen indices and RPC compress()es against a
    torch model: K/V by concatenation and compact_reference, the accumulator by the oracle step."""
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    B, H, G, D, W = 3, 2, 3, 16, 4
    padding = [0, 3, 9]
    cache = KVCache(2, B, H, D, dtype, window=W, accumulators=True)
    cache.set_padding(padding)
    s = stream_for(device)
    g = torch.Generator().manual_seed(7)
    K = (torch.randn(B, H, 20, D, generator=g)).to(tdt)
    V = torch.randn(B, H, 20, D, generator=g).to(tdt)
    cache.append(1, K.to(device), V.to(device), stream=s)
    acc = torch.zeros(B, H, 20, dtype=torch.float64)
    rng = np.random.default_rng(3)
    for step in range(60):
        k1 = torch.randn(B, H, 1, D, generator=g).to(tdt)
        v1 = torch.randn(B, H, 1, D, generator=g).to(tdt)
        cache.append(1, k1.to(device), v1.to(device), stream=s)
        K, V = torch.cat([K, k1], 2), torch.cat([V, v1], 2)
        acc = torch.cat([acc, torch.zeros(B, H, 1, dtype=torch.float64)], 2)
        q = torch.randn(B, G * H, 1, D, generator=g).to(tdt)
        cache.record_query(1, q.to(device), stream=s)
        cache.accumulate(1, q.to(device), stream=s)
        acc = step_model(acc, q, K, padding)
        L = K.shape[2]
        if step % 20 == 19:  # compact with chosen indices
            start = 12
            N = L - W - start
            A = H if A_heads else 1
            idx = torch.from_numpy(np.stack([np.sort(rng.choice(N, N // 2, replace=False)) for _ in range(B * A)]))
            idx = idx.reshape(B, A, N // 2)
            n = cache.compact(1, start, idx.to(device), stream=s)
            K, V = compact_reference(K, V, idx, start, L - W)
            a3, _ = compact_reference(acc.unsqueeze(-1), acc.unsqueeze(-1), idx, start, L - W)
            acc = a3.squeeze(-1)
            assert n == K.shape[2] == cache.length(1)
        elif step % 20 == 9:  # RPC compress: the accumulator follows its indices
            start, keep = 12, 8
            n, _, idx = cache.compress(1, start, keep, aggregation="group" if A_heads else "all", return_details=True,
                                       stream=s)
            idx = as_t(idx).long()
            K, V = compact_reference(K, V, idx, start, L - W)
            a3, _ = compact_reference(acc.unsqueeze(-1), acc.unsqueeze(-1), idx, start, L - W)
            acc = a3.squeeze(-1)
            assert n == K.shape[2]
        assert torch.equal(as_t(cache.keys(1)), K.double()) and torch.equal(as_t(cache.values(1)), V.double())
        got = as_t(cache.accumulator(1))
        assert got.shape == (B, H, K.shape[2])
        torch.testing.assert_close(got, acc, rtol=1e-5, atol=1e-5)
    # positions past the length are zero (tokens appended later start from 0)
    store = as_t(cache.accumulator(1))
    assert store.shape[2] == cache.length(1)
    cache.append(1, K[:, :, :1].to(device), V[:, :, :1].to(device), stream=s)
    assert torch.count_nonzero(as_t(cache.accumulator(1))[:, :, -1]) == 0
    assert cache.length(0) == 0 and as_t(cache.accumulator(0)).shape == (B, H, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_accumulator_growth_reset_and_nbytes(device):
    B, H, D = 2, 2, 8
    s = stream_for(device)
    plain = KVCache(1, B, H, D, window=2)
    cache = KVCache(1, B, H, D, window=2, accumulators=True)
    x = torch.randn(B, H, 200, D).to(device)
    plain.append(0, x, x, stream=s)
    cache.append(0, x, x, stream=s)
    cap = cache.capacity(0)
    assert cache.nbytes == plain.nbytes + B * H * cap * 4
    for _ in range(3):
        cache.accumulate(0, torch.randn(B, 2 * H, 1, D).to(device), stream=s)
    before = as_t(cache.accumulator(0)).clone()
    y = torch.randn(B, H, 300, D).to(device)
    cache.append(0, y, y, stream=s)  # grows
    assert cache.capacity(0) > cap and cache.generation(0) == 2
    after = as_t(cache.accumulator(0))
    assert torch.equal(after[:, :, :200], before) and torch.count_nonzero(after[:, :, 200:]) == 0
    assert cache.nbytes == B * H * cache.capacity(0) * (2 * D * 4 + 4)
    assert cache.peak_nbytes >= cache.nbytes
    cache.reset(stream=s)
    assert cache.length(0) == 0
    cache.append(0, y[:, :, :5], y[:, :, :5], stream=s)
    assert torch.count_nonzero(as_t(cache.accumulator(0))) == 0
    view = cache.accumulator(0)
    cache.close()
    assert as_t(view).shape == (B, H, 5)  # a view keeps its block alive after close
    with pytest.raises(ValueError, match="closed"):
        cache.accumulate(0, torch.randn(B, 2 * H, 1, D).to(device))
    with pytest.raises(ValueError, match="closed"):
        cache.accumulator(0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("per_head", [False, True])
def test_kvcache_compact_equals_reference(device, dtype, per_head):
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    B, H, D, W, L = 3, 4, 24, 7, 137
    s = stream_for(device)
    cache = KVCache(1, B, H, D, dtype, window=W)
    g = torch.Generator().manual_seed(5)
    K = torch.randn(B, H, L, D, generator=g).to(tdt)
    V = torch.randn(B, H, L, D, generator=g).to(tdt)
    cache.append(0, K.to(device), V.to(device), stream=s)
    start, end = 9, L - W
    A = H if per_head else 1
    idx = torch.stack([torch.randperm(end - start, generator=g)[:40].sort().values for _ in range(B * A)])
    idx = idx.reshape(B, A, 40)
    n = cache.compact(0, start, idx.to(device), stream=s)
    want_k, want_v = compact_reference(K, V, idx, start, end)
    assert n == start + 40 + W == cache.length(0)
    assert torch.equal(as_t(cache.keys(0)), want_k.double()) and torch.equal(as_t(cache.values(0)), want_v.double())
    if device == "cuda":
        assert torch.from_dlpack(cache.device_lengths(0)).tolist() == [n, L]
    # keep everything / nothing
    assert cache.compact(0, 0, torch.arange(n - W).reshape(1, 1, -1).expand(B, 1, n - W).contiguous().to(device),
                         stream=s) == n
    assert cache.compact(0, 5, torch.zeros(B, 1, 0, dtype=torch.int64).to(device), stream=s) == 5 + W
    assert torch.equal(as_t(cache.keys(0))[:, :, 5:], want_k[:, :, -W:].double())


def test_kvcache_compact_rejects_bad_indices_untouched():
    B, H, D, W, L = 2, 3, 8, 4, 40
    cache = KVCache(1, B, H, D, window=W, accumulators=True)
    K, V = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    cache.append(0, K, V)
    cache.accumulate(0, torch.randn(B, H, 1, D))
    acc0 = as_t(cache.accumulator(0)).clone()
    good = torch.tensor([[[0, 4, 9]], [[1, 2, 3]]])
    bad = [
        (good.int(), "indices"),
        (good.double(), "indices"),
        (good[0], "indices"),
        (torch.zeros(2, 2, 3, dtype=torch.int64), "indices"),
        (torch.zeros(3, 1, 3, dtype=torch.int64), "indices"),
        (torch.tensor([[[3, 2, 7]], [[1, 2, 3]]]), "indices"),
        (torch.tensor([[[3, 3, 7]], [[1, 2, 3]]]), "indices"),
        (torch.tensor([[[-1, 2, 7]], [[1, 2, 3]]]), "indices"),
        (torch.tensor([[[3, 4, 31]], [[1, 2, 3]]]), "indices"),  # N = 40 - 4 - 5 = 31
        (torch.zeros(2, 1, 32, dtype=torch.int64), "indices"),  # keep > N
        (torch.tensor([[[0, 0, 4, 0, 9, 0]], [[1, 0, 2, 0, 3, 0]]])[:, :, ::2], "indices"),  # last stride 2
        ([[[0, 1]]], "indices"),
    ]
    for idx, needle in bad:
        with pytest.raises((ValueError, TypeError), match=needle):
            cache.compact(0, 5, idx)
    for start in (-1, 37):
        with pytest.raises(ValueError, match="start"):
            cache.compact(0, start, good)
    with pytest.raises(IndexError, match="layer"):
        cache.compact(1, 5, good)
    assert cache.length(0) == L
    assert torch.equal(as_t(cache.keys(0)), K.double()) and torch.equal(as_t(cache.accumulator(0)), acc0)
    empty = KVCache(1, B, H, D, window=W)
    with pytest.raises(ValueError, match="no tokens"):
        empty.compact(0, 0, good)


def test_kvcache_ring_position_follows_record_query():
    B, Hq, H, D, W = 2, 4, 2, 8, 5
    cache = KVCache(1, B, H, D, window=W)
    assert cache.ring_position(0) == 0
    cache.append(0, torch.zeros(B, H, 1, D), torch.zeros(B, H, 1, D))
    history = []
    g = torch.Generator().manual_seed(1)
    for t in [1, 1, 3, 2, 7, 1, 4, 0, 5, 2]:
        q = torch.randn(B, Hq, t, D, generator=g)
        cache.record_query(0, q)
        history.extend(q.unbind(2))
        pos = cache.ring_position(0)
        ring = torch.from_dlpack(cache.queries(0))
        for i in range(min(len(history), W)):  # slot (pos - 1 - i) % W holds the i-th newest query
            assert torch.equal(ring[:, :, (pos - 1 - i) % W], history[-1 - i])
    assert cache.advance(0, 0, queries=3) == (1, (pos + 3) % W)
    assert cache.ring_position(0) == (pos + 3) % W
    cache.reset()
    assert cache.ring_position(0) == 0
    with pytest.raises(IndexError, match="layer"):
        cache.ring_position(3)


def test_kvcache_accumulate_errors():
    B, H, D = 2, 2, 8
    cache = KVCache(1, B, H, D, accumulators=True, q_heads=4)
    q = torch.randn(B, 4, 1, D)
    with pytest.raises(ValueError, match="no tokens"):
        cache.accumulate(0, q)
    cache.append(0, torch.randn(B, H, 5, D), torch.randn(B, H, 5, D))
    for bad, exc, needle in [
        (torch.randn(B, 4, 2, D), ValueError, "q"),
        (torch.randn(B, 2, 1, D), ValueError, "q"),  # q_heads fixed at 4
        (torch.randn(B, 4, 1, D).double(), ValueError, "q"),
        (torch.randn(B + 1, 4, 1, D), ValueError, "q"),
        (torch.randn(B, 4, 1, D + 1), ValueError, "q"),
        ("q", TypeError, "q"),
    ]:
        with pytest.raises(exc, match=needle):
            cache.accumulate(0, bad)
    for scale in (float("inf"), float("nan"), 1e39):
        with pytest.raises(ValueError, match="scale"):
            cache.accumulate(0, q, scale=scale)
    with pytest.raises(TypeError, match="scale"):
        cache.accumulate(0, q, scale="x")
    with pytest.raises(IndexError, match="layer"):
        cache.accumulate(1, q)
    assert torch.count_nonzero(as_t(cache.accumulator(0))) == 0  # nothing written on error
    cache.accumulate(0, q, scale=0.0)  # uniform attention: each valid key gets G / length
    torch.testing.assert_close(as_t(cache.accumulator(0)), torch.full((B, H, 5), 2 / 5, dtype=torch.float64))
    plain = KVCache(1, B, H, D)
    plain.append(0, torch.randn(B, H, 5, D), torch.randn(B, H, 5, D))
    with pytest.raises(ValueError, match="accumulators"):
        plain.accumulate(0, q)
    with pytest.raises(ValueError, match="accumulators"):
        plain.accumulator(0)
    assert plain.accumulators is False and cache.accumulators is True


# ------------------------------------------------------------------------------------------ errors


def _qk():
    return torch.randn(2, 4, 3, 8), torch.randn(2, 2, 30, 8)


@pytest.mark.parametrize("call,exc,needle", [
    (lambda q, k: _C.attn_scores(q, k, 0, 31), ValueError, "start, end"),
    (lambda q, k: _C.attn_scores(q, k, 5, 5), ValueError, "start, end"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, norm="full"), ValueError, "norm"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, gqa="sum"), ValueError, "gqa"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, query_reduce="max"), ValueError, "query_reduce"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, aggregation="none"), ValueError, "aggregation"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, pooling="min"), ValueError, "pooling"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, kernel_size=4), ValueError, "kernel_size"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, kernel_size=0), ValueError, "kernel_size"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, norm="causal"), ValueError, "query_positions"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, norm="causal", query_positions=[1, 2]), ValueError, "query_positions"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, norm="causal", query_positions=[1, 2, "x"]), TypeError,
     "query_positions"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, norm="causal", query_positions="abc"), TypeError, "query_positions"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, norm="causal", query_positions=np.zeros(3, np.float64)), ValueError,
     "query_positions"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, norm="causal", query_positions=[1, 2, 2**70]), ValueError,
     "query_positions"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, padding=[0]), ValueError, "padding"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, padding=[0, -1]), ValueError, "padding"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, padding=np.zeros((2, 1), np.int64)), ValueError, "padding"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, padding=5), TypeError, "padding"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, scale=float("inf")), ValueError, "scale"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, scale="x"), TypeError, "scale"),
    (lambda q, k: _C.attn_scores(q, k.double(), 0, 10), ValueError, "keys"),
    (lambda q, k: _C.attn_scores(q.double(), k.double(), 0, 10), ValueError, "queries"),
    (lambda q, k: _C.attn_scores(q, k.half(), 0, 10), ValueError, "keys"),
    (lambda q, k: _C.attn_scores(q, k[:, :, :, :4], 0, 10), ValueError, "keys"),
    (lambda q, k: _C.attn_scores(q[:, :3], k, 0, 10), ValueError, "keys"),
    (lambda q, k: _C.attn_scores(q[:, :, :0], k, 0, 10), ValueError, "queries"),
    (lambda q, k: _C.attn_scores(q[0], k, 0, 10), ValueError, "queries"),
    (lambda q, k: _C.attn_scores([1.0], k, 0, 10), TypeError, "queries"),
    (lambda q, k: _C.attn_scores(q, k, 0, 10, stream=-1), ValueError, "stream"),
    (lambda q, k: _C.redundancy(k.double()), ValueError, "keys"),
    (lambda q, k: _C.redundancy(k[0]), ValueError, "keys"),
    (lambda q, k: _C.redundancy(k[:, :, :, :0]), ValueError, "keys"),
    (lambda q, k: _C.redundancy(k, padding=[1, 2, 3]), ValueError, "padding"),
    (lambda q, k: _C.redundancy(k, padding=[1, -2]), ValueError, "padding"),
    (lambda q, k: _C.redundancy(k, threshold=float("nan")), ValueError, "threshold"),
    (lambda q, k: _C.redundancy(k, threshold="x"), TypeError, "threshold"),
    (lambda q, k: _C.redundancy("keys"), TypeError, "keys"),
    (lambda q, k: _C.fill_scores("top", 1, 1, 4), ValueError, "kind"),
    (lambda q, k: _C.fill_scores("random", -1, 1, 4), ValueError, "batch"),
    (lambda q, k: _C.fill_scores("random", 1, 1, -4), ValueError, "n"),
    (lambda q, k: _C.fill_scores("recent", 1, 1, 2**24 + 1), ValueError, "n"),
    (lambda q, k: _C.fill_scores("random", 2**40, 2**40, 2**40), ValueError, "sizes"),
    (lambda q, k: _C.fill_scores("random", 1, 1, 4, seed=1.5), TypeError, "seed"),
    (lambda q, k: _C.fill_scores("random", 1, 1, 4, layer="x"), TypeError, "layer"),
    (lambda q, k: _C.fill_scores("random", 1, 1, 4, compression=True), TypeError, "compression"),
    (lambda q, k: _C.fill_scores("random", 1, 1, 4, device="tpu"), ValueError, "device"),
    (lambda q, k: _C.fill_scores("random", 1, 1, 4, device=0), TypeError, "device"),
    (lambda q, k: _C._attn_scores_scalar(q, k, 0, 31), ValueError, "start, end"),
    (lambda q, k: _C._redundancy_scalar(k, padding=[0]), ValueError, "padding"),
])
def test_bad_inputs_raise_naming_the_argument(call, exc, needle):
    q, k = _qk()
    with pytest.raises(exc, match=needle):
        call(q, k)


def test_cuda_requests_without_a_device_raise_cleanly():
    if _C.cuda_built() and _C.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="device|CUDA"):
        _C.fill_scores("random", 1, 1, 4, device="cuda:0")


@pytest.mark.cuda
def test_cuda_positions_given_as_device_tensors():
    B, Hkv, G, R, D, L = 3, 2, 4, 5, 64, 200
    q, k = draw_qk(8, B, G * Hkv, Hkv, R, D, L)
    qpos = list(range(L - R, L))
    padding = [0, 7, 99]
    kw = dict(norm="causal", gqa="mean_probs", aggregation="group")
    ref, _ = P.window_attention_reference(q, k, 10, L - R, query_positions=qpos, padding=padding, **kw)
    got, _ = attn(q, k, 10, L - R, device="cuda", query_positions=torch.tensor(qpos, device="cuda"),
                  padding=torch.tensor(padding, device="cuda"), **kw)
    assert_close_scaled(got, ref, 2e-6)
    # CUDA inputs with a CPU position tensor: copied to the device
    got, _ = attn(q, k, 10, L - R, device="cuda", query_positions=torch.tensor(qpos), padding=np.array(padding), **kw)
    assert_close_scaled(got, ref, 2e-6)
    # a device tensor for CPU inputs is refused
    with pytest.raises(ValueError, match="query_positions"):
        _C.attn_scores(q, k, 10, L - R, query_positions=torch.tensor(qpos, device="cuda"), **kw)
    # unchecked device values are clamped, never out of bounds
    bad = torch.tensor([-(2**62), 2**62, -1, 10**9, 0], device="cuda")
    out, _ = attn(q, k, 10, L - R, device="cuda", query_positions=bad, padding=torch.tensor([0, -5, 10**9], device="cuda"),
                  **kw)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ one ISA dispatcher, one pooling


def _isas():
    best = _C._cpu_isa()
    order = ["generic", "avx2", "avx512"]
    return order[: order.index(best) + 1]


@pytest.mark.parametrize("isa", _isas())
def test_policy_kernels_follow_the_shared_isa_cap(isa):
    """rpc_cpu_set_isa (the one dispatcher, kernels/cpu_isa.c) caps the policy kernels too, so each of
    their paths is checked against the oracle on this machine."""
    best = _C._cpu_isa()
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 6, 5, 32, generator=g)
    k = torch.randn(2, 3, 137, 32, generator=g)
    try:
        assert _C._cpu_isa(isa) == isa
        got = torch.as_tensor(_C.attn_scores(q, k, 7, 130, query_positions=list(range(132, 137)), norm="causal",
                                             aggregation="group", pooling="avg", kernel_size=5))
        red = torch.as_tensor(_C.redundancy(k, threshold=0.3))
    finally:
        _C._cpu_isa(best)
    want = P.window_attention_reference(q, k, 7, 130, query_positions=list(range(132, 137)), norm="causal",
                                          aggregation="group", pooling="avg", kernel_size=5)[0]
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(red.double(), P.redundancy_reference(k, threshold=0.3), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_pool_alone_is_rpc_pooling(pooling, kernel_size):
    """_C.pool (used after a tensor-parallel reduction) equals the oracle's pooling of the same scores
    and the kernels' own pooled output from their raw scores."""
    from rpc_py.reference import _pool

    g = torch.Generator().manual_seed(kernel_size)
    raw = torch.rand(3, 2, 41, generator=g)
    raw[0, 1, 7] = float("nan")
    got = torch.as_tensor(_C.pool(raw, pooling, kernel_size))
    want = _pool(raw.double(), pooling, kernel_size).float()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert torch.equal(got[ok], want[ok])
    out = torch.empty_like(raw)
    assert _C.pool(raw, pooling, kernel_size, out=out) is out and torch.equal(out[ok], got[ok])
    q, k = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 60, 16, generator=g)
    pooled, unpooled = _C.attn_scores(q, k, 5, 55, pooling=pooling, kernel_size=kernel_size, raw=True)
    # the kernels pool their double-precision rows, the raw output is those rows rounded: within an ulp or two
    torch.testing.assert_close(torch.as_tensor(_C.pool(torch.as_tensor(unpooled), pooling, kernel_size)),
                               torch.as_tensor(pooled), rtol=4e-7, atol=0)
    with pytest.raises(ValueError, match="kernel_size"):
        _C.pool(raw, pooling, 4)
    with pytest.raises(ValueError, match="pooling"):
        _C.pool(raw, "median", 3)
    with pytest.raises(ValueError, match="must not be the scores"):
        _C.pool(raw, pooling, 3, out=raw)
