"""Launch-free decoding: one decode step (q_len = 1) captured in a CUDA graph and replayed.

The eager transformers loop is bound by kernel-launch and Python overhead, so a smaller (compressed)
KV cache only turns into throughput once the step runs without that overhead. This module runs the
prompt through the normal RPC path (``RPCCache`` + the ``rpc_sdpa`` attention), then decodes with a
*static step*: every tensor the step touches has a fixed address, and every position it needs is
read on the device:

* K/V storage: the RPCCache's C ``KVCache`` preallocated for the schedule's peak, so it never moves;
  compaction is in place, so compressing between replays keeps the graph valid.
* ``_StaticLayer.update`` appends with ``_C.append_at_length`` (position = the layer's device
  ``lengths[0]``, bumped on the device) and returns the full-capacity storage.
* The ``rpc_decode`` attention function runs ``_C.decode_attention`` (one query token, GQA, split
  along the sequence on CUDA), which reads the live length from the same device array and masks the
  left padding, then writes the query into the ring with ``_C.ring_write`` (slot from the device
  ``seen``). ``rpc_decode`` is registered in ``AttentionInterface`` only, so transformers builds no
  mask for it (nothing to inspect while capturing).
* RoPE positions come from a device tensor that the step itself increments.

Between replays the host does what needs its decisions: compression when the RPC schedule says so
(the host knows every layer's length without reading the device: one token per step), sampling (on
the static logits, eager, the same processors and RNG calls as ``generate``) and stopping (checked
every ``sync_every`` steps, the only host sync). ``KVCache.advance`` then brings the C cache's host
counters up to what the kernels did.

``static_decode(..., capture=False)`` runs exactly the same step without a graph; that is how the
CPU tests check the static path against the eager one. The user entry point is
``rpc_py.hf.generate.graph_generate`` (``rpc_py.generate(..., cuda_graph=True)``): it captures on CUDA
and falls back to the eager loop with a warning where ``capture_unavailable`` gives a reason.
"""

from __future__ import annotations

import threading
import warnings

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import _C
from ..config import RPCConfig
from ..kernel_choice import kernels
from ..selfcheck import ensure
from .attention import register_attention, rpc_implementation_for
from .cache import RPCCache
from .registry import LATEST, cache_kwarg, check_model_supported
from .parallel import find_tensor_parallel

__all__ = ["RPC_DECODE", "static_decode", "capture_unavailable", "GraphFallbackWarning", "capture_blockers"]

RPC_DECODE = "rpc_decode"

_ACTIVE = threading.local()  # the _StaticCache whose step is running in this thread


class GraphFallbackWarning(UserWarning):
    """CUDA-graph decoding was requested but is impossible here; the eager path ran instead."""


def _stream_of(t: torch.Tensor):
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else None


# ---------------------------------------------------------------------------------- the static step


