"""Which kernels run the cache's work: rpc_py's own C/CUDA kernels (``"native"``, the default) or the
pure-torch path (``"torch"``, ``rpc_py.torch_kernels``).

The torch path exists for hardware where a CUDA kernel of rpc_py fails its self-check
(``rpc_py.selfcheck``): appending, the query ring, H2O's accumulation, scoring (RPC and every
policy), selection and compaction then run as float32 torch operations on the tensors' device,
slower but independent of rpc_py's kernels. It runs on any device, so it is tested on the CPU.

Set it for the process with ``RPC_PY_KERNELS=torch`` in the environment, or from Python::

    rpc_py.set_kernels("torch")            # from now on
    with rpc_py.use_kernels("torch"):      # inside the block
        rpc_py.generate(model, ...)

A cache picks the kernels when it stores its first tokens and keeps them until it is released.
``graph_generate`` (CUDA graphs over rpc_py's decode kernels) falls back to the eager loop under the
torch path.
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["KERNELS", "kernels", "set_kernels", "use_kernels"]

KERNELS = ("native", "torch")

_lock = threading.Lock()
_current = None  # resolved from the environment on first use


def _check(name) -> str:
    if not isinstance(name, str) or name not in KERNELS:
        raise ValueError(f"kernels: expected one of {KERNELS}, got {name!r}")
    return name


def kernels() -> str:
    """The kernels new caches use: ``"native"`` or ``"torch"``."""
    global _current
    with _lock:
        if _current is None:
            env = os.environ.get("RPC_PY_KERNELS", "native").strip().lower() or "native"
            if env not in KERNELS:
                raise ValueError(f"RPC_PY_KERNELS: expected one of {KERNELS}, got {env!r}")
            _current = env
        return _current


def set_kernels(name: str) -> str:
    """Choose the kernels for caches created from now on; returns the previous choice."""
    global _current
    name = _check(name)
    previous = kernels()
    with _lock:
        _current = name
    return previous


@contextlib.contextmanager
def use_kernels(name: str):
    """``set_kernels(name)`` inside a ``with`` block, restored afterwards."""
    previous = set_kernels(name)
    try:
        yield
    finally:
        set_kernels(previous)
