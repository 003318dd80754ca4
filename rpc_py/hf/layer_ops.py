"""The work an ``RPCCacheLayer`` asks of its kernels, written twice: with rpc_py's C/CUDA kernels
(``NativeOps``) and with float32 torch operations (``TorchOps``, ``rpc_py.torch_kernels``). The layer
picks one when it stores its first tokens (``rpc_py.kernel_choice``) and calls nothing else that touches
the storage, so switching kernels changes no other line of the cache.

Both write into the C ``KVCache``'s storage: the torch path through zero-copy torch views of it, then
tells the C cache what changed (``advance`` for appended tokens and queries, ``set_length`` after a
compaction). Neither allocates through rpc_py or waits for the device per step or per compression:
outputs are torch tensors (the caching allocator) or the cache's reused scratch.
"""

from __future__ import annotations

import torch

from .. import torch_kernels as tk
from ..kernel_choice import kernels as _kernels_setting

__all__ = ["NativeOps", "TorchOps", "ops_for"]


class NativeOps:
    """rpc_py's own kernels, through ``rpc_py._C``."""

    name = "native"

    @staticmethod
    def append(layer, keys, values, stream) -> int:
        return layer.cache.kvcache.append(layer.layer_idx, keys, values, stream=stream)

    @staticmethod
    def record_query(layer, query, stream) -> None:
        layer.cache.kvcache.record_query(layer.layer_idx, query, stream=stream)

    @staticmethod
    def accumulate(layer, query, stream) -> None:
        layer.cache.kvcache.accumulate(layer.layer_idx, query, stream=stream)

    @staticmethod
    def compress_rpc(layer, start, keep, policy, indices, scores, stream) -> int:
        """RPC's fused compression (score, select, compact) of the layer with the settings of
        ``policy`` (an ``RPC``); the kept indices go to ``indices`` ([B, A, keep] int64), the scores to
        ``scores`` when it is not None."""
        return layer.cache.kvcache.compress(
            layer.layer_idx, start, keep, aggregation=policy.aggregation, pooling=policy.pooling,
            kernel_size=policy.kernel_size, stream=stream, scores_out=scores, indices_out=indices,
        )

    @staticmethod
    def select_compact(layer, scores, keep, start, stream):
        """Select the top ``keep`` of ``scores`` and compact the layer with them: (new length, indices)."""
        from .. import _C

        indices = torch.empty(*scores.shape[:2], keep, dtype=torch.int64, device=scores.device)
        _C.select(scores, keep, stream=stream, out=indices)
        return layer.cache.kvcache.compact(layer.layer_idx, start, indices, stream=stream), indices


class TorchOps:
    """The pure-torch path: the same work as ``NativeOps`` in float32 torch operations."""

    name = "torch"

    @staticmethod
    def append(layer, keys, values, stream) -> int:
        kv = layer.cache.kvcache
        i = layer.layer_idx
        t = keys.shape[-2]
        if kv.capacity(i) < layer.length + t:
            _grow(layer, keys, layer.length + t)
        k_store, v_store = layer.storage_views()
        tk.append_(k_store, v_store, keys, values, layer.length)
        return kv.advance(i, t)[0]

    @staticmethod
    def record_query(layer, query, stream) -> None:
        kv = layer.cache.kvcache
        i = layer.layer_idx
        if kv.num_queries(i) == 0 and kv.ring_position(i) == 0:
            # The ring is allocated by its first record; its slot is then written again below, so the
            # stored value comes from torch either way.
            kv.record_query(i, query, stream=stream)
            ring = torch.from_dlpack(kv.queries(i))
            tk.ring_write_(ring, query, 0)
            return
        ring = torch.from_dlpack(kv.queries(i))
        tk.ring_write_(ring, query, kv.ring_position(i))
        kv.advance(i, 0, 1)

    @staticmethod
    def accumulate(layer, query, stream) -> None:
        kv = layer.cache.kvcache
        acc = torch.from_dlpack(kv.accumulator(layer.layer_idx))
        k_store, _ = layer.storage_views()
        pad = layer.cache.padding_tensor(acc.shape[0], acc.device)
        tk.accumulate_(acc, query, k_store, layer.length, padding=pad)

    @staticmethod
    def compress_rpc(layer, start, keep, policy, indices, scores, stream) -> int:
        kv = layer.cache.kvcache
        i = layer.layer_idx
        k_store, _ = layer.storage_views()
        end = layer.length - layer.cache.rpc.window
        queries = torch.from_dlpack(kv.queries(i))
        got = tk.score(queries, k_store[:, :, : layer.length], start, end, aggregation=policy.aggregation,
                       pooling=policy.pooling, kernel_size=policy.kernel_size)
        if scores is not None:
            scores.copy_(got)
        indices.copy_(tk.select(got, keep))
        return TorchOps._compact(layer, start, indices)

    @staticmethod
    def select_compact(layer, scores, keep, start, stream):
        indices = tk.select(scores, keep)
        return TorchOps._compact(layer, start, indices), indices

    @staticmethod
    def _compact(layer, start, indices) -> int:
        kv = layer.cache.kvcache
        i = layer.layer_idx
        length = layer.length
        k_store, v_store = layer.storage_views()
        acc = torch.from_dlpack(kv.accumulator(i)) if kv.accumulators else None  # [B, H, length]
        end = length - layer.cache.rpc.window
        new_length = tk.compact_(k_store[:, :, :length], v_store[:, :, :length], indices, start, end, length, acc=acc)
        return kv.set_length(i, new_length)


def _grow(layer, keys: torch.Tensor, needed: int) -> None:
    """Grow the layer's storage for the torch path: the C cache allocates the new block (and copies
    into it with its own kernel); the live tokens are then copied again from the old block with
    torch, so what the layer holds never depends on rpc_py's kernels."""
    kv = layer.cache.kvcache
    i = layer.layer_idx
    old = layer.storage_views() if kv.capacity(i) > 0 else None
    length = layer.length
    capacity = kv.capacity(i)
    grown = max(2 * capacity, layer.cache.capacity, 256, needed)
    limit = layer.cache.max_capacity
    if limit is not None and limit >= needed:
        grown = min(grown, limit)
    device = keys.device
    kv.allocate(i, device.type, device.index or 0, max(grown, needed),
                stream=torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
    if old is not None and length > 0:
        k_new, v_new = layer.storage_views()
        k_new[:, :, :length].copy_(old[0][:, :, :length])
        v_new[:, :, :length].copy_(old[1][:, :, :length])


def ops_for(device: torch.device):
    """The ops a new cache layer on ``device`` uses, from the ``rpc_py.kernel_choice`` setting."""
    return TorchOps if _kernels_setting() == "torch" else NativeOps