class _StaticLayer(CacheLayerMixin):
    """One layer of the static step: appends on the device, returns the full-capacity storage."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "_StaticCache", idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # storage exists before the first step
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        _C.append_at_length(o.k_store[self.layer_idx], o.v_store[self.layer_idx], key_states, value_states,
                            o.lengths[self.layer_idx], stream=_stream_of(key_states))
        return o.k_store[self.layer_idx], o.v_store[self.layer_idx]

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_mask_sizes(self, query_length: int):
        return self.owner.capacity, 0

    def get_max_length(self) -> int:
        return self.owner.capacity

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5.2x
        return self.owner.capacity

    def reset(self):
        raise NotImplementedError("the static decode cache cannot be reset")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("the static decode cache does not support beam search")

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("the static decode cache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("the static decode cache does not support batch reordering")

    def batch_select_indices(self, indices):
        raise NotImplementedError("the static decode cache does not support batch reordering")


class _StaticCache(Cache):
    """The cache object handed to the model during static steps; all state lives in fixed buffers."""

    def __init__(self, rpc_cache: RPCCache, padding: torch.Tensor, window_offset: list[int]):
        kv = rpc_cache.kvcache
        n = rpc_cache.num_layers
        self.rpc_cache = rpc_cache
        self.k_store = [torch.from_dlpack(kv.storage_keys(i)) for i in range(n)]
        self.v_store = [torch.from_dlpack(kv.storage_values(i)) for i in range(n)]
        self.lengths = [torch.from_dlpack(kv.device_lengths(i)) for i in range(n)]
        self.generations = [kv.generation(i) for i in range(n)]
        self.capacity = kv.capacity(0)
        self.window = rpc_cache.rpc.window if rpc_cache.rpc.enabled else 0
        self.rings = [torch.from_dlpack(kv.queries(i)) for i in range(n)] if self.window else None
        self.window_offset = window_offset
        self.padding = padding
        self.seen = kv.seen(0)  # host mirror, only for transformers' bookkeeping
        B, Hkv, cap, D = self.k_store[0].shape
        Hq = rpc_cache.num_q_heads
        self.splits, floats = _C.decode_workspace_size(B, Hq, Hkv, D, cap)
        device, dtype = self.k_store[0].device, self.k_store[0].dtype
        self.workspace = torch.empty(max(floats, 1), dtype=torch.float32, device=device)
        self.outs = [torch.empty(B, 1, Hq, D, dtype=dtype, device=device) for _ in range(n)]
        super().__init__(layers=[_StaticLayer(self, i) for i in range(n)])

    def check_not_moved(self) -> None:
        kv = self.rpc_cache.kvcache
        for i, g in enumerate(self.generations):
            if kv.generation(i) != g:
                raise RuntimeError(f"static decode: layer {i} storage was reallocated; the captured step is invalid")


def rpc_decode_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function of the static step (q_len = 1 only)."""
    cache = getattr(_ACTIVE, "cache", None)
    if cache is None:
        raise RuntimeError(
            "rpc_decode attention runs only inside rpc_py's static decode step; use 'rpc_sdpa' elsewhere"
        )
    if query.shape[2] != 1:
        raise ValueError(f"rpc_decode: expected one query token per sequence, got {query.shape[2]}")
    i = module.layer_idx
    out = cache.outs[i]
    stream = _stream_of(query)
    _C.decode_attention(query, key, value, out.transpose(1, 2), cache.lengths[i], padding=cache.padding,
                        scale=scaling, workspace=cache.workspace, splits=cache.splits, stream=stream)
    if cache.window:
        _C.ring_write(cache.rings[i], query, cache.lengths[i], offset=cache.window_offset[i], stream=stream)
    return out, None


_registered = False


def register_decode_attention() -> None:
    """Register ``rpc_decode`` in transformers' AttentionInterface (not in the mask interface, so that
    transformers builds no mask for it). Idempotent."""
    global _registered
    if not _registered:
        AttentionInterface.register(RPC_DECODE, rpc_decode_attention_forward)
        _registered = True


# ---------------------------------------------------------------------------------- capture blockers

# Config fields that give a mixture-of-experts layer its expert count (Mixtral, Qwen2/3-MoE, DeepSeek, ...).
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _rope_types(obj) -> list[str]:
    t = getattr(obj, "rope_type", None)
    if isinstance(t, dict):
        return [v for v in t.values() if isinstance(v, str)]
    return [t] if isinstance(t, str) else []


