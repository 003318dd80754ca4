"""The worker side of RPC in vLLM: physical slots, trimmed block tables, and the step plan.

vLLM keeps one logical token count per request (``num_computed_tokens``); positions (RoPE), the
tokens fed in and every stop condition come from it, unchanged. Under RPC a request holds fewer
slots than it has seen, so ``RPCModelRunner._prepare_inputs`` rewrites only what addresses the cache:
the slot of each new token is its *physical* index (logical position minus the tokens the schedule
has dropped so far) and the attention length is the physical length. Both follow from the request's
prompt length and logical length (``rpc_py.vllm.settings``), exactly as the scheduler computes them
when it sizes and frees blocks, so the two never need to talk.

After a compression the scheduler returns the blocks that held only dropped slots; before the next
step of that request the runner trims the same blocks from its own block table (the kept tokens were
compacted into the first slots, so the freed blocks are always the trailing ones).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .settings import config_from_dict, evicted, physical, request_config, step_plan
from .state import WORKER, Step, StepEntry, set_step
from .versions import check_version

__all__ = ["RPCWorker", "RPCModelRunner"]


def _engine_settings(vllm_config):
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = dict(extra.get("rpc_py") or {})
    record = bool(raw.pop("record_positions", False))
    return config_from_dict(raw or None), record


class RPCModelRunner(CPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self._rpc_default, record = _engine_settings(vllm_config)
        WORKER.reset(track_positions=record)
        self._rpc_configs: dict = {}
        self._block_size = vllm_config.cache_config.block_size

    def _rpc_of(self, req_id: str):
        if req_id not in self._rpc_configs:
            state = self.requests.get(req_id)
            sp = state.sampling_params if state is not None else None
            self._rpc_configs[req_id] = request_config(sp, self._rpc_default)
        return self._rpc_configs[req_id]

    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:
            WORKER.drop(req_id)
            self._rpc_configs.pop(req_id, None)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            if req_id in cached.resumed_req_ids:  # preempted: every block freed, recomputed from the prompt
                WORKER.drop(req_id, keep=False)
                continue
            state = self.requests.get(req_id)
            rpc = self._rpc_of(req_id) if state is not None else None
            if rpc is None:
                continue
            keep = math.ceil(physical(rpc, state.num_prompt_tokens, computed) / self._block_size)
            ids = state.block_ids[0]
            if len(ids) > keep:  # the scheduler returned these blocks after a compression
                del ids[keep:]
                row = self.input_batch.req_id_to_index.get(req_id)
                if row is not None:
                    table = self.input_batch.block_table[0]
                    table.block_table.np[row, :] = 0
                    table.add_row(ids, row)
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        entries, dropped, any_rpc = [], np.zeros(num_reqs, dtype=np.int64), False
        for row, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            rpc = self._rpc_of(req_id)
            state = self.requests[req_id]
            prompt = state.num_prompt_tokens
            before = int(self.input_batch.num_computed_tokens_cpu[row])
            n = int(num_scheduled_tokens[row])
            plan = None
            if rpc is not None:
                any_rpc = True
                if before >= prompt:
                    if n != 1:
                        raise RuntimeError(f"rpc_py.vllm: request {req_id} got {n} tokens in one step past its prompt "
                                           "(the RPC scheduler runs generated tokens one per step)")
                    plan = step_plan(rpc, prompt, before + 1)
                dropped[row] = evicted(rpc, prompt, before)
                WORKER.get(req_id, rpc, prompt).length = physical(rpc, prompt, before + n)
            entries.append(StepEntry(req_id, row, rpc, prompt, plan))
        if dropped.any():
            total = int(num_scheduled_tokens.sum())
            per_token = torch.from_numpy(np.repeat(dropped, num_scheduled_tokens))
            physical_positions = self.positions[:total] - per_token  # RoPE keeps the logical positions
            self.input_batch.block_table.compute_slot_mapping(num_reqs, self.query_start_loc.gpu[: num_reqs + 1],
                                                              physical_positions)
            d = torch.from_numpy(dropped)
            self.seq_lens[:num_reqs] -= d.to(self.seq_lens.dtype)
            self.optimistic_seq_lens_cpu[:num_reqs] -= d.to(self.optimistic_seq_lens_cpu.dtype)
        set_step(Step(entries) if any_rpc else None)
        return out

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        try:
            return super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            set_step(None)


class RPCWorker(CPUWorker):
    """``worker_cls`` of an engine with RPC: installs the RPC attention backend and runner."""

    def __init__(self, *args, **kwargs):
        check_version()
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CPU_ATTN, "rpc_py.vllm.attention.RPCAttentionBackend")
        super().__init__(*args, **kwargs)

    def init_device(self):
        import vllm.v1.worker.cpu_worker as cpu_worker

        original = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = RPCModelRunner
        try:
            return super().init_device()
        finally:
            cpu_worker.CPUModelRunner = original

    # -- collective_rpc methods (tests, debugging)
    def rpc_py_kept_positions(self, request_id: str):
        """Per layer, the logical position of every physical slot of a finished request (recorded when
        the engine's settings have ``"record_positions": true``); ``request_id``: the id given to vLLM or
        its internal one. None when unknown."""
        return WORKER.finished_positions(request_id)

    def rpc_py_requests(self):
        """{"live": ids with RPC state on this worker, "finished": ids whose layout is recorded} (vLLM's
        internal ids; the worker hears that a request ended at the next scheduled step)."""
        return {"live": sorted(WORKER.requests), "finished": list(WORKER.finished)}
