"""Public names of the transformers integration, re-exported by ``rpc_py``."""

from .config import RPCConfig
from .hf import CompressionEvent, RPCCache, RPCHandle, RPCStats, compress, generate, last_cache

__all__ = ["RPCConfig", "RPCCache", "RPCStats", "RPCHandle", "CompressionEvent", "generate", "compress", "last_cache"]