def capture_blockers(model) -> list[str]:
    """Why one decode step of ``model`` cannot be recorded in a CUDA graph: parts of the forward pass
    that read device values on the host (a sync, illegal while a stream is capturing). Empty when none
    is known. Checked:

    * RoPE that recomputes its frequencies from the positions (``dynamic``/``*dynamic*`` and
      ``longrope`` rope types): transformers' ``dynamic_rope_update`` takes ``torch.max(position_ids)``
      and branches on it in Python.
    * Mixture-of-experts layers: token routing gathers each expert's tokens with data-dependent shapes
      (``nonzero`` / ``torch.where``), which needs their count on the host.
    """
    reasons: list[str] = []
    seen: set[str] = set()
    for name, module in model.named_modules():
        for t in _rope_types(module):
            if ("dynamic" in t or t == "longrope") and t not in seen:
                seen.add(t)
                reasons.append(f"RoPE type {t!r} ({name or 'model'}) recomputes its frequencies from "
                               "torch.max(position_ids) on the host")
    text = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    if text is not None:
        rp = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
        if isinstance(rp, dict):
            t = rp.get("rope_type", rp.get("type"))
            if isinstance(t, str) and ("dynamic" in t or t == "longrope") and t not in seen:
                seen.add(t)
                reasons.append(f"RoPE type {t!r} (config) recomputes its frequencies from torch.max(position_ids) "
                               "on the host")
        for field in _MOE_FIELDS:
            n = getattr(text, field, None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 1:
                reasons.append(f"mixture-of-experts routing ({field}={n}) selects each expert's tokens with "
                               "data-dependent shapes (nonzero), a host sync")
                break
    return reasons


# ---------------------------------------------------------------------------------- sampling


class _Sampler:
    """The logits processing and token choice of ``generate`` for greedy / temperature / top-k / top-p,
    built from the same transformers processors, so the same RNG calls give the same tokens."""

    def __init__(self, do_sample: bool, temperature: float, top_k: int, top_p: float, generator):
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.do_sample = do_sample
        self.generator = generator
        self.procs = LogitsProcessorList()
        if do_sample:
            if temperature is not None and temperature != 1.0:
                self.procs.append(TemperatureLogitsWarper(temperature))
            if top_k is not None and top_k != 0:
                self.procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
            if top_p is not None and top_p < 1.0:
                self.procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids, logits: torch.Tensor) -> torch.Tensor:
        scores = self.procs(input_ids, logits)
        if not self.do_sample:
            return torch.argmax(scores, dim=-1)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


# ---------------------------------------------------------------------------------- the loop


_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")


def _generation_settings(model, kwargs):
    unknown = sorted(set(kwargs) - set(_SETTINGS) - set(_NEUTRAL))
    if unknown:
        raise TypeError(f"static decode: unexpected generation arguments {unknown}")
    gc = model.generation_config
    get = lambda k, default=None: kwargs.pop(k, getattr(gc, k, default))  # noqa: E731
    s = dict(
        do_sample=bool(get("do_sample", False)),
        temperature=get("temperature", 1.0),
        top_k=get("top_k", 50),
        top_p=get("top_p", 1.0),
        eos_token_id=get("eos_token_id"),
        pad_token_id=get("pad_token_id"),
    )
    if s["temperature"] is None:
        s["temperature"] = 1.0
    if s["top_p"] is None:
        s["top_p"] = 1.0
    if s["top_k"] is None:
        s["top_k"] = 0
    return s


def _unsupported_generation(model, kwargs) -> str | None:
    """Why the static loop cannot reproduce this generate call, or None."""
    gc = model.generation_config
    for key, neutral in _NEUTRAL.items():
        value = kwargs.get(key, getattr(gc, key, neutral))
        if value not in (neutral, None) and not (neutral is None and not value):
            return f"{key}={value!r}"
    return None


_NEUTRAL = dict((("num_beams", 1), ("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0),
                         ("min_new_tokens", 0), ("min_length", 0), ("min_p", None), ("typical_p", 1.0),
                         ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0), ("bad_words_ids", None),
                         ("begin_suppress_tokens", None), ("suppress_tokens", None),
                         ("forced_bos_token_id", None), ("forced_eos_token_id", None),
                         ("num_return_sequences", 1), ("logits_processor", None), ("stopping_criteria", None),
                         ("stop_strings", None), ("streamer", None), ("output_scores", False),
                         ("output_logits", False), ("return_dict_in_generate", False)))


