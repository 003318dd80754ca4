"""rpc_py.torch_kernels (the pure-torch fallback of every kernel family) against the float64 oracles.

Scores are compared with rpc_py.reference / rpc_py.policy_reference on awkward sizes (B=3, Hq=6,
Hkv=2 or 3, D=20 or 64, L=137, R=5, start=7), every option value, padding with a different count per
sequence and causal query positions. The fallback computes in float32 from the input values and the
oracle in float64 from the same (already rounded) values, so every dtype gets float32-level
tolerances: rtol 1e-5, atol 1e-6. Selection, the random fill and compaction must be bit-identical to
the C kernels (and the oracle). A few results are also checked against the C CPU kernels.

The same checks run on CUDA when a device is present (marked ``cuda``), including one that turns on
torch's sync debug mode to prove the functions never synchronize with the host.
"""

import ast
import inspect
import math

import numpy as np
import pytest
import torch

from rpc_py import _C
from rpc_py import policy_reference as P
from rpc_py import reference as R
from rpc_py import torch_kernels as T

_cuda_ok = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not _cuda_ok, reason="needs torch.cuda")])]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, HQ, RQ, L, START = 3, 6, 5, 137, 7
END = L - 9
PADDING = [0, 4, 61]  # the last one reaches past START: its "past"/"causal" ranges start inside the candidates


# ------------------------------------------------------------------------------------------ helpers


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_qk(seed, dtype=torch.float32, hkv=2, D=20, strided=True, Lk=L, hq=HQ, rq=RQ, bsz=B):
    """Queries [B, Hq, R, D] and keys [B, Hkv, L, D] in ``dtype``; strided keys are a transposed view."""
    g = gen(seed)
    q = torch.randn(bsz, hq, rq, D, generator=g).to(dtype)
    if strided:
        k = torch.randn(bsz, Lk, hkv, D, generator=g).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(bsz, hkv, Lk, D, generator=g).to(dtype)
    return q, k


def close(got, want, rtol=1e-5, atol=1e-6):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=rtol, atol=atol)


def dev_vec(values, device):
    return torch.tensor(values, dtype=torch.int64).to(device)


# ------------------------------------------------------------------------------------------- score


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", ["all", "group"])
@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_score_matches_oracle(device, dtype, aggregation, pooling, kernel_size):
    hkv = 2 if aggregation == "all" else 3
    D = 20 if dtype == torch.float32 else 64
    q, k = make_qk(kernel_size * 10 + len(pooling), dtype, hkv=hkv, D=D)
    want, want_raw = R.score_reference(q, k, START, END, aggregation, pooling, kernel_size)
    got, got_raw = T.score(q.to(device), k.to(device), START, END, aggregation=aggregation, pooling=pooling,
                           kernel_size=kernel_size, raw=True)
    assert got.shape == (B, 1 if aggregation == "all" else hkv, END - START)
    assert got.device.type == device
    close(got, want)
    close(got_raw, want_raw)


def test_score_against_c_kernel():
    for dtype, agg, pool, ks in [(torch.float32, "all", "avg", 7), (torch.float16, "group", "max", 3),
                                 (torch.bfloat16, "all", "max", 1)]:
        q, k = make_qk(5, dtype, hkv=3, D=64)
        got = T.score(q, k, START, END, aggregation=agg, pooling=pool, kernel_size=ks)
        want = torch.as_tensor(_C.score(q, k.contiguous(), START, END, aggregation=agg, pooling=pool, kernel_size=ks))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- attn_scores


