"""Pure-torch oracles of the decode-step kernels (``rpc_py._C.decode_attention``,
``append_at_length``, ``ring_write``).

They share no code with the C/CUDA kernels. ``decode_attention_ref`` slices each sequence's live keys
``[padding[b], length)`` and runs ``torch.nn.functional.scaled_dot_product_attention`` on exactly that
part, in float64 on the CPU by default, so it is an independent statement of what the kernels must
compute: attention of one query token over the live, unpadded cache, GQA by repeating each KV head for
its ``Hq / Hkv`` query heads. A sequence without a live key yields zeros.
"""

from __future__ import annotations

import math

import torch

__all__ = ["decode_attention_ref", "append_at_length_ref", "ring_write_ref"]


def decode_attention_ref(q, keys, values, length: int, padding=None, scale: float | None = None,
                         dtype=torch.float64) -> torch.Tensor:
    """q ``[B, Hq, 1, D]``, keys/values ``[B, Hkv, capacity, D]``; returns ``[B, Hq, 1, D]`` in ``dtype``."""
    B, Hq, q_len, D = q.shape
    if q_len != 1:
        raise ValueError(f"q: expected one query token, got {q_len}")
    Hkv, cap = keys.shape[1], keys.shape[2]
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    G = Hq // Hkv
    length = max(0, min(int(length), cap))
    pads = [0] * B if padding is None else [int(p) for p in torch.as_tensor(padding).reshape(-1).tolist()]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.zeros(B, Hq, 1, D, dtype=dtype)
    for b in range(B):
        lo = max(0, min(pads[b], length))
        if lo >= length:
            continue
        k = keys[b : b + 1, :, lo:length].to("cpu", dtype).repeat_interleave(G, dim=1)
        v = values[b : b + 1, :, lo:length].to("cpu", dtype).repeat_interleave(G, dim=1)
        out[b : b + 1] = torch.nn.functional.scaled_dot_product_attention(
            q[b : b + 1].to("cpu", dtype), k, v, scale=scale
        )
    return out


def append_at_length_ref(key_storage, value_storage, keys, values, lengths) -> None:
    """In place: write keys/values ``[B, H, t, D]`` at ``lengths[0]``, then advance ``lengths[:2]``
    by ``t``; past the capacity nothing changes."""
    pos, t, cap = int(lengths[0]), keys.shape[2], key_storage.shape[2]
    if pos < 0 or pos + t > cap:
        return
    key_storage[:, :, pos : pos + t] = keys
    value_storage[:, :, pos : pos + t] = values
    lengths[0] += t
    lengths[1] += t


def ring_write_ref(ring, q, lengths, offset: int = 0) -> None:
    """In place: query token i of ``q [B, Hq, t, D]`` goes to ring slot ``(lengths[1] + offset + i) % W``."""
    W = ring.shape[2]
    for i in range(q.shape[2]):
        ring[:, :, (int(lengths[1]) + offset + i) % W] = q[:, :, i]