@torch.no_grad()
def static_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  rpc: RPCConfig | None = RPCConfig(), max_new_tokens: int, capture: bool = False,
                  generator: torch.Generator | None = None, sync_every: int = 16, warmup_steps: int = 2,
                  **generation_kwargs) -> torch.Tensor:
    """Generate with the static decode step; returns ``[B, prompt + new]`` token ids like ``generate``.

    ``capture=True`` records the step in a CUDA graph (CUDA models only) after ``warmup_steps`` eager
    steps and replays it; ``capture=False`` calls the same step eagerly (any device; used by tests).
    ``generation_kwargs``: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
    ``pad_token_id`` (defaults from ``model.generation_config``, as ``generate``). Sampling draws from
    ``generator`` (``None``: torch's global RNG, as ``generate``).
    """
    check_model_supported(model)
    why = _unsupported_generation(model, generation_kwargs)
    if why is not None:
        raise NotImplementedError(f"static decode does not support {why}; use rpc_py.generate")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, prompt], got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    if capture and device.type != "cuda":
        raise ValueError(f"capture=True needs a CUDA model, got input_ids on {device}")
    if kernels() != "native":
        raise ValueError("static decoding runs rpc_py's own decode kernels, but the pure-torch kernels are selected "
                         "(rpc_py.set_kernels / RPC_PY_KERNELS); use rpc_py.generate")
    if capture:
        why = capture_unavailable(model, input_ids, generation_kwargs)
        if why is not None:
            warnings.warn(f"rpc_py: the decode step cannot be captured in a CUDA graph ({why}); running the same "
                          "step without a graph", GraphFallbackWarning, stacklevel=2)
            capture = False
    settings = _generation_settings(model, dict(generation_kwargs))
    rpc = RPCConfig.resolve(rpc)
    B, Lp = input_ids.shape
    if device.type == "cuda":  # the decode kernels' first use on this device: checked against the CPU ones
        text = model.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        ensure(device, ["decode"], dtype=model.dtype, head_dim=head_dim)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    padding = (attention_mask.cumsum(-1) == 0).sum(-1)
    capacity = rpc.peak_length(Lp, max_new_tokens) if rpc.enabled else Lp + max_new_tokens
    cache = RPCCache(model, rpc, capacity=capacity, padding=padding.cpu())
    LATEST.started(cache)  # rpc_py.last_cache() reports this call, as after rpc_py.generate
    eos = settings["eos_token_id"]
    eos = torch.as_tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=device)
    pad_id = settings["pad_token_id"]
    if pad_id is None:
        pad_id = int(eos[0]) if eos.numel() else 0
    sampler = _Sampler(settings["do_sample"], settings["temperature"], settings["top_k"], settings["top_p"], generator)

    register_attention()
    register_decode_attention()
    previous_impl = model.config._attn_implementation
    prefill_impl = rpc_implementation_for(previous_impl)
    graph = None
    try:
        # ---- prefill through the ordinary RPC path (same positions as generate: cumsum of the mask - 1)
        model.set_attn_implementation(prefill_impl)
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        cache_kw = cache_kwarg(model)  # transformers renamed past_key_values to cache
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_kw: cache})
        logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        del out
        tokens = input_ids
        unfinished = torch.ones(B, dtype=torch.bool, device=device)

        def choose(logits):
            nonlocal tokens, unfinished
            nxt = sampler(tokens, logits)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_id))
            tokens = torch.cat([tokens, nxt[:, None]], dim=-1)
            if eos.numel():
                unfinished = unfinished & ~torch.isin(nxt, eos)
            return nxt

        nxt = choose(logits)
        steps = max_new_tokens - 1
        if steps == 0 or (eos.numel() and not bool(unfinished.any())):
            return tokens

        # ---- static state
        kv = cache.kvcache
        n = cache.num_layers
        window_offset = [0] * n
        if rpc.enabled:
            Hq, D = cache.num_q_heads, kv.head_dim
            zero_q = torch.zeros(B, Hq, 1, D, dtype=cache.layers[0].keys.dtype, device=device)
            for i in range(n):
                if kv.num_queries(i) == 0:  # allocates the ring; the slot is overwritten long before use
                    kv.record_query(i, zero_q, stream=_stream_of(zero_q))
                ring_pos = kv.advance(i, 0)[1]
                # step s writes at (seen_after_append + offset) % W == (ring_pos + s) % W
                window_offset[i] = ring_pos - kv.seen(i) - 1
        static = _StaticCache(cache, padding.to(device=device, dtype=torch.int64), window_offset)
        ids = nxt[:, None].clone()
        pos = (position_ids[:, -1:] + 1).clone()
        logits_buf = torch.empty(B, logits.shape[-1], dtype=torch.float32, device=device)
        model.set_attn_implementation(RPC_DECODE)

        def step():
            _ACTIVE.cache = static
            try:
                o = model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kw: static})
                logits_buf.copy_(o.logits[:, -1, :])
                pos.add_(1)
            finally:
                _ACTIVE.cache = None

        # ---- host schedule (identical for every layer: one token per step)
        layer0 = cache.layers[0]
        phys = layer0.length
        pending = 0  # tokens appended by the kernels since the last KVCache.advance

        def sync_host(count_queries: bool):
            nonlocal pending
            for i, layer in enumerate(cache.layers):
                kv.advance(i, pending, pending if count_queries else 0)
                layer.adopt_kernel_steps(pending)
            pending = 0

        side = torch.cuda.Stream(device) if capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        for s in range(steps):
            if phys + 1 > static.capacity:
                raise RuntimeError(f"static decode: step {s} would overflow the capacity {static.capacity}")
            if capture and graph is None and s >= warmup_steps:
                static.check_not_moved()
                side.wait_stream(torch.cuda.current_stream(device))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    step()
                # capturing recorded the step without running it
            if graph is not None:
                graph.replay()
            elif side is not None:
                side.wait_stream(torch.cuda.current_stream(device))  # ids written by the sampler
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                step()
            static.seen += 1
            phys += 1
            pending += 1
            if rpc.compress_due(phys - layer0.prompt_length - layer0.kept):
                sync_host(True)
                for layer in cache.layers:
                    layer.compress_now(_stream_of(logits_buf))
                phys = layer0.length
                static.check_not_moved()
            nxt = choose(logits_buf)
            ids.copy_(nxt[:, None])
            if eos.numel() and (s + 1) % sync_every == 0 and not bool(unfinished.any()):
                break
        sync_host(rpc.enabled)
        if eos.numel() and not bool(unfinished.any()):
            # generate stops at the step where the last sequence finished; drop the extra steps
            first_eos = torch.isin(tokens[:, Lp:], eos).float().argmax(-1)
            tokens = tokens[:, : Lp + int(first_eos.max()) + 1]
        return tokens
    finally:
        _ACTIVE.cache = None
        model.set_attn_implementation(previous_impl)
        cache.release()
        LATEST.released(cache)  # its statistics stay reachable through rpc_py.last_cache()
        del graph


