"""RPCConfig: the hyper-parameters of Reasoning Path Compression, validated once.

The config is a frozen dataclass so that one object can be shared by many generate calls and
caches without anyone changing it underneath them. Field names follow the paper's meaning with
readable names: ``interval`` is P, ``window`` is R, ``ratio`` is c. The schedule helpers below are
the single place that turns those numbers into physical cache lengths; the cache, the capacity
planning of ``rpc_py.generate`` and the tests all ask these methods instead of re-deriving it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .policies import RPC, Policy, as_policy

__all__ = ["RPCConfig"]

_POOLINGS = ("avg", "max")
_AGGREGATIONS = ("all", "group")
_RPC_SETTINGS = ("pooling", "kernel_size", "aggregation")


def _check_int(name: str, value, minimum: int) -> None:
    # bool is an int subclass; RPCConfig(window=True) is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"RPCConfig.{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"RPCConfig.{name}: expected an int >= {minimum}, got {value}")


@dataclass(frozen=True)
class RPCConfig:
    """Settings of Reasoning Path Compression (RPC) for one generation.

    Args:
        interval: P, the number of generated tokens between two compressions of a layer.
        window: R, the selector window: the last R queries score the candidates, and the last R
            tokens are always kept.
        ratio: c, the compression ratio: each compression keeps ``interval // ratio`` tokens per
            interval generated so far.
        budget: optional cap on the number of selected (older) generated tokens kept after a
            compression; the recent window and the prompt are kept in addition. ``None``: no cap.
        pooling, kernel_size, aggregation: a shorthand for the settings of the default policy,
            ``RPC(pooling=..., kernel_size=..., aggregation=...)`` (``rpc_py.policies.RPC``): ``"avg"`` or
            ``"max"`` 1-D pooling of the scores along the sequence, its odd width (stride 1, padding
            ``kernel_size // 2``), and ``"all"`` (one kept set per sequence and layer) or ``"group"`` (one
            per KV head). ``None``: the policy's own value (RPC's defaults: ``"avg"``, 7, ``"all"``). After
            construction they read the RPC policy's values (``None`` for other policies).
        enabled: ``False`` runs the same cache path without ever compressing (for ablations).
        policy: which tokens a compression keeps: ``"rpc"`` (default), ``"recent"``, ``"random"``,
            ``"tova"``, ``"h2o"``, ``"snapkv"``, ``"rkv"``, or a policy object from ``rpc_py.policies``
            with its own settings (e.g. ``SnapKV(kernel_size=7)``, ``RPC(kernel_size=5)``). Every policy
            shares the schedule, the protected prompt, the recent window and the budget above. See
            docs/policies.md.
    """

    interval: int = 4096
    window: int = 32
    ratio: int = 4
    budget: int | None = None
    pooling: str | None = None
    kernel_size: int | None = None
    aggregation: str | None = None
    enabled: bool = True
    policy: str | Policy = "rpc"

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", as_policy(self.policy))
        self._settle_rpc_settings()
        _check_int("interval", self.interval, 1)
        _check_int("window", self.window, 1)
        _check_int("ratio", self.ratio, 1)
        if self.interval < self.ratio:
            raise ValueError(
                f"RPCConfig.interval: must be >= ratio so that interval // ratio keeps at least one token, "
                f"got interval={self.interval}, ratio={self.ratio}"
            )
        if self.budget is not None:
            _check_int("budget", self.budget, 0)
        if not isinstance(self.enabled, bool):
            raise TypeError(f"RPCConfig.enabled: expected a bool, got {type(self.enabled).__name__}")

    def _settle_rpc_settings(self) -> None:
        """One home for RPC's scoring settings: the RPC policy object. The shorthand fields are checked,
        folded into the policy, then read back from it."""
        given = {name: getattr(self, name) for name in _RPC_SETTINGS if getattr(self, name) is not None}
        if "pooling" in given and given["pooling"] not in _POOLINGS:
            raise ValueError(f"RPCConfig.pooling: expected one of {_POOLINGS}, got {given['pooling']!r}")
        if "kernel_size" in given:
            _check_int("kernel_size", given["kernel_size"], 1)
            if given["kernel_size"] % 2 == 0:
                raise ValueError(f"RPCConfig.kernel_size: expected an odd int, got {given['kernel_size']}")
        if "aggregation" in given and given["aggregation"] not in _AGGREGATIONS:
            raise ValueError(f"RPCConfig.aggregation: expected one of {_AGGREGATIONS}, got {given['aggregation']!r}")
        policy = self.policy
        defaults = RPC()
        if not isinstance(policy, RPC):
            for name, value in given.items():
                if value == getattr(defaults, name):
                    continue  # RPC's default, meaningless for this policy: accepted, as before policies existed
                raise ValueError(
                    f"RPCConfig.{name} is RPC's scoring setting; with policy={policy.name!r} set it on the "
                    f"policy object instead, e.g. policy={type(policy).__name__}(...)"
                )
            for name in _RPC_SETTINGS:
                object.__setattr__(self, name, None)
            return
        for name, value in given.items():
            mine = getattr(policy, name)
            if value != mine and mine != getattr(defaults, name):
                raise ValueError(f"RPCConfig.{name}={value!r} contradicts policy={policy!r}; set it in one place")
        if given:
            policy = dataclasses.replace(policy, **given)
            object.__setattr__(self, "policy", policy)
        for name in _RPC_SETTINGS:
            object.__setattr__(self, name, getattr(policy, name))

    def __repr__(self) -> str:
        if not self.enabled:
            return "RPCConfig(enabled=False)"
        budget = "" if self.budget is None else f", budget={self.budget}"
        head = f"RPCConfig(interval={self.interval}, window={self.window}, ratio={self.ratio}{budget}, "
        if isinstance(self.policy, RPC):
            return head + f"pooling={self.pooling!r}, kernel_size={self.kernel_size}, aggregation={self.aggregation!r})"
        return head + f"policy={self.policy!r})"

    @property
    def policy_name(self) -> str:
        """``"rpc"``, ``"recent"``, ... (``"none"`` when compression is disabled)."""
        return self.policy.name if self.enabled else "none"

    def replace(self, **changes) -> "RPCConfig":
        """A copy with some fields changed (validated again). A change of ``pooling``, ``kernel_size``
        or ``aggregation`` changes the RPC policy's setting."""
        rpc_changes = {k: changes[k] for k in _RPC_SETTINGS if k in changes}
        if rpc_changes and "policy" not in changes and isinstance(self.policy, RPC):
            # the changed settings take the default on the policy, so the (validated) fields win over them
            changes["policy"] = RPC(**{k: getattr(self.policy, k) for k in _RPC_SETTINGS if k not in rpc_changes})
        if "policy" in changes and not rpc_changes:
            changes.update({k: None for k in _RPC_SETTINGS})  # take the new policy's own settings
        return dataclasses.replace(self, **changes)

    @staticmethod
    def resolve(rpc: "RPCConfig | None") -> "RPCConfig":
        """The config a call runs with: ``None`` means compression off (the same cache path, nothing
        dropped). Every entry point turns ``rpc=None`` into a config here and nowhere else."""
        if rpc is None:
            return RPCConfig(enabled=False)
        if not isinstance(rpc, RPCConfig):
            raise TypeError(f"rpc_py: rpc: expected an RPCConfig or None, got {type(rpc).__name__}")
        return rpc

    # ------------------------------------------------------------------ schedule
    # The schedule, in one place: the cache, the CUDA-graph loop and the capacity planning ask these.

    def compress_due(self, held: int) -> bool:
        """True when a layer holding ``held`` generated tokens since its last compression (or the
        prompt), this step's included, compresses now: after this step's attention, when P + R have
        accumulated. Larger values mean a compression was missed (the caller raises)."""
        return self.enabled and held == self.interval + self.window

    def records_query(self, held: int) -> bool:
        """True when this decode step's query, with ``held`` generated tokens held since the last
        compression, is one of the last R before the next compression (the selector window):
        only those are ever scored, the others need not be recorded."""
        return self.enabled and held > self.interval

    def length_after(self, prompt_length: int, compressions: int) -> int:
        """Physical length of a layer right after its ``compressions``-th compression (>= 1): the
        prompt, the kept selected tokens and the recent window."""
        return prompt_length + self.kept_after(compressions) + self.window

    @property
    def kept_per_interval(self) -> int:
        """T = P // c: selected tokens added to the kept set by each compression."""
        return self.interval // self.ratio

    def kept_after(self, compressions: int) -> int:
        """Number of selected generated tokens kept after ``compressions`` compressions."""
        kept = compressions * self.kept_per_interval
        return kept if self.budget is None else min(kept, self.budget)

    def compressions_after(self, generated: int) -> int:
        """Compressions a layer has done once ``generated`` decoded tokens are in its cache."""
        first = self.interval + self.window
        if not self.enabled or generated < first:
            return 0
        return 1 + (generated - first) // self.interval

    def physical_length(self, prompt_length: int, generated: int) -> int:
        """Physical cache length once ``generated`` decoded tokens have been appended after a
        prompt of ``prompt_length`` tokens (after the compression of that step, if any)."""
        if generated < 0 or prompt_length < 0:
            raise ValueError(f"prompt_length and generated must be >= 0, got {prompt_length}, {generated}")
        n = self.compressions_after(generated)
        if n == 0:
            return prompt_length + generated
        since = self.window + (generated - self.interval - self.window) % self.interval
        return prompt_length + self.kept_after(n) + since

    def length_schedule(self, prompt_length: int, steps: int) -> list[int]:
        """Physical length after each of ``steps`` decode steps (entry i: after step i + 1)."""
        return [self.physical_length(prompt_length, g) for g in range(1, steps + 1)]

    def peak_length(self, prompt_length: int, max_new_tokens: int) -> int:
        """Largest physical length reached while generating ``max_new_tokens`` tokens: the prompt
        plus ``max_new_tokens - 1`` decode steps (the last token is never fed back), counted
        before each compression shrinks the cache."""
        steps = max(max_new_tokens - 1, 0)
        peak = self.physical_length(prompt_length, steps)
        n = self.compressions_after(steps)
        if n > 0:
            # Just before compression n the layer held kept_after(n - 1) + P + R generated tokens.
            peak = max(peak, prompt_length + self.kept_after(n - 1) + self.interval + self.window)
        return peak
