"""User entry points: ``rpc_py.generate`` and the ``rpc_py.compress`` context manager.

Both do the same three things around ``model.generate``: check up front that the model is one RPC
can serve, switch its attention implementation to the rpc wrapper of the one it uses (restored
afterwards, also on errors), and hand ``generate`` a fresh ``RPCCache`` per call, sized from the
prompt and the RPC schedule. transformers has no registry through which a library can supply the
default cache of ``generate`` (``cache_implementation`` is a closed list), so inside
``compress`` the model's ``generate`` is shadowed by an instance attribute that injects the cache;
leaving the context deletes that attribute (or puts back one the user had).

After a call the cache is released (its C storage freed) unless ``generate`` returned it
(``return_dict_in_generate=True`` puts it in the output), and its statistics stay readable:
``handle.last_cache`` / ``rpc_py.last_cache()``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from ..config import RPCConfig
from .attention import register_attention, rpc_implementation_for
from .cache import RPCCache, clear_pending

__all__ = ["generate", "compress", "RPCHandle", "last_cache", "check_model_supported"]

_LAST = threading.local()


def last_cache() -> RPCCache | None:
    """The RPCCache of the most recent ``rpc_py.generate`` (or ``compress``-d generate) call in
    this thread, for its statistics (``.stats()``, ``.summary()``)."""
    return getattr(_LAST, "cache", None)


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
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise NotImplementedError(
                f"rpc_py: {name} has layers of type {other}; RPC supports full-attention layers only "
                "(sliding-window, chunked, linear-attention and hybrid layers are not supported)"
            )
    else:
        if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
            raise NotImplementedError(
                f"rpc_py: {name} uses sliding-window attention (config.sliding_window="
                f"{text.sliding_window}); RPC supports full attention only (set sliding_window=None)"
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


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use what the model takes."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


_UNSUPPORTED_KWARGS = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "penalty_alpha": "contrastive search",
    "custom_generate": "custom generation loops",
    "prefill_chunk_size": None,  # allowed: chunks are all prompt
}


class RPCHandle:
    """Returned by ``rpc_py.compress``; ``generate`` on it (or on the model, inside the context)
    runs with a fresh RPCCache. ``last_cache`` holds the cache of the latest call."""

    def __init__(self, model, rpc: RPCConfig | None):
        if rpc is not None and not isinstance(rpc, RPCConfig):
            raise TypeError(f"rpc_py: rpc: expected an RPCConfig or None, got {type(rpc).__name__}")
        self.model = model
        self.rpc = rpc if rpc is not None else RPCConfig(enabled=False)
        self.last_cache: RPCCache | None = None
        self._original_generate = model.generate
        self._cache_kwarg = _cache_kwarg(model)
        self.active = False

    def __repr__(self) -> str:
        return f"RPCHandle({type(self.model).__name__}, {self.rpc!r}, active={self.active})"

    def _check_kwargs(self, kwargs: dict) -> None:
        for key, what in _UNSUPPORTED_KWARGS.items():
            if what is not None and kwargs.get(key) is not None:
                raise NotImplementedError(f"rpc_py: {what} ({key}=...) is not supported with RPC")
        gc = kwargs.get("generation_config") or self.model.generation_config
        num_beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
        if num_beams > 1:
            raise NotImplementedError(
                f"rpc_py: beam search (num_beams={num_beams}) is not supported with RPC; use num_beams=1"
            )
        if kwargs.get("use_cache", getattr(gc, "use_cache", True)) is False:
            raise ValueError("rpc_py: use_cache=False leaves nothing to compress; drop it or use model.generate")
        impl = kwargs.get("cache_implementation", getattr(gc, "cache_implementation", None))
        if impl is not None:
            raise ValueError(
                f"rpc_py: cache_implementation={impl!r} conflicts with the RPC cache; pass cache_implementation=None"
            )
        for key in ("past_key_values", "cache"):
            given = kwargs.get(key)
            if given is not None and not isinstance(given, RPCCache):
                raise ValueError(
                    f"rpc_py: {key}={type(given).__name__}(...): RPC creates its own cache for each call; "
                    "pass nothing, or an RPCCache"
                )

    def _max_new_tokens(self, kwargs: dict, prompt_length: int) -> int | None:
        gc = kwargs.get("generation_config") or self.model.generation_config
        max_new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
        if max_new is None:
            max_length = kwargs.get("max_length", getattr(gc, "max_length", None))
            if max_length is None:
                return None
            max_new = max_length - prompt_length
        return max(int(max_new), 0)

    def new_cache(self, prompt_length: int = 0, max_new_tokens: int | None = None, padding=None) -> RPCCache:
        """A fresh RPCCache for this model and config, preallocated for the schedule's peak."""
        capacity = 0
        if max_new_tokens is not None:
            capacity = self.rpc.peak_length(prompt_length, max_new_tokens)
        return RPCCache(self.model, self.rpc, capacity=capacity, padding=padding)

    def generate(self, *args, **kwargs):
        """``model.generate`` with a fresh RPCCache; returns what ``model.generate`` returns."""
        if not self.active:
            raise RuntimeError("rpc_py: this RPCHandle's compress() context has exited")
        self._check_kwargs(kwargs)
        # Explicit None checks: a Cache defines __len__, so truthiness is not "was it given".
        user_cache = kwargs.pop("past_key_values", None)
        if user_cache is None:
            user_cache = kwargs.pop("cache", None)
        if user_cache is not None:
            # The caller's own RPCCache: used as given and left open (it owns it).
            kwargs[self._cache_kwarg] = user_cache
            self.last_cache = user_cache
            _LAST.cache = user_cache
            try:
                return self._original_generate(*args, **kwargs)
            finally:
                clear_pending(user_cache)
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        embeds = kwargs.get("inputs_embeds")
        prompt_length = 0
        if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
            prompt_length = inputs.shape[-1]
        elif isinstance(embeds, torch.Tensor):
            prompt_length = embeds.shape[1]
        padding = None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            padding = (mask.cumsum(-1) == 0).sum(-1).cpu()  # leading zeros = left padding
        cache = self.new_cache(prompt_length, self._max_new_tokens(kwargs, prompt_length), padding)
        kwargs[self._cache_kwarg] = cache
        self.last_cache = cache
        _LAST.cache = cache
        try:
            out = self._original_generate(*args, **kwargs)
        except BaseException:
            cache.release()
            raise
        finally:
            clear_pending(cache)
        returned = getattr(out, "past_key_values", None) is cache or getattr(out, "cache", None) is cache
        if not returned:
            cache.release()
        return out


