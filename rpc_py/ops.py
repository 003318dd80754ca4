"""Python wrappers over the standalone operators of ``rpc_py._C``.

The C functions take any DLPack producer (torch, numpy, cupy, our ``View``). These wrappers add what
is awkward in C: they pass the current CUDA stream for CUDA torch tensors, and give results back in
the caller's framework (torch in -> torch out; otherwise NumPy arrays on CPU and ``View`` objects on
CUDA). torch is optional: it is only imported when the inputs are torch tensors.

The first use of a kernel family on a CUDA device (torch inputs) is checked against the CPU kernels
(``rpc_py.selfcheck``); a mismatch raises ``KernelCheckError``.

Steps of the method (docs/algorithm.md): ``score`` = 3-7, ``select`` = 8, ``compact`` = 9,
``compress`` = all of them on one layer.

Score functions of the other selection policies (rpc_py/policy_reference.py is their oracle):
``attn_scores`` (window attention: TOVA, SnapKV, R-KV's importance, RPC's own scores as a special
case), ``redundancy`` (R-KV) and ``fill_scores`` (recent, random). Their scores feed ``select`` and
``compact`` like RPC's.
"""

from __future__ import annotations

import sys

from rpc_py import _C

__all__ = ["score", "select", "compact", "compress", "attn_scores", "redundancy", "fill_scores"]


