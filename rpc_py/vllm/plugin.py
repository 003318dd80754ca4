"""The ``vllm.general_plugins`` entry point of rpc_py (installed with the package).

vLLM loads general plugins in each of its processes. With a supported vLLM, ``register`` wraps
``EngineArgs.create_engine_config`` so that an engine whose ``additional_config`` holds the ``rpc_py``
key (``LLM(..., additional_config={"rpc_py": {...}})``, ``vllm serve ... --additional-config
'{"rpc_py": {...}}'``) gets rpc_py's scheduler and worker; without that key nothing changes. With any
other vLLM version, the wrapper only refuses such an engine, naming the supported versions: rpc_py
never patches a vLLM it was not written for. A request's own settings are checked where vLLM admits
it (``check_request``), so a bad one is refused with an error instead of stopping the engine.
"""

from __future__ import annotations

import functools
import logging

from .settings import KEY
from .versions import SUPPORTED, installed_version

__all__ = ["register", "apply_to_config", "check_request"]

logger = logging.getLogger("rpc_py.vllm")

SCHEDULER = "rpc_py.vllm.scheduler.RPCScheduler"
WORKER = "rpc_py.vllm.worker.RPCWorker"


def apply_to_config(vllm_config) -> None:
    """Point an engine config that asks for RPC at rpc_py's scheduler and worker."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict) or KEY not in extra:
        return
    from .settings import config_from_dict
    from .versions import check_version

    check_version()
    settings = dict(extra[KEY] or {})
    settings.pop("record_positions", None)
    config_from_dict(settings or None)  # a bad setting fails here, before any process starts
    if vllm_config.device_config.device_type != "cpu":
        raise NotImplementedError("rpc_py.vllm: this release serves vLLM's CPU build only; GPU engines are untested")
    vllm_config.scheduler_config.scheduler_cls = SCHEDULER
    vllm_config.parallel_config.worker_cls = WORKER


def register() -> None:
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # not inside vLLM
        return
    original = EngineArgs.create_engine_config
    if getattr(original, "_rpc_py", False):
        return
    supported = (installed_version() or "").split("+")[0] in SUPPORTED

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        extra = getattr(self, "additional_config", None) or {}
        if isinstance(extra, dict) and KEY in extra and not supported:
            from .versions import check_version

            check_version()  # raises, naming the supported versions
        config = original(self, *args, **kwargs)
        if supported:
            apply_to_config(config)
        return config

    create_engine_config._rpc_py = True
    EngineArgs.create_engine_config = create_engine_config
    if supported:
        _validate_requests()


def check_request(params, vllm_config) -> None:
    """A request's own ``extra_args["rpc_py"]``, checked where vLLM admits it (a ``ValueError``: the
    OpenAI server answers 400), never later inside the engine, where an error would stop it."""
    extra = getattr(params, "extra_args", None) or {}
    if KEY not in extra:
        return
    engine = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(engine, dict) or KEY not in engine:
        raise ValueError("rpc_py: this request brings rpc_py settings (extra_args / vllm_xargs 'rpc_py') but the engine "
                         "was started without RPC; start it with additional_config={'rpc_py': {...}}")
    from .settings import config_from_dict

    config_from_dict(extra[KEY])


def _validate_requests() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, "_rpc_py", False):
        return

    from vllm.exceptions import VLLMValidationError

    class RPCSettingsError(VLLMValidationError, ValueError):
        """A request's rpc_py settings are wrong: a ValueError for the LLM API, a client error (HTTP 400)
        for vLLM's server."""

    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        try:
            check_request(params, self.vllm_config)
        except ValueError as e:
            raise RPCSettingsError(str(e), parameter="rpc_py") from e
        return original(self, params, *args, **kwargs)

    _validate_params._rpc_py = True
    InputProcessor._validate_params = _validate_params
