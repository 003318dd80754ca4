"""Attention functions that let RPCCache see the queries.

transformers hands the post-RoPE query only to the attention function, never to the cache, so RPC
registers two wrappers in ``transformers.AttentionInterface``: ``rpc_sdpa`` around the built-in
SDPA function and ``rpc_eager`` around the model's own eager function (each modeling file defines
its ``eager_attention_forward``; it is looked up from the attention module's class). The wrapper
picks up the cache layer that was updated just before in the same thread (``cache.take_pending``),
hands the original function that layer's mask over its physical slots (transformers builds it over
logical positions; a layer that was never compressed returns it unchanged), runs it, then lets the
layer record the query and compress. Without a pending RPCCache layer (a plain cache, a vision
tower, no cache at all, another thread's generation) the wrappers are exactly the original
functions, which is what lets plain and compressed generations share a model.

The same names are registered in ``AttentionMaskInterface`` with the stock SDPA and eager mask
builders: transformers skips mask creation entirely for names it does not know.
"""

from __future__ import annotations

import sys

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .cache import take_pending

__all__ = ["RPC_SDPA", "RPC_EAGER", "register_attention", "rpc_implementation_for"]

RPC_SDPA = "rpc_sdpa"
RPC_EAGER = "rpc_eager"

_EAGER_BY_CLASS: dict[type, object] = {}


def _eager_function(module):
    cls = type(module)
    fn = _EAGER_BY_CLASS.get(cls)
    if fn is None:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            raise NotImplementedError(
                f"rpc_eager: {cls.__name__} (module {cls.__module__}) has no eager_attention_forward; "
                "use attn_implementation='sdpa' with rpc_py"
            )
        _EAGER_BY_CLASS[cls] = fn
    return fn


def _run(fn, module, query, key, value, attention_mask, kwargs):
    layer = take_pending(getattr(module, "layer_idx", None), key)
    if layer is None:
        return fn(module, query, key, value, attention_mask, **kwargs)
    try:
        attention_mask = layer.attention_mask(attention_mask, query)
        out = fn(module, query, key, value, attention_mask, **kwargs)
    except BaseException:
        layer.awaiting_attention = False  # the step failed; do not report a missing hook next time
        raise
    layer.after_attention(query)
    return out


def rpc_sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
    return _run(sdpa_attention_forward, module, query, key, value, attention_mask, kwargs)


def rpc_eager_attention_forward(module, query, key, value, attention_mask, **kwargs):
    return _run(_eager_function(module), module, query, key, value, attention_mask, kwargs)


_registered = False


def register_attention() -> None:
    """Register ``rpc_sdpa`` and ``rpc_eager`` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    AttentionInterface.register(RPC_SDPA, rpc_sdpa_attention_forward)
    AttentionInterface.register(RPC_EAGER, rpc_eager_attention_forward)
    AttentionMaskInterface.register(RPC_SDPA, sdpa_mask)
    AttentionMaskInterface.register(RPC_EAGER, eager_mask)
    _registered = True


def rpc_implementation_for(current: str | None) -> str:
    """The rpc attention name that wraps the model's current implementation."""
    if current in (RPC_SDPA, RPC_EAGER):
        return current
    if current == "eager":
        return RPC_EAGER
    if current in (None, "sdpa"):
        return RPC_SDPA
    raise ValueError(
        f"rpc_py supports models running attn_implementation 'sdpa' or 'eager', got {current!r}; "
        "load the model with attn_implementation='sdpa'"
    )
