"""Decode-step kernels: decode_attention, append_at_length, ring_write.

Every case compares the CPU kernel, the scalar C reference (``reference=True``) and the torch oracle
(``rpc_py.decode_reference``: SDPA on the live, unpadded part of the cache, float64). CUDA cases run the
same comparisons on the device (lengths up to 64K) and check that the kernels read their positions
from device memory at run time, by replaying one CUDA graph while the lengths change.
"""

import math

import numpy as np
import pytest
import torch

import rpc_py
from rpc_py import _C
from rpc_py.decode_reference import append_at_length_ref, decode_attention_ref, ring_write_ref

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def make_case(B, Hq, Hkv, D, cap, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    # Keys with some spread so that softmax weights are far from uniform.
    k = (2.0 * torch.randn(B, Hkv, cap, D, generator=g)).to(dtype)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    return q.to(device), k.to(device), v.to(device)


def run(q, k, v, length, padding=None, reference=False, **kw):
    B, Hq, _, D = q.shape
    out = torch.full((B, 1, Hq, D), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    lengths = torch.tensor([length, length + 5], dtype=torch.int64, device=q.device)
    pad = None if padding is None else torch.as_tensor(padding, dtype=torch.int64).to(q.device)
    _C.decode_attention(q, k, v, out, lengths, padding=pad, reference=reference, **kw)
    return out


def check(out, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", [1, 4, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_matches_oracle_gqa_headdim(dtype, G, D):
    Hkv = 2
    q, k, v = make_case(2, Hkv * G, Hkv, D, 300, dtype, seed=G * 1000 + D)
    for length in (1, 2, 65, 137, 300):
        ref = decode_attention_ref(q, k, v, length)
        check(run(q, k, v, length), ref, dtype)
        check(run(q, k, v, length, reference=True), ref, dtype)


@pytest.mark.parametrize("length", [1, 63, 64, 257, 1000, 4096])
def test_lengths_up_to_4k(length):
    q, k, v = make_case(1, 8, 2, 128, 4096 + 3, torch.bfloat16, seed=length)
    ref = decode_attention_ref(q, k, v, length)
    check(run(q, k, v, length), ref, torch.bfloat16)
    check(run(q, k, v, length, reference=True), ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_padding_batch(dtype):
    # Sequence 0 unpadded, 1 and 2 left-padded, 3 padded past the live length (no key: zeros).
    q, k, v = make_case(4, 14, 2, 64, 200, dtype, seed=5)
    padding = [0, 3, 57, 150]
    ref = decode_attention_ref(q, k, v, 120, padding)
    out = run(q, k, v, 120, padding)
    check(out, ref, dtype)
    check(run(q, k, v, 120, padding, reference=True), ref, dtype)
    assert torch.count_nonzero(out[3]) == 0
    # Padded keys must not matter at all: poison them.
    k2, v2 = k.clone(), v.clone()
    for b, p in enumerate(padding):
        k2[b, :, :p] = 1e4
        v2[b, :, :p] = float("nan")
    check(run(q, k2, v2, 120, padding), ref, dtype)


def test_scalar_and_fast_agree_tightly_in_float32():
    q, k, v = make_case(3, 12, 3, 64, 777, torch.float32, seed=11)
    a = run(q, k, v, 700, [0, 10, 99])
    b = run(q, k, v, 700, [0, 10, 99], reference=True)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


def test_ignores_capacity_past_length_and_clamps():
    q, k, v = make_case(2, 4, 4, 64, 128, torch.float32, seed=3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 50:] = float("nan")
    v2[:, :, 50:] = float("nan")
    check(run(q, k2, v2, 50), decode_attention_ref(q, k, v, 50), torch.float32)
    # A length past the capacity means the whole capacity; length 0 gives zeros.
    check(run(q, k, v, 10_000), decode_attention_ref(q, k, v, 128), torch.float32)
    assert torch.count_nonzero(run(q, k, v, 0)) == 0


def test_reads_lengths_at_call_time_and_scale():
    q, k, v = make_case(1, 4, 1, 64, 64, torch.float32, seed=4)
    out = torch.empty(1, 4, 1, 64)
    lengths = torch.tensor([10, 10], dtype=torch.int64)
    _C.decode_attention(q, k, v, out, lengths, scale=0.3)
    torch.testing.assert_close(out.double(), decode_attention_ref(q, k, v, 10, scale=0.3), atol=2e-5, rtol=2e-5)
    lengths[0] = 33  # same call, new value in memory
    _C.decode_attention(q, k, v, out, lengths, scale=0.3)
    torch.testing.assert_close(out.double(), decode_attention_ref(q, k, v, 33, scale=0.3), atol=2e-5, rtol=2e-5)


def test_kvcache_storage_and_device_lengths():
    """The intended use: full-capacity storage views plus the layer's device_lengths."""
    B, H, Hq, D = 2, 2, 8, 64
    kv = _C.KVCache(1, B, H, D, "float32", capacity=512)
    ks, vs = torch.randn(B, H, 77, D), torch.randn(B, H, 77, D)
    kv.append(0, ks, vs)
    kv.set_padding([0, 5])
    q = torch.randn(B, Hq, 1, D)
    out = torch.empty(B, Hq, 1, D)
    k_store, v_store = torch.from_dlpack(kv.storage_keys(0)), torch.from_dlpack(kv.storage_values(0))
    lengths = torch.from_dlpack(kv.device_lengths(0))
    assert lengths.tolist() == [77, 77]
    pad = torch.tensor([0, 5])
    _C.decode_attention(q, k_store, v_store, out, lengths, padding=pad)
    torch.testing.assert_close(out.double(), decode_attention_ref(q, ks, vs, 77, pad), atol=2e-5, rtol=2e-5)


def test_argument_errors():
    q, k, v = make_case(2, 4, 2, 64, 32, torch.float32)
    out = torch.empty(2, 4, 1, 64)
    ln = torch.tensor([5, 5])
    with pytest.raises(ValueError, match="keys: expected dtype float32"):
        _C.decode_attention(q, k.half(), v, out, ln)
    with pytest.raises(ValueError, match=r"q: expected shape \[batch, q_heads, 1, head_dim\]"):
        _C.decode_attention(torch.randn(2, 4, 2, 64), k, v, out, ln)
    with pytest.raises(ValueError, match="kv_heads >= 1 dividing"):
        _C.decode_attention(torch.randn(2, 3, 1, 64), k, v, torch.empty(2, 3, 1, 64), ln)
    with pytest.raises(ValueError, match="values: expected shape"):
        _C.decode_attention(q, k, v[:, :, :16], out, ln)
    with pytest.raises(ValueError, match="out: expected shape"):
        _C.decode_attention(q, k, v, torch.empty(2, 4, 64), ln)
    with pytest.raises(ValueError, match="lengths: expected a contiguous 1-D int64"):
        _C.decode_attention(q, k, v, out, torch.tensor([5.0]))
    with pytest.raises(ValueError, match=r"padding: expected a contiguous int64 tensor of shape \[2\]"):
        _C.decode_attention(q, k, v, out, ln, padding=torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="out: expected a tensor without zero strides"):
        _C.decode_attention(q, k, v, torch.empty(2, 4, 1, 1).expand(2, 4, 1, 64), ln)
    with pytest.raises(ValueError, match="keys: expected unit stride along head_dim"):
        _C.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, out, ln)
    with pytest.raises(ValueError, match="splits"):
        _C.decode_attention(q, k, v, out, ln, splits=-1)
    ro = np.zeros((2, 4, 1, 64), dtype=np.float32)
    ro.setflags(write=False)
    with pytest.raises(BufferError):
        _C.decode_attention(q, k, v, ro, ln)
    with pytest.raises(TypeError):
        _C.decode_attention(q, k, v, out, [5, 5])


def test_workspace_size():
    splits, floats = _C.decode_workspace_size(1, 28, 4, 128, 65536)
    assert splits >= 1 and floats == 28 * splits * 130
    assert _C.decode_workspace_size(2, 8, 2, 64, 100)[0] <= math.ceil(100 / 64)
    assert _C.decode_workspace_size(2, 8, 2, 64, 100, 3) == (3, 2 * 8 * 3 * 66)
    with pytest.raises(ValueError, match="kv_heads >= 1 dividing q_heads"):
        _C.decode_workspace_size(1, 7, 2, 64, 100)


# ------------------------------------------------------------------ append_at_length / ring_write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_at_length_matches_reference(dtype):
    B, H, cap, D = 2, 3, 20, 8
    ks, vs = torch.zeros(B, H, cap, D, dtype=dtype), torch.zeros(B, H, cap, D, dtype=dtype)
    rk, rv = ks.clone(), vs.clone()
    lengths = torch.tensor([4, 9])
    rl = lengths.clone()
    for t in (1, 1, 3, 1):
        k = torch.randn(B, H, t, D).to(dtype)
        v = torch.randn(B, H, D, t).to(dtype).transpose(2, 3)  # strided source
        _C.append_at_length(ks, vs, k, v, lengths)
        append_at_length_ref(rk, rv, k, v, rl)
    assert lengths.tolist() == [10, 15] == rl.tolist()
    assert torch.equal(ks, rk) and torch.equal(vs, rv)
    # Past the capacity: nothing written, lengths unchanged.
    before = ks.clone()
    _C.append_at_length(ks, vs, torch.ones(B, H, 11, D, dtype=dtype), torch.ones(B, H, 11, D, dtype=dtype), lengths)
    assert lengths.tolist() == [10, 15] and torch.equal(ks, before)


def test_append_at_length_into_kvcache_equals_kvcache_append():
    B, H, D = 2, 2, 16
    a = _C.KVCache(1, B, H, D, "float32", capacity=64)
    b = _C.KVCache(1, B, H, D, "float32", capacity=64)
    prompt = (torch.randn(B, H, 10, D), torch.randn(B, H, 10, D))
    a.append(0, *prompt)
    b.append(0, *prompt)
    ka, va = torch.from_dlpack(a.storage_keys(0)), torch.from_dlpack(a.storage_values(0))
    la = torch.from_dlpack(a.device_lengths(0))
    for _ in range(5):
        step = (torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
        _C.append_at_length(ka, va, *step, la)
        b.append(0, *step)
    assert la.tolist() == [15, 15] == [b.length(0), b.seen(0)]
    assert torch.equal(ka[:, :, :15], torch.from_dlpack(b.keys(0)))
    assert torch.equal(va[:, :, :15], torch.from_dlpack(b.values(0)))


def test_ring_write_matches_reference_and_wraps():
    B, Hq, W, D = 2, 4, 5, 8
    ring, rr = torch.zeros(B, Hq, W, D), torch.zeros(B, Hq, W, D)
    lengths = torch.tensor([0, 3])
    for offset, t in ((0, 1), (2, 1), (-1, 3), (7, 5)):
        q = torch.randn(B, Hq, t, D)
        _C.ring_write(ring, q, lengths, offset=offset)
        ring_write_ref(rr, q, lengths, offset)
        assert torch.equal(ring, rr)
        lengths[1] += 1
    with pytest.raises(ValueError, match="at most 5 tokens"):
        _C.ring_write(ring, torch.zeros(B, Hq, 6, D), lengths)
    with pytest.raises(ValueError, match="lengths: expected a contiguous 1-D int64 tensor of at least 2"):
        _C.ring_write(ring, torch.zeros(B, Hq, 1, D), torch.tensor([3]))


def test_workspace_is_ignored_on_cpu():
    q, k, v = make_case(1, 2, 1, 64, 8, torch.float32)
    check(run(q, k, v, 8, workspace=torch.empty(1)), decode_attention_ref(q, k, v, 8), torch.float32)


# ------------------------------------------------------------------ CUDA


def _cuda_run(q, k, v, length, padding=None, splits=0):
    B, Hq, _, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    s, n = _C.decode_workspace_size(B, Hq, Hkv, D, cap, splits)
    ws = torch.empty(n, dtype=torch.float32, device="cuda")
    out = torch.full((B, 1, Hq, D), float("nan"), dtype=q.dtype, device="cuda").transpose(1, 2)
    lengths = torch.tensor([length, length], dtype=torch.int64, device="cuda")
    pad = None if padding is None else torch.as_tensor(padding, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    _C.decode_attention(q, k, v, out, lengths, padding=pad, workspace=ws, splits=s, stream=stream)
    torch.cuda.synchronize()
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("G", [1, 4, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_oracle(G, D, dtype):
    q, k, v = make_case(3, 2 * G, 2, D, 5000, dtype, device="cuda", seed=G + D)
    for length in (1, 2, 63, 64, 65, 1000, 4999):
        check(_cuda_run(q, k, v, length, [0, 7, 40]), decode_attention_ref(q, k, v, length, [0, 7, 40]), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("length", [16384, 65536])
def test_cuda_long_lengths_64k(length):
    q, k, v = make_case(1, 28, 4, 128, 65536, torch.bfloat16, device="cuda", seed=length)
    ref = decode_attention_ref(q, k, v, length, dtype=torch.float32)
    check(_cuda_run(q, k, v, length), ref.double(), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_many_groups_and_explicit_splits():
    q, k, v = make_case(2, 32, 2, 128, 3000, torch.bfloat16, device="cuda", seed=9)  # G = 16: two head groups
    ref = decode_attention_ref(q, k, v, 2500, [0, 100])
    for splits in (1, 3, 47):
        check(_cuda_run(q, k, v, 2500, [0, 100], splits), ref, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_graph_replay_follows_device_lengths():
    """One captured step (append, attention, ring write) replayed while the length grows."""
    B, Hkv, Hq, D, cap, W = 2, 2, 8, 128, 600, 4
    dtype = torch.bfloat16
    kv = _C.KVCache(1, B, Hkv, D, "bfloat16", capacity=cap, fixed_capacity=True, window=W, q_heads=Hq)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        s = stream.cuda_stream
        kv.append(0, torch.randn(B, Hkv, 100, D, device="cuda").to(dtype),
                  torch.randn(B, Hkv, 100, D, device="cuda").to(dtype), stream=s)
        kv.record_query(0, torch.zeros(B, Hq, 1, D, device="cuda", dtype=dtype), stream=s)
        k_store, v_store = torch.from_dlpack(kv.storage_keys(0)), torch.from_dlpack(kv.storage_values(0))
        ring = torch.from_dlpack(kv.queries(0))
        lengths = torch.from_dlpack(kv.device_lengths(0))
        splits, n = _C.decode_workspace_size(B, Hq, Hkv, D, cap)
        ws = torch.empty(n, device="cuda")
        sq = torch.zeros(B, Hq, 1, D, device="cuda", dtype=dtype)
        sk = torch.zeros(B, Hkv, 1, D, device="cuda", dtype=dtype)
        sv = torch.zeros_like(sk)
        out = torch.zeros(B, Hq, 1, D, device="cuda", dtype=dtype)
        pad = torch.tensor([0, 9], device="cuda")

        def step():
            _C.append_at_length(k_store, v_store, sk, sv, lengths, stream=s)
            _C.decode_attention(sq, k_store, v_store, out, lengths, padding=pad, workspace=ws, splits=splits, stream=s)
            _C.ring_write(ring, sq, lengths, offset=1 - 101, stream=s)

        graph = torch.cuda.CUDAGraph()
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.synchronize()
    assert lengths.tolist() == [100, 100]  # capturing records the kernels without running them
    ref_k = k_store.clone()
    ref_v = v_store.clone()
    for i in range(30):
        sk.copy_(torch.randn_like(sk, dtype=torch.float32).to(dtype))
        sv.copy_(torch.randn_like(sv, dtype=torch.float32).to(dtype))
        sq.copy_(torch.randn_like(sq, dtype=torch.float32).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        ref_k[:, :, 100 + i] = sk[:, :, 0]
        ref_v[:, :, 100 + i] = sv[:, :, 0]
        assert lengths.tolist() == [101 + i, 101 + i]
        check(out, decode_attention_ref(sq, ref_k, ref_v, 101 + i, [0, 9]), dtype)
        assert torch.equal(ring[:, :, (101 + i + 1 - 101) % W], sq[:, :, 0])
    assert torch.equal(k_store, ref_k) and torch.equal(v_store, ref_v)