OPTION_GRID = [(n, g, r, a) for n in ("candidates", "past", "causal") for g in ("mean_probs", "max_logits")
               for r in ("sum", "mean") for a in ("all", "group")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,gqa,query_reduce,aggregation", OPTION_GRID)
def test_attn_scores_matches_oracle(device, norm, gqa, query_reduce, aggregation):
    qpos = [L - RQ + r for r in range(RQ)]  # the window queries, each at its own key
    for i, dtype in enumerate(DTYPES):
        pooling, kernel_size = [("avg", 1), ("avg", 7), ("max", 3)][i]
        hkv = [2, 3, 1][i]
        q, k = make_qk(100 + i, dtype, hkv=hkv, D=[20, 64, 20][i], strided=i != 1)
        opts = dict(norm=norm, gqa=gqa, query_reduce=query_reduce, aggregation=aggregation, pooling=pooling,
                    kernel_size=kernel_size)
        want, want_raw = P.window_attention_reference(q, k, START, END, query_positions=qpos, padding=PADDING, **opts)
        # padding / query_positions as lists on the CPU, as int64 tensors on the device
        pads = PADDING if device == "cpu" else dev_vec(PADDING, device)
        pos = qpos if device == "cpu" else dev_vec(qpos, device)
        got, got_raw = T.attn_scores(q.to(device), k.to(device), START, END, query_positions=pos, padding=pads,
                                     raw=True, **opts)
        close(got, want)
        close(got_raw, want_raw)


def test_attn_scores_padding_and_positions_as_tensors_and_without_padding():
    q, k = make_qk(7)
    qpos = [130, 20, 136, 70, 100]
    for norm in ("past", "causal"):
        want = P.window_attention_reference(q, k, START, END, query_positions=qpos, norm=norm)[0]
        close(T.attn_scores(q, k, START, END, query_positions=qpos, norm=norm), want)
        want = P.window_attention_reference(q, k, START, END, query_positions=qpos, padding=PADDING, norm=norm)[0]
        got = T.attn_scores(q, k, START, END, query_positions=torch.tensor(qpos), padding=np.array(PADDING),
                            norm=norm)
        close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_attn_scores_empty_and_clamped_ranges(device):
    """Padding past the candidates or past L, negative and huge query positions: ranges are clamped
    into [0, L]; a query with an empty range contributes nothing."""
    q, k = make_qk(11)
    padding = [0, 120, 500]  # 120 > END: "past" is empty for sequence 1; 500 > L: everything empty
    qpos = [-5, 0, 2**63 - 1, 136, 3]  # qpos + 1 would overflow
    want_qpos = [-5, 0, L + 10, 136, 3]  # the oracle has no overflow to worry about
    for norm in ("past", "causal"):
        for gqa in ("mean_probs", "max_logits"):
            opts = dict(norm=norm, gqa=gqa, aggregation="group", pooling="max", kernel_size=3)
            want = P.window_attention_reference(q, k, START, END, query_positions=want_qpos, padding=padding,
                                                **opts)[0]
            got = T.attn_scores(q.to(device), k.to(device), START, END, query_positions=dev_vec(qpos, device),
                                padding=dev_vec(padding, device), **opts)
            close(got, want)
            assert torch.all(got[2].cpu() == 0)
            c = torch.as_tensor(_C.attn_scores(q, k, START, END, query_positions=qpos, padding=padding, **opts))
            torch.testing.assert_close(got.cpu(), c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_attn_scores_nan_and_inf_logits_contribute_nothing(device):
    """Rows whose logits in range hold NaN or +inf, or are all -inf, add zero (the oracle's softmax is NaN
    there and it zeroes NaN); NaN/inf outside a row's range do not matter to it."""
    q, k = make_qk(13, D=20)
    k = k.contiguous()
    k[0, 0, 40, 3] = float("nan")  # a candidate: every row of (b=0, kv 0) is skipped
    k[1, 1, 2, 0] = float("inf")  # before the candidates: only "past"/"causal" rows see it
    q[1, :, :, 0] = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0])  # +inf, -inf, NaN, +inf, -inf logits
    # a causal row whose range is the single key 10, at -inf
    q[2, :, 4, 1] = 1.0
    k[2, :, 10, 1] = -float("inf")
    qpos = [130, 100, 136, 60, 10]
    padding = [0, 0, 10]
    for norm in ("candidates", "past", "causal"):
        for gqa in ("mean_probs", "max_logits"):
            opts = dict(norm=norm, gqa=gqa, aggregation="group", kernel_size=1)
            want = P.window_attention_reference(q, k, START, END, query_positions=qpos, padding=padding, **opts)[0]
            got = T.attn_scores(q.to(device), k.to(device), START, END, query_positions=dev_vec(qpos, device),
                                padding=dev_vec(padding, device), **opts)
            assert not torch.isnan(got).any()
            close(got, want)
            c = torch.as_tensor(_C.attn_scores(q, k, START, END, query_positions=qpos, padding=padding, **opts))
            torch.testing.assert_close(got.cpu(), c, rtol=1e-5, atol=1e-6)
    # score uses the same rule: kv head 0 of sequence 0 is all NaN-skipped, so its group row is 0
    got = T.score(q, k, START, END, aggregation="group", kernel_size=1)
    assert torch.all(got[0, 0] == 0) and torch.all(got[0, 1] > 0)