_TP_REASON = ("the model is tensor parallel (tp_size={size}): capturing its step's all-reduces in a CUDA graph "
              "has not been validated")


def capture_unavailable(model, input_ids, generation_kwargs: dict) -> str | None:
    """Why one decode step of this call cannot run as a captured CUDA graph, or None when it can: the
    one place that decides it (``graph_generate`` falls back to the eager loop on a reason,
    ``static_decode(capture=True)`` runs its step without a graph).

    Reasons: host syncs in the model's step (``capture_blockers``), a tensor-parallel model, a model
    off CUDA, no CUDA build, the pure-torch kernels selected, generation options the static loop does
    not reproduce, a model rpc_py does not serve, a head size the decode kernel lacks."""
    blockers = capture_blockers(model)
    tp = find_tensor_parallel(model)
    if tp is not None:
        blockers.append(_TP_REASON.format(size=tp.size))
    if blockers:
        return "; ".join(blockers)
    if input_ids.device.type != "cuda":
        return f"the model runs on {input_ids.device} (CUDA graphs need a CUDA device)"
    if not _C.cuda_built():
        return "rpc_py was built without CUDA"
    if kernels() != "native":
        return "the pure-torch kernels are selected (rpc_py.set_kernels / RPC_PY_KERNELS)"
    why = _unsupported_generation(model, generation_kwargs)
    if why is not None:
        return f"generation option {why} is not supported by the static decode loop"
    try:
        check_model_supported(model)
    except (NotImplementedError, TypeError, ValueError) as e:
        return str(e)
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim not in (64, 128, 256):
        return f"head_dim {head_dim} (the CUDA decode kernel supports 64, 128, 256)"
    return None
