"""The HuggingFace transformers integration of rpc_py: RPCCache, the rpc attention functions,
``generate`` and the ``compress`` context manager."""

from .attention import RPC_EAGER, RPC_SDPA, register_attention
from .cache import CompressionEvent, RPCCache, RPCCacheLayer, RPCStats
from .generate import (
    RPCHandle,
    UncompressedThreadWarning,
    check_model_supported,
    compress,
    generate,
    graph_generate,
    last_cache,
)
from .graph import GraphFallbackWarning, static_decode

__all__ = [
    "RPCCache",
    "RPCCacheLayer",
    "RPCStats",
    "CompressionEvent",
    "RPCHandle",
    "generate",
    "compress",
    "last_cache",
    "check_model_supported",
    "graph_generate",
    "static_decode",
    "GraphFallbackWarning",
    "UncompressedThreadWarning",
    "register_attention",
    "RPC_SDPA",
    "RPC_EAGER",
]