def test_attn_scores_against_c_kernel_with_scale():
    q, k = make_qk(17, torch.bfloat16, hkv=3, D=64)
    qpos = [L - RQ + r for r in range(RQ)]
    for norm, gqa, red in [("causal", "max_logits", "mean"), ("past", "mean_probs", "sum"),
                           ("candidates", "mean_probs", "sum")]:
        opts = dict(norm=norm, gqa=gqa, query_reduce=red, aggregation="all", pooling="avg", kernel_size=5, scale=0.3)
        got = T.attn_scores(q, k, START, END, query_positions=qpos, padding=PADDING, **opts)
        want = torch.as_tensor(_C.attn_scores(q, k, START, END, query_positions=qpos, padding=PADDING, **opts))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_attn_scores_argument_errors():
    q, k = make_qk(1)
    with pytest.raises(ValueError, match="query_positions"):
        T.attn_scores(q, k, START, END, norm="causal")
    with pytest.raises(ValueError, match="norm"):
        T.attn_scores(q, k, START, END, norm="window")
    with pytest.raises(ValueError, match="kernel_size"):
        T.attn_scores(q, k, START, END, kernel_size=4)
    with pytest.raises(ValueError, match="start, end"):
        T.attn_scores(q, k, 50, 50)
    with pytest.raises(ValueError, match="padding"):
        T.attn_scores(q, k, START, END, padding=[0, 1])
    with pytest.raises(ValueError, match="KV heads"):
        T.attn_scores(q, make_qk(1, hkv=4)[1], START, END)
    with pytest.raises(ValueError, match="dtype"):
        T.attn_scores(q, k.half(), START, END)
    with pytest.raises(ValueError, match="scale"):
        T.attn_scores(q, k, START, END, scale=float("inf"))
    for bad in ([0, -1, 3], torch.tensor([0, -1, 3])):  # host-visible padding is checked, as in the C binding
        with pytest.raises(ValueError, match="padding"):
            T.attn_scores(q, k, START, END, norm="past", padding=bad)
    # empty batch
    empty = T.attn_scores(q[:0], k[:0], START, END, norm="past", pooling="max", kernel_size=3)
    assert empty.shape == (0, 1, END - START)
    assert T.redundancy(k[:0]).shape == (0, 2, L)


# -------------------------------------------------------------------------------------- redundancy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.5, 0.2, -0.05])
def test_redundancy_matches_oracle(device, dtype, threshold):
    g = gen(21)
    D = 20 if dtype == torch.float32 else 64
    k = torch.randn(B, 2, L, D, generator=g)
    k[:, :, 30] = k[:, :, 12] * 1.5 + 0.01 * torch.randn(B, 2, D, generator=g)  # near-duplicates
    k[:, :, 90] = k[:, :, 12] * 0.5
    k = k.to(dtype)
    for padding in (None, [0, 30, L + 4]):  # L + 4: nothing valid, all zeros
        want = P.redundancy_reference(k, padding=padding, threshold=threshold)
        pads = padding if padding is None or device == "cpu" else dev_vec(padding, device)
        got = T.redundancy(k.to(device), padding=pads, threshold=threshold)
        close(got, want)
    assert torch.all(got[2].cpu() == 0) and torch.all(got[1, :, :30].cpu() == 0)


