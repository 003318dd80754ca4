"""rpc_py: Reasoning Path Compression (RPC) of the KV cache for reasoning LLMs.

The native core is ``rpc_py._C`` (KVCache, View, Storage and the standalone operators). This module
re-exports the core types and says which backends this build and this machine provide:

``backend_features`` is a frozenset with
  - ``"cpu"``: always;
  - ``"cuda_built"``: the CUDA kernels were compiled in;
  - ``"cuda"``: CUDA was built *and* a device is usable now;
  - ``"openmp"``: the CPU code runs multi-threaded.
"""

from rpc_py import _C
from rpc_py._C import KVCache, Storage, View
from rpc_py.config import RPCConfig
from rpc_py.kernel_choice import kernels, set_kernels, use_kernels

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when the CUDA backend was compiled in and at least one device is usable now."""
    if not _C.cuda_built():
        return False
    try:
        return _C.cuda_device_count() > 0
    except RuntimeError:
        return False


def _features() -> frozenset:
    feats = {"cpu"}
    if _C.cuda_built():
        feats.add("cuda_built")
    if cuda_available():
        feats.add("cuda")
    if _C.openmp_built():
        feats.add("openmp")
    return frozenset(feats)


backend_features = _features()

# The transformers integration needs torch and transformers (the `hf` extra); it is imported on first
# use so that `import rpc_py` works with NumPy alone.
_HF_NAMES = ("RPCCache", "RPCStats", "RPCHandle", "CompressionEvent", "generate", "compress", "last_cache")


def __getattr__(name):
    if name in _HF_NAMES:
        from rpc_py import api

        return getattr(api, name)
    if name == "KernelCheckError":  # needs torch: imported on first use
        from rpc_py.selfcheck import KernelCheckError

        return KernelCheckError
    raise AttributeError(f"module 'rpc_py' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HF_NAMES) | {"KernelCheckError"})


__all__ = ["KVCache", "View", "Storage", "RPCConfig", "backend_features", "cuda_available", "__version__",
           "kernels", "set_kernels", "use_kernels", "KernelCheckError", *_HF_NAMES]
