"""What the generation entry points share without depending on each other: the latest cache
(``rpc_py.last_cache``), the check that a model is one RPC can serve, and the name a model's forward
takes its cache by. ``rpc_py.hf.generate`` (eager) and ``rpc_py.hf.graph`` (CUDA-graph decoding) both
import this module; it imports neither.
"""

from __future__ import annotations

import inspect
import threading
import weakref

from .attention import rpc_implementation_for
from .cache import RPCCache

__all__ = ["LATEST", "LatestCache", "last_cache", "check_model_supported", "cache_kwarg"]


class LatestCache:
    """The latest cache of a series of calls. Held weakly while somebody else may own it (the call
    that is running, or the output it was returned in), strongly once rpc_py released it (then only
    its statistics remain, so keeping it costs nothing)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._get = lambda: None

    def started(self, cache: RPCCache) -> None:
        with self._lock:
            self._get = weakref.ref(cache)

    def released(self, cache: RPCCache) -> None:
        with self._lock:
            if self._get() is cache:
                self._get = lambda: cache

    def get(self) -> RPCCache | None:
        return self._get()


LATEST = LatestCache()


def last_cache() -> RPCCache | None:
    """The RPCCache of the most recent ``rpc_py.generate`` (or ``compress``-d generate) call in any
    thread (set when the call starts, so a streamer can watch it), for its statistics (``.stats()``,
    ``.summary()``). A cache that ``generate`` returned is not kept alive by this: once the output
    holding it is gone, this returns None."""
    return LATEST.get()


def check_model_supported(model) -> None:
    """Raise a clear error if ``model`` is not a decoder-only model with full attention in every
    layer and a standard per-layer KV cache (what RPC compresses)."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        raise TypeError(f"rpc_py: model: expected a transformers generative model, got {type(model).__name__}")
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"rpc_py: {name} is an encoder-decoder model; RPC supports decoder-only models")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    supports_cache = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports_cache) and not supports_cache():
        raise NotImplementedError(
            f"rpc_py: {name} does not use a standard KV cache (recurrent / state-space / custom cache)"
        )
    # A sliding window at least as long as the longest position the model takes (Phi-3.5 style
    # configs) never hides a token: that attention is full.
    window = getattr(text, "sliding_window", None)
    max_positions = getattr(text, "max_position_embeddings", None)
    window_is_full = isinstance(window, int) and isinstance(max_positions, int) and window >= max_positions
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        other = sorted({t for t in layer_types
                        if t != "full_attention" and not (t == "sliding_attention" and window_is_full)})
        if other:
            raise NotImplementedError(
                f"rpc_py: {name} has layers of type {other}; RPC supports full-attention layers only "
                "(sliding-window, chunked, linear-attention and hybrid layers are not supported)"
            )
    else:
        if window is not None and getattr(text, "use_sliding_window", True) and not window_is_full:
            raise NotImplementedError(
                f"rpc_py: {name} uses sliding-window attention (config.sliding_window={window} < "
                f"max_position_embeddings={max_positions}); RPC supports full attention only (set sliding_window=None)"
            )
        if getattr(text, "attention_chunk_size", None) is not None:
            raise NotImplementedError(f"rpc_py: {name} uses chunked attention; RPC supports full attention only")
    for attr in ("kv_lora_rank", "num_kv_shared_layers", "kv_sharing_modes"):
        if getattr(text, attr, None):
            raise NotImplementedError(
                f"rpc_py: {name} has config.{attr}; latent-attention and shared-KV layers are not supported"
            )
    for attr in ("num_hidden_layers", "num_attention_heads"):
        if not isinstance(getattr(text, attr, None), int):
            raise NotImplementedError(f"rpc_py: {name}: the decoder config has no integer {attr}")
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        raise NotImplementedError(
            f"rpc_py: {name} does not dispatch attention through transformers.AttentionInterface"
        )
    rpc_implementation_for(getattr(config, "_attn_implementation", None))  # raises for flash/flex


def cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use what the model takes."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
