"""Python wrappers over the standalone RPC operator of ``rpc_py._C``.

The C functions take any DLPack producer (torch, numpy, cupy, our ``View``). These wrappers add what
is awkward in C: they pass the current CUDA stream for CUDA torch tensors, and give results back in
the caller's framework (torch in -> torch out; otherwise NumPy arrays on CPU and ``View`` objects on
CUDA). torch is optional: it is only imported when the inputs are torch tensors.

Steps of the method (docs/rpc-algorithm.md): ``score`` = 3-7, ``select`` = 8, ``compact`` = 9,
``compress`` = all of them on one layer.
"""

from __future__ import annotations

import sys

from rpc_py import _C

__all__ = ["score", "select", "compact", "compress"]


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
    out = _C.score(queries, keys, int(start), int(end), aggregation=aggregation, pooling=pooling,
                   kernel_size=int(kernel_size), stream=_stream_for(queries, stream), raw=bool(raw))
    if raw:
        return _to_framework(out[0], queries), _to_framework(out[1], queries)
    return _to_framework(out, queries)


def select(scores, keep, *, stream=None):
    """int64 [B, A, keep]: offsets of the top ``keep`` scores per row, ascending (ties to the lower
    index, NaN ranked last)."""
    out = _C.select(scores, int(keep), stream=_stream_for(scores, stream))
    return _to_framework(out, scores)


def compact(keys, values, indices, start, end, *, stream=None):
    """In place: keys/values [B, H, L, D] become prefix [0, start) + kept candidates + window [end, L).

    Returns the new length ``start + keep + (L - end)``; positions past it are stale.
    """
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
