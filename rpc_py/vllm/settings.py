"""RPC's settings inside vLLM, and the schedule both sides of the engine compute from them.

The engine default comes from ``additional_config={"rpc_py": {...}}`` (``--additional-config`` for
``vllm serve``); a request may bring its own in ``SamplingParams.extra_args["rpc_py"]`` (``vllm_xargs``
in the OpenAI server), or ``"off"``. Both are plain dicts (they travel as JSON / msgpack):

    {"interval": 256, "window": 32, "ratio": 4, "budget": null,
     "policy": "rpc", "policy_args": {"kernel_size": 7}}

The scheduler (block sizing, freeing) and the worker (slot mapping, compaction) never exchange the
state of a request: both derive it from the request's prompt length and its logical length with
the functions below, which are the ``RPCConfig`` schedule that ``rpc_py.generate`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import math

from ..config import RPCConfig
from ..policies import POLICIES

__all__ = ["KEY", "config_from_dict", "config_to_dict", "request_config", "evicted", "physical",
           "StepPlan", "step_plan", "blocks_needed"]

KEY = "rpc_py"  # the key in additional_config and in SamplingParams.extra_args
_FIELDS = ("interval", "window", "ratio", "budget")


def config_from_dict(value) -> RPCConfig | None:
    """An ``RPCConfig`` from the JSON-able form (``None`` / ``"off"`` / ``{"enabled": False}``: off).
    Raises ``ValueError`` naming the bad key."""
    if value is None or value == "off" or value is False:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"rpc_py settings: expected a JSON object or 'off', got {value!r}") from e
    if not isinstance(value, dict):
        raise ValueError(f"rpc_py settings: expected a dict, got {type(value).__name__}")
    known = set(_FIELDS) | {"policy", "policy_args", "enabled", "pooling", "kernel_size", "aggregation"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"rpc_py settings: unknown keys {unknown}; expected some of {sorted(known)}")
    if value.get("enabled", True) is False:
        return None
    name = value.get("policy", "rpc")
    cls = POLICIES.get(str(name).lower())
    if cls is None:
        raise ValueError(f"rpc_py settings: policy: expected one of {tuple(POLICIES)}, got {name!r}")
    args = value.get("policy_args") or {}
    if not isinstance(args, dict):
        raise ValueError("rpc_py settings: policy_args: expected a dict")
    policy = cls(**args)
    kwargs = {k: value[k] for k in _FIELDS if k in value}
    for k in ("pooling", "kernel_size", "aggregation"):
        if k in value:
            kwargs[k] = value[k]
    return RPCConfig(policy=policy, **kwargs)


def config_to_dict(rpc: RPCConfig | None):
    """The JSON-able form of ``rpc`` (``"off"`` for None or a disabled config)."""
    if rpc is None or not rpc.enabled:
        return "off"
    policy = rpc.policy
    args = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}
    return {"interval": rpc.interval, "window": rpc.window, "ratio": rpc.ratio, "budget": rpc.budget,
            "policy": policy.name, "policy_args": args}


def request_config(sampling_params, default: RPCConfig | None) -> RPCConfig | None:
    """The settings of one request: its own ``extra_args["rpc_py"]`` when present, else the engine's."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if KEY in extra:
        return config_from_dict(extra[KEY])
    return default


def physical(rpc: RPCConfig | None, prompt_len: int, logical: int) -> int:
    """Slots a request holds once ``logical`` tokens have their K/V (after that step's compression)."""
    if rpc is None or logical <= prompt_len:
        return logical
    return rpc.physical_length(prompt_len, logical - prompt_len)


def evicted(rpc: RPCConfig | None, prompt_len: int, logical: int) -> int:
    """Logical tokens dropped from the cache once ``logical`` tokens have their K/V."""
    return logical - physical(rpc, prompt_len, logical)


def blocks_needed(rpc: RPCConfig | None, prompt_len: int, logical: int, block_size: int) -> int:
    return math.ceil(physical(rpc, prompt_len, logical) / block_size)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One request's decode step (one token appended at logical position ``logical_after - 1``)."""

    slot: int            # physical index the new token is written to
    length: int          # physical tokens after the append (what attention reads)
    held: int            # generated tokens held since the last compression, the new one included
    compressions: int    # compressions done before this step
    records_query: bool  # the step's query is one of the last R before a compression
    compress: bool       # the layer compresses after this step's attention
    keep: int            # selected tokens kept by that compression (0 when none)
    length_after: int    # physical tokens after this step (after the compression, if any)


def step_plan(rpc: RPCConfig, prompt_len: int, logical_after: int) -> StepPlan:
    """The plan of the decode step that brings a request to ``logical_after`` tokens with K/V."""
    g = logical_after - prompt_len  # generated tokens appended, this one included
    if g < 1:
        raise ValueError(f"step_plan: logical_after={logical_after} is inside the prompt ({prompt_len})")
    n = rpc.compressions_after(g - 1)
    before = physical(rpc, prompt_len, logical_after - 1)
    held = before + 1 - prompt_len - rpc.kept_after(n)
    due = rpc.compress_due(held)
    return StepPlan(slot=before, length=before + 1, held=held, compressions=n,
                    records_query=rpc.records_query(held), compress=due,
                    keep=rpc.kept_after(n + 1) if due else 0, length_after=physical(rpc, prompt_len, logical_after))