def _torch_if_tensor(x):
    """The torch module when ``x`` is a torch tensor (without importing torch otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return torch
    return None


def _stream_for(x, stream):
    if stream is not None:
        return stream
    torch = _torch_if_tensor(x)
    if torch is not None and x.is_cuda:
        return torch.cuda.current_stream(x.device).cuda_stream
    return None


def _selfcheck(x, family, head_dim=64):
    """The first use of a kernel family on a CUDA device (torch tensors) runs rpc_py.selfcheck."""
    torch = _torch_if_tensor(x)
    if torch is not None and x.is_cuda:
        from rpc_py.selfcheck import ensure

        ensure(x.device, [family], dtype=x.dtype if x.is_floating_point() else torch.float32, head_dim=head_dim)


def _to_framework(result, like):
    torch = _torch_if_tensor(like)
    if torch is None:
        return result
    if like.is_cuda:
        return torch.from_dlpack(result)
    return torch.as_tensor(result)


def score(queries, keys, start, end, *, aggregation="all", pooling="avg", kernel_size=7, stream=None,
          raw=False):
    """Pooled float32 scores [B, A, N] of the candidates ``keys[:, :, start:end]``.

    queries: [B, Hq, R, D] selector queries (post-RoPE); keys: [B, Hkv, L, D], same dtype
    (float32, float16 or bfloat16) and device. A = 1 for ``aggregation="all"``, Hkv for ``"group"``.
    With ``raw=True`` returns ``(pooled, unpooled)``.
    """
    _selfcheck(queries, "score", queries.shape[-1])
    out = _C.score(queries, keys, int(start), int(end), aggregation=aggregation, pooling=pooling,
                   kernel_size=int(kernel_size), stream=_stream_for(queries, stream), raw=bool(raw))
    if raw:
        return _to_framework(out[0], queries), _to_framework(out[1], queries)
    return _to_framework(out, queries)


def select(scores, keep, *, stream=None):
    """int64 [B, A, keep]: offsets of the top ``keep`` scores per row, ascending (ties to the lower
    index, NaN ranked last)."""
    _selfcheck(scores, "select")
    out = _C.select(scores, int(keep), stream=_stream_for(scores, stream))
    return _to_framework(out, scores)


def compact(keys, values, indices, start, end, *, stream=None):
    """In place: keys/values [B, H, L, D] become prefix [0, start) + kept candidates + window [end, L).

    Returns the new length ``start + keep + (L - end)``; positions past it are stale.
    """
    _selfcheck(keys, "compact", keys.shape[-1])
    return _C.compact(keys, values, indices, int(start), int(end), stream=_stream_for(keys, stream))


def compress(queries, keys, values, start, keep, window, *, aggregation="all", pooling="avg", kernel_size=7,
             stream=None):
    """One compression of one layer, in place: candidates ``[start, L - window)``.

    Returns ``(new_length, indices)``. keys/values must be writable; the valid part afterwards is
    ``[:, :, :new_length]``.
    """
    L = keys.shape[2]
    end = L - int(window)
    pooled = score(queries, keys, start, end, aggregation=aggregation, pooling=pooling,
                   kernel_size=kernel_size, stream=stream)
    indices = select(pooled, keep, stream=stream)
    new_length = compact(keys, values, indices, start, end, stream=stream)
    return new_length, indices


def _int_vector(x):
    """query_positions / padding: None, a sequence of ints, or an integer array/tensor (made int64)."""
    if x is None:
        return None
    torch = _torch_if_tensor(x)
    if torch is not None:
        return x if x.dtype == torch.int64 else x.to(torch.int64)
    dtype = getattr(x, "dtype", None)
    if dtype is not None and hasattr(x, "astype") and getattr(dtype, "kind", "") in "iu" and str(dtype) != "int64":
        return x.astype("int64")
    return x


def attn_scores(queries, keys, start, end, *, query_positions=None, padding=None, norm="candidates",
                gqa="mean_probs", query_reduce="sum", aggregation="all", pooling="avg", kernel_size=1, scale=None,
                stream=None, raw=False, query_weights=None):
    """Window-attention scores of the candidates ``keys[:, :, start:end]``: float32 ``[B, A, N]``
    (``rpc_py.policy_reference.window_attention_reference``).

    queries: ``[B, Hq, R, D]`` selector queries (post-RoPE), oldest first; keys: ``[B, Hkv, L, D]``, same
    dtype (float32, float16, bfloat16) and device. ``norm`` picks each query's softmax denominator:
    ``"candidates"`` (RPC), ``"past"`` (``[padding[b], end)``) or ``"causal"`` (``[padding[b],
    query_positions[r] + 1)``; needs ``query_positions``, one key position per query). ``gqa``:
    ``"mean_probs"`` or ``"max_logits"``; ``query_reduce``: ``"sum"`` or ``"mean"``; ``aggregation``:
    ``"all"`` (A = 1) or ``"group"`` (A = Hkv); ``pooling``/``kernel_size`` as in ``score`` (1 = none).
    ``padding``: left-padding count per sequence. ``scale``: logit scale (default ``1/sqrt(D)``).
    ``query_weights``: the weight of each query's probabilities in the sum over queries (R numbers;
    on CUDA a float32 tensor on the device). With ``raw=True`` returns ``(pooled, unpooled)``.
    """
    _selfcheck(queries, "attn_scores", queries.shape[-1])
    out = _C.attn_scores(queries, keys, int(start), int(end), query_positions=_int_vector(query_positions),
                         padding=_int_vector(padding), norm=norm, gqa=gqa, query_reduce=query_reduce,
                         aggregation=aggregation, pooling=pooling, kernel_size=int(kernel_size), scale=scale,
                         stream=_stream_for(queries, stream), raw=bool(raw), query_weights=query_weights)
    if raw:
        return _to_framework(out[0], queries), _to_framework(out[1], queries)
    return _to_framework(out, queries)


def redundancy(keys, *, padding=None, threshold=0.5, stream=None):
    """R-KV's redundancy of every key, float32 ``[B, Hkv, L]`` (``redundancy_reference``): per sequence
    and KV head, over the valid keys ``[padding[b], L)``; 0 at padded positions. Larger = more redundant."""
    _selfcheck(keys, "redundancy", keys.shape[-1])
    out = _C.redundancy(keys, padding=_int_vector(padding), threshold=float(threshold),
                        stream=_stream_for(keys, stream))
    return _to_framework(out, keys)


def fill_scores(kind, batch, rows, n, *, seed=0, layer=0, compression=0, device="cpu", stream=None):
    """Data-free scores ``[batch, rows, n]`` float32: ``kind="recent"`` (candidate j scores j, so the
    newest are kept) or ``"random"`` (``random_uniform_reference``'s counter hash of (seed, layer,
    compression, b * rows + a, j); the same bits on every device).

    device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device`` (then the result is a torch tensor;
    otherwise NumPy on CPU, a ``View`` on CUDA).
    """
    torch = sys.modules.get("torch")
    as_torch = torch is not None and isinstance(device, torch.device)
    dev = str(device)
    if stream is None and torch is not None and dev.startswith("cuda") and torch.cuda.is_available():
        stream = torch.cuda.current_stream(torch.device(dev)).cuda_stream
    if torch is not None and dev.startswith("cuda") and torch.cuda.is_available():
        from rpc_py.selfcheck import ensure

        ensure(torch.device(dev), ["fill"])
    out = _C.fill_scores(kind, int(batch), int(rows), int(n), seed=seed, layer=layer, compression=compression,
                         device=dev, stream=stream)
    if not as_torch:
        return out
    return torch.from_dlpack(out) if dev.startswith("cuda") else torch.as_tensor(out)