@contextlib.contextmanager
def compress(model, rpc: RPCConfig | None = RPCConfig()):
    """Run ``model.generate`` with RPC inside the block::

        with rpc_py.compress(model, RPCConfig(interval=1024)) as handle:
            out = model.generate(**inputs, max_new_tokens=4096)
        print(handle.last_cache.summary())

    The model's attention implementation and ``generate`` are restored on exit, also on errors.
    ``rpc=None`` uses the same path without compression.
    """
    check_model_supported(model)
    if getattr(model, "_rpc_handle", None) is not None:
        raise RuntimeError("rpc_py: this model is already inside rpc_py.compress(); contexts do not nest")
    handle = RPCHandle(model, rpc)
    register_attention()
    previous_impl = model.config._attn_implementation
    wanted = rpc_implementation_for(previous_impl)
    had_generate = "generate" in model.__dict__
    previous_generate = model.__dict__.get("generate")
    model.set_attn_implementation(wanted)
    try:
        if model.config._attn_implementation != wanted:
            raise NotImplementedError(
                f"rpc_py: {type(model).__name__} did not accept attn_implementation={wanted!r}"
            )
        model._rpc_handle = handle
        model.generate = handle.generate
        handle.active = True
        yield handle
    finally:
        handle.active = False
        if had_generate:
            model.generate = previous_generate
        elif "generate" in model.__dict__:
            del model.generate
        model.__dict__.pop("_rpc_handle", None)
        if model.config._attn_implementation != previous_impl:
            model.set_attn_implementation(previous_impl)


def generate(model, input_ids=None, attention_mask=None, rpc: RPCConfig | None = RPCConfig(), *,
             cuda_graph: bool = False, **generate_kwargs):
    """Drop-in for ``model.generate`` with Reasoning Path Compression of the KV cache.

    ``rpc=None`` runs the same cache path without compression (for ablations). Returns what
    ``model.generate`` returns; the cache's statistics are in ``rpc_py.last_cache()``.

    ``cuda_graph=True`` decodes with one captured CUDA-graph step replayed per token
    (``rpc_py.hf.graph``) and returns the token ids; where capture is impossible (CPU, options the
    static loop does not reproduce) it warns with ``GraphFallbackWarning`` and runs this eager path.
    It is off by default until it has been validated on a GPU (see README, "CUDA-graph decoding").
    """
    if cuda_graph:
        from .graph import graph_generate

        if input_ids is None:
            raise ValueError("rpc_py.generate: cuda_graph=True needs input_ids")
        if "max_new_tokens" not in generate_kwargs:
            raise ValueError("rpc_py.generate: cuda_graph=True needs max_new_tokens (the static cache is sized from it)")
        return graph_generate(model, input_ids, attention_mask, rpc=rpc, cuda_graph=True, **generate_kwargs)
    with compress(model, rpc) as handle:
        if input_ids is not None:
            generate_kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            generate_kwargs["attention_mask"] = attention_mask
        return handle.generate(**generate_kwargs)