def test_redundancy_nan_key_and_c_kernel():
    k = torch.randn(B, 3, L, 20, generator=gen(23)).transpose(2, 3).contiguous().transpose(2, 3)  # D stride L
    got = T.redundancy(k, padding=PADDING, threshold=0.3)
    torch.testing.assert_close(got, torch.as_tensor(_C.redundancy(k, padding=PADDING, threshold=0.3)),
                               rtol=1e-5, atol=1e-6)
    k = k.clone()
    k[1, 2, 50, 0] = float("nan")
    got = T.redundancy(k, padding=PADDING)
    assert torch.isnan(got[1, 2, PADDING[1]:]).all() and torch.all(got[1, 2, :PADDING[1]] == 0)
    assert not torch.isnan(got[:, :2]).any() and not torch.isnan(got[0]).any()
    close(got[:, :2], P.redundancy_reference(k, padding=PADDING)[:, :2])
    with pytest.raises(ValueError, match="threshold"):
        T.redundancy(k, threshold=float("nan"))


# ------------------------------------------------------------------------------------- fill_scores


SEEDS = [(0, 0, 0), (1234, 5, 3), (-1, 27, 100), (2**64 + 7, 2**63, 2**70 - 1), (2**63 - 1, -(2**63), 1)]


@pytest.mark.parametrize("device", DEVICES)
def test_fill_scores_bit_exact(device):
    for seed, layer, comp in SEEDS:
        got = T.fill_scores("random", 3, 2, 137, seed=seed, layer=layer, compression=comp, device=device)
        assert got.dtype == torch.float32 and got.device.type == device
        want = torch.as_tensor(_C.fill_scores("random", 3, 2, 137, seed=seed, layer=layer, compression=comp))
        assert torch.equal(got.cpu(), want)
        assert got.min() >= 0 and got.max() < 1
    got = T.fill_scores("random", 2, 2, 5, seed=99, layer=3, compression=4, device=torch.device(device)).cpu()
    for b in range(2):
        for a in range(2):
            for j in range(5):
                assert got[b, a, j].item() == P.random_uniform_reference(99, 3, 4, b * 2 + a, j)
    got = T.fill_scores("recent", 2, 3, 1001, device=device)
    assert torch.equal(got.cpu(), torch.as_tensor(_C.fill_scores("recent", 2, 3, 1001)))
    assert T.fill_scores("random", 0, 3, 5, device=device).shape == (0, 3, 5)
    assert T.fill_scores("recent", 2, 3, 0, device=device).shape == (2, 3, 0)
    with pytest.raises(ValueError, match="kind"):
        T.fill_scores("newest", 1, 1, 1)


# ------------------------------------------------------------------------------------------ select


def select_cases():
    g = gen(31)
    yield "random", torch.randn(3, 4, 137, generator=g)
    yield "ties", torch.randint(0, 5, (3, 4, 137), generator=g).float()
    special = torch.randn(3, 4, 137, generator=g)
    pick = torch.randint(0, 8, (3, 4, 137), generator=g)
    values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -float("nan")]
    for v, val in enumerate(values):
        special[pick == v] = val
    yield "special", special
    yield "all_nan", torch.full((2, 1, 9), float("nan"))
    yield "single", torch.tensor([[[3.0]]])


