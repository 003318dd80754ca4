"""vLLM's CPU attention backend with RPC's per-layer work after each attention call.

``RPCAttentionImpl.forward`` runs vLLM's attention unchanged (the step's K/V are already in the paged
cache, at the physical slots the runner mapped), then, for every request of the batch that decodes
under RPC (``rpc_py.vllm.state.Step``, set by the runner), does what ``RPCCacheLayer.after_attention``
does in transformers: H2O's accumulation, the query ring in the R steps before a compression, and the
compression itself when the schedule says so. A layer's compression only changes that layer's cache,
so compressing right after its attention gives exactly ``rpc_py.generate``'s cache.
"""

from __future__ import annotations

import torch

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .layout import PagedLayout
from .state import WORKER, current_step

__all__ = ["RPCAttentionBackend", "RPCAttentionImpl"]

_LAYOUTS: dict = {}


def _layout(kv_cache: torch.Tensor, isa: str) -> PagedLayout:
    _, kv_heads, block, twice_head = kv_cache.shape
    key = (kv_cache.dtype, block, kv_heads, twice_head // 2, isa)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = PagedLayout(kv_cache.dtype, block, kv_heads, twice_head // 2, isa)
        layout.check()
        _LAYOUTS[key] = layout
    return layout


def _layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(name)


class RPCAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        step = current_step()
        if attn_metadata is None or step is None or not step.active:
            return out
        layout = _layout(kv_cache, layer.isa)
        layer_idx = _layer_index(layer.layer_name)
        starts = attn_metadata.query_start_loc
        block_table = attn_metadata.block_table
        bs = layout.block_size
        for e in step.entries:
            plan = e.plan
            if plan is None:
                continue
            rpc = e.rpc
            policy = rpc.policy
            state = WORKER.get(e.req_id, rpc, e.prompt_len).layer(layer_idx)
            tok = int(starts[e.row])
            q = query[tok].unsqueeze(0).unsqueeze(2)  # [1, Hq, 1, D]: this step's query, after RoPE
            blocks = block_table[e.row]
            keys = values = None
            if policy.uses_accumulators or plan.compress:
                keys, values = layout.read(kv_cache, blocks, plan.length)
            if policy.uses_accumulators:
                state.accumulate(q, keys.permute(1, 0, 2).unsqueeze(0), plan.length)
            if plan.records_query and policy.uses_queries:
                state.record(q, rpc.window)
            if plan.compress:
                def write(k, v, first, blocks=blocks):
                    phys = torch.arange(first, first + k.shape[0], dtype=torch.int64)
                    slots = blocks.to(torch.int64)[phys // bs] * bs + phys % bs
                    layout.write(kv_cache, k, v, slots)

                state.compress(rpc, layer_idx, keys, values, e.prompt_len, plan.keep, query.shape[1], write)
        return out


class RPCAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls():
        return RPCAttentionImpl
