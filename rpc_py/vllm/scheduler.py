"""The scheduler side of RPC in vLLM: blocks sized by physical length, trailing blocks returned.

A request keeps vLLM's logical token count. ``RPCFullAttentionManager`` sizes its blocks by what it
physically holds (``rpc_py.vllm.settings.physical``), so a compressed request asks for fewer blocks;
after every step ``RPCScheduler.update_from_output`` hands back the blocks past the physical length
(a compression compacts the kept tokens into the request's first slots), so the next ``schedule`` can
admit waiting requests into them. That is what RPC buys in a serving engine: more sequences in flight
for the same KV pool.

Generated tokens run one per step (the scheduler caps a chunk at the end of the prompt, then at one
token): a decode step always does, and so does a request resumed after preemption, whose generated
tokens are replayed one by one so that every compression happens again exactly as before (vLLM
recomputes a preempted request from scratch). Prefix caching stays on: only full blocks of the prompt,
which RPC never touches, are cached or reused for an RPC request.
"""

from __future__ import annotations

import math

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import RequestStatus

from .settings import evicted, physical, request_config
from .versions import check_version
from .worker import _engine_settings

__all__ = ["RPCScheduler", "RPCFullAttentionManager"]


class RPCFullAttentionManager(FullAttentionManager):
    """Installed by swapping ``__class__`` on the scheduler's full-attention manager."""

    scheduler: "RPCScheduler"

    def _dropped(self, request_id: str) -> int:
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return 0
        rpc = self.scheduler.rpc_of(request)
        return evicted(rpc, request.num_prompt_tokens, request.num_computed_tokens) if rpc is not None else 0

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs):
        return super().get_num_blocks_to_allocate(request_id, num_tokens - self._dropped(request_id), *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        d = self._dropped(request_id)
        return super().allocate_new_blocks(request_id, num_tokens - d, num_tokens_main_model - d)

    def cache_blocks(self, request, num_tokens, *args, **kwargs):
        rpc = self.scheduler.rpc_of(request)
        if rpc is not None:  # only the prompt's full blocks: compaction rewrites everything after the prompt
            num_tokens = min(num_tokens, request.num_prompt_tokens // self.block_size * self.block_size)
        return super().cache_blocks(request, num_tokens, *args, **kwargs)


class RPCScheduler(Scheduler):
    """``scheduler_cls`` of an engine with RPC (installed by the plugin from the ``rpc_py`` settings)."""

    def __init__(self, vllm_config, *args, **kwargs):
        check_version()
        _refuse_unsupported(vllm_config)
        super().__init__(vllm_config, *args, **kwargs)
        self.rpc_default, _ = _engine_settings(vllm_config)
        self._rpc_configs: dict = {}
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1 or type(managers[0]) is not FullAttentionManager:
            raise NotImplementedError(
                "rpc_py.vllm: RPC serves models whose every layer is full attention with one KV cache group; this "
                f"model's KV cache managers are {[type(m).__name__ for m in managers]} (sliding-window, hybrid, "
                "Mamba and MLA models are not supported)")
        managers[0].__class__ = RPCFullAttentionManager
        managers[0].scheduler = self
        self.rpc_manager = managers[0]
        self.rpc_block_size = managers[0].block_size
        self.rpc_blocks_returned = 0  # blocks handed back to the pool after compressions (statistics, tests)
        # vLLM calls this hook only for Mamba models; it is where a request's chunk can be capped.
        self.need_mamba_block_aligned_split = True
        original = self.kv_cache_manager.get_computed_blocks
        self.kv_cache_manager.get_computed_blocks = lambda request: self._prompt_hits_only(request, original)

    def rpc_of(self, request):
        rid = request.request_id
        if rid not in self._rpc_configs:
            self._rpc_configs[rid] = request_config(request.sampling_params, self.rpc_default)
        return self._rpc_configs[rid]

    def _mamba_block_aligned_split(self, request, num_new_tokens, num_new_local_computed_tokens=0,
                                   num_external_computed_tokens=0):
        if self.rpc_of(request) is None:
            return num_new_tokens
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        prompt = request.num_prompt_tokens
        if start < prompt:  # the prompt: any chunk, never past its end
            return min(num_new_tokens, prompt - start)
        return min(num_new_tokens, 1)  # a generated token (decode, or the replay of a preempted request)

    def _prompt_hits_only(self, request, lookup):
        blocks, hit, boundary = lookup(request)
        if hit and self.rpc_of(request) is not None:
            cap = request.num_prompt_tokens // self.rpc_block_size * self.rpc_block_size
            if hit > cap:
                keep = cap // self.rpc_block_size
                blocks = type(blocks)(tuple(group[:keep] for group in blocks.blocks))
                hit = cap
        return blocks, hit, boundary

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        pool = self.kv_cache_manager.block_pool
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            rpc = self.rpc_of(request)
            if rpc is None:
                continue
            need = math.ceil(physical(rpc, request.num_prompt_tokens, request.num_computed_tokens) / self.rpc_block_size)
            blocks = self.rpc_manager.req_to_blocks.get(req_id)
            if blocks is not None and len(blocks) > need:
                tail = blocks[need:]
                del blocks[need:]
                pool.free_blocks(reversed(tail))
                self.rpc_blocks_returned += len(tail)
        return outputs

    def _free_blocks(self, request):
        super()._free_blocks(request)
        self._rpc_configs.pop(request.request_id, None)


def _refuse_unsupported(vllm_config) -> None:
    problems = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        problems.append(f"tensor/pipeline parallelism (tp={parallel.tensor_parallel_size}, "
                        f"pp={parallel.pipeline_parallel_size})")
    model = vllm_config.model_config
    if getattr(model, "use_mla", False):
        problems.append("multi-head latent attention (MLA)")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in ("auto", "float32", "float16", "bfloat16"):
        problems.append(f"a quantized KV cache ({cache_dtype})")
    window = getattr(model.hf_text_config, "sliding_window", None)
    max_pos = getattr(model.hf_text_config, "max_position_embeddings", None)
    use_window = getattr(model.hf_text_config, "use_sliding_window", True)
    if window is not None and use_window and not (isinstance(max_pos, int) and window >= max_pos):
        problems.append(f"sliding-window attention (sliding_window={window})")
    if problems:
        raise NotImplementedError("rpc_py.vllm: RPC cannot serve this engine: " + "; ".join(problems))