@pytest.mark.parametrize("device", DEVICES)
def test_select_bit_identical_to_c_and_oracle(device):
    for name, s in select_cases():
        N = s.shape[-1]
        for keep in sorted({0, 1, N // 3, N // 2, N - 1, N}):
            if keep < 0:
                continue
            got = T.select(s.to(device), keep)
            assert got.dtype == torch.int64 and got.shape == (*s.shape[:2], keep), name
            c = torch.as_tensor(_C.select(s, keep))
            assert torch.equal(got.cpu(), c), (name, keep)
            assert torch.equal(got.cpu(), R.select_reference(s, keep)), (name, keep)


def test_select_low_precision_and_errors():
    s = torch.randint(-3, 3, (2, 3, 40), generator=gen(33)).to(torch.bfloat16) / 4
    s[0, 0, 5] = float("nan")
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(T.select(s.to(dt), 17), torch.as_tensor(_C.select(s.float(), 17)))
    with pytest.raises(ValueError, match="keep"):
        T.select(s, 41)
    with pytest.raises(ValueError, match="scores"):
        T.select(torch.ones(2, 3, dtype=torch.int64), 1)


@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_kept_sets_match_oracle(aggregation):
    """On inputs without near-ties at the cut-off, select(score) keeps what the oracle keeps."""
    keep = 40
    q, k = make_qk(41, torch.float32, hkv=3, D=64)
    want_scores = R.score_reference(q, k, START, END, aggregation, "avg", 7)[0]
    sorted_scores = want_scores.sort(dim=-1, descending=True).values
    gap = (sorted_scores[..., keep - 1] - sorted_scores[..., keep]).abs() / sorted_scores[..., keep - 1]
    assert gap.min() > 1e-4  # the seed gives a clean cut-off: the comparison below is meaningful
    got = T.select(T.score(q, k, START, END, aggregation=aggregation, pooling="avg", kernel_size=7), keep)
    assert torch.equal(got, R.select_reference(want_scores, keep))


# ----------------------------------------------------------------------------------------- compact


def make_store(seed, dtype, H=2, D=20, cap=160):
    g = gen(seed)
    keys = torch.randn(B, H, cap, D, generator=g).to(dtype)
    values = torch.randn(B, H, cap, D, generator=g).to(dtype)
    acc = torch.rand(B, H, cap, generator=g)
    return keys, values, acc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("A", ["one", "heads"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_matches_reference(device, A, dtype):
    H, cap, length = 3, 160, L
    for start, window, keep in [(START, 9, 50), (0, 0, 30), (START, 9, 0), (START, 9, END - START), (20, 40, 1)]:
        end = length - window
        keys, values, acc = make_store(start + keep, dtype, H=H, cap=cap)
        rows = 1 if A == "one" else H
        scores = torch.rand(B, rows, end - start, generator=gen(keep))
        indices = R.select_reference(scores, keep)
        want_k, want_v = R.compact_reference(keys[:, :, :length], values[:, :, :length], indices, start, end)
        positions = torch.cat([torch.arange(start).expand(B, H, start), (indices + start).expand(B, H, keep),
                               torch.arange(end, length).expand(B, H, window)], dim=-1)
        want_acc = torch.gather(acc[:, :, :length], 2, positions)
        k_d, v_d, acc_d = (t.clone().to(device) for t in (keys, values, acc))  # clone: .to('cpu') aliases
        new_length = T.compact_(k_d, v_d, indices.to(device), start, end, length, acc=acc_d)
        assert new_length == start + keep + window
        assert torch.equal(k_d[:, :, :new_length].cpu(), want_k)
        assert torch.equal(v_d[:, :, :new_length].cpu(), want_v)
        assert torch.equal(acc_d[:, :, :new_length].cpu(), want_acc)
        assert torch.all(acc_d[:, :, new_length:length] == 0)
        assert torch.equal(acc_d[:, :, length:].cpu(), acc[:, :, length:])  # past the live tokens: untouched
        assert torch.equal(k_d[:, :, length:].cpu(), keys[:, :, length:])
        # the C kernel on the same live tensors agrees bit for bit
        ck, cv = keys[:, :, :length].clone(), values[:, :, :length].clone()
        assert _C.compact(ck, cv, indices, start, end) == new_length
        assert torch.equal(ck[:, :, :new_length], k_d[:, :, :new_length].cpu())


def test_compact_rejects_bad_indices_on_cpu_without_touching_anything():
    keys, values, acc = make_store(3, torch.float32)
    before = [t.clone() for t in (keys, values, acc)]
    bad = [torch.tensor([[[3, 3, 5]]]).expand(B, 1, 3), torch.tensor([[[0, 5, 200]]]).expand(B, 1, 3),
           torch.tensor([[[-1, 2, 5]]]).expand(B, 1, 3)]
    for idx in bad:
        with pytest.raises(ValueError, match="indices"):
            T.compact_(keys, values, idx, START, END, L, acc=acc)
    with pytest.raises(ValueError, match="indices"):
        T.compact_(keys, values, torch.zeros(B, 2, END - START + 1, dtype=torch.int64), START, END, L)
    with pytest.raises(ValueError, match="length"):
        T.compact_(keys, values, torch.zeros(B, 1, 0, dtype=torch.int64), START, END, 161)
    for t, b in zip((keys, values, acc), before):
        assert torch.equal(t, b)


# -------------------------------------------------------------------------------------- accumulate


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 3])
def test_accumulate_matches_oracle(device, dtype, G):
    hkv, D, cap, length = 2, 64 if G == 3 else 20, 160, L
    g = gen(51 + G)
    q = torch.randn(B, G * hkv, 1, D, generator=g).to(dtype)
    keys = torch.randn(B, hkv, cap, D, generator=g).to(dtype)
    acc0 = torch.rand(B, hkv, cap, generator=g)
    acc0[1, :, :9] = -0.0  # padded positions are not written at all (adding 0 would turn -0.0 into +0.0)
    padding = [0, 9, 500]  # 500 > length: clamped, nothing added
    want = P.h2o_accumulate_reference(acc0[:, :, :length], q, keys[:, :, :length], padding=padding)
    acc = acc0.clone().to(device)
    pads = padding if device == "cpu" else dev_vec(padding, device)
    assert T.accumulate_(acc, q.to(device), keys.to(device), length, padding=pads) is None
    acc = acc.cpu()
    close(acc[:, :, :length], want)
    assert torch.equal(acc[:, :, length:], acc0[:, :, length:])  # past the live tokens: untouched
    for b, p in enumerate(padding):
        assert torch.equal(acc[b, :, :p].view(torch.int32), acc0[b, :, :p].view(torch.int32))  # untouched bits
    torch.testing.assert_close((acc - acc0)[:2].sum(-1).double(), torch.full((2, hkv), float(G), dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_accumulate_nan_head_scale_and_c_kernel():
    hkv, G, D = 2, 3, 20
    g = gen(57)
    q = torch.randn(B, G * hkv, 1, D, generator=g)
    q[1, 4, 0, 2] = float("nan")  # one query head of kv head 1 in sequence 1: adds nothing
    keys = torch.randn(B, hkv, L, D, generator=g)
    acc0 = torch.rand(B, hkv, L, generator=g)
    acc = acc0.clone()
    T.accumulate_(acc, q, keys, L, padding=PADDING)
    close(acc, P.h2o_accumulate_reference(acc0, q, keys, padding=PADDING))
    for scale in (None, 0.05):
        acc = acc0.clone()
        T.accumulate_(acc, q, keys, L, padding=PADDING, scale=scale)
        c = acc0.clone()
        _C._accumulate(q, keys, c, padding=PADDING, scale=scale)
        torch.testing.assert_close(acc, c, rtol=1e-5, atol=1e-6)
    T.accumulate_(acc, q, keys, 0)  # nothing live: nothing to do
    with pytest.raises(ValueError, match="acc"):
        T.accumulate_(torch.zeros(B, hkv, L - 1), q, keys, L)


# ---------------------------------------------------------------------------------- copies, chunks


@pytest.mark.parametrize("device", DEVICES)
def test_append_and_ring_write(device):
    keys, values, _ = make_store(61, torch.bfloat16)
    keys, values = keys.to(device), values.to(device)
    k, v = torch.randn(B, 2, 4, 20, generator=gen(62)).to(torch.bfloat16).to(device), \
        torch.randn(B, 2, 4, 20, generator=gen(63)).to(torch.bfloat16).to(device)
    assert T.append_(keys, values, k, v, 100) == 104
    assert torch.equal(keys[:, :, 100:104], k) and torch.equal(values[:, :, 100:104], v)
    with pytest.raises(ValueError, match="capacity"):
        T.append_(keys, values, k, v, 157)
    ring = torch.zeros(B, HQ, 4, 20, device=device)
    q = torch.randn(B, HQ, 1, 20, generator=gen(64)).to(device)
    T.ring_write_(ring, q, 6)
    assert torch.equal(ring[:, :, 2], q[:, :, 0]) and torch.all(ring[:, :, [0, 1, 3]] == 0)


def test_pooling_and_threshold_helpers():
    """Pooling on signed values (max never picks the padding, avg counts it) and the float32 threshold
    bound that makes "sim > threshold" exact in float32."""
    x = torch.randn(3, 2, 40, generator=gen(73)) - 1.0
    for pooling in ("avg", "max"):
        for ks in (1, 3, 7):
            close(T._pool(x, pooling, ks), R._pool(x.double(), pooling, ks) if ks > 1 else x.double())
    for thr in (0.1, 0.5, -0.3, 1e-45, 0.0, -math.inf, 1e300):
        up = T._float32_above(thr)
        f = torch.tensor(up, dtype=torch.float32)
        assert float(f) == up and up > thr
        below = torch.nextafter(f, torch.tensor(-math.inf))
        assert float(below) <= thr
    assert math.isnan(T._float32_above(math.inf))


def test_chunked_results_match_unchunked(monkeypatch):
    """Tiny CHUNK_BYTES forces chunks over the batch, the KV heads and (redundancy) the rows."""
    q, k = make_qk(71, hkv=3)
    qpos = [L - RQ + r for r in range(RQ)]
    opts = dict(query_positions=qpos, padding=PADDING, norm="causal", gqa="max_logits", aggregation="group")
    acc = torch.rand(B, 3, L, generator=gen(72))
    q1 = q[:, :, :1]
    full = (T.attn_scores(q, k, START, END, **opts), T.score(q, k, START, END), T.redundancy(k, padding=PADDING))
    full_acc = acc.clone()
    T.accumulate_(full_acc, q1, k, L, padding=PADDING)
    for budget in (L * 200, 4096, 1):
        monkeypatch.setattr(T, "CHUNK_BYTES", budget)
        chunked = (T.attn_scores(q, k, START, END, **opts), T.score(q, k, START, END), T.redundancy(k, padding=PADDING))
        for a, b in zip(chunked, full):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        chunked_acc = acc.clone()
        T.accumulate_(chunked_acc, q1, k, L, padding=PADDING)
        torch.testing.assert_close(chunked_acc, full_acc, rtol=1e-6, atol=1e-7)


def test_module_is_independent_and_sync_free_by_construction():
    """No import of the oracles or the C extension, and none of the calls that sync a CUDA stream."""
    src = inspect.getsource(T)
    tree = ast.parse(src)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "math", "collections.abc", "torch", "torch.nn.functional"}, imported
    attrs = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for bad in ("item", "tolist", "cpu", "numpy", "nonzero", "argwhere", "masked_select", "synchronize", "unique"):
        assert bad not in attrs, bad


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ok, reason="needs torch.cuda")
def test_cuda_calls_never_sync():
    dev = "cuda"
    q, k = make_qk(81, torch.bfloat16, hkv=3, D=64)
    q, k = q.to(dev), k.to(dev)
    pads, qpos = dev_vec(PADDING, dev), dev_vec([L - RQ + r for r in range(RQ)], dev)
    keys, values, acc = (t.to(dev) for t in make_store(82, torch.bfloat16, H=3, D=64))
    q1 = q[:, :, :1]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = T.score(q, k, START, END)
        T.attn_scores(q, k, START, END, query_positions=qpos, padding=pads, norm="causal", gqa="max_logits",
                      pooling="max", kernel_size=3)
        T.redundancy(k, padding=pads)
        T.fill_scores("random", 3, 1, 50, seed=5, device=dev)
        idx = T.select(s, 30)
        T.accumulate_(acc, q1, keys, L, padding=pads)
        T.compact_(keys, values, idx, START, END, L, acc=acc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
