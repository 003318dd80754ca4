"""Selection policies: which generated tokens a compression keeps (docs/policies.md).

Every policy runs inside the same ``RPCCache``, on RPC's schedule (a compression every ``interval``
tokens after the first ``interval + window``), with the same protected prompt, the same always-kept
recent ``window`` and the same number of kept tokens (``RPCConfig.kept_after``, capped by ``budget``).
Only the scores that rank the candidates differ; selection (top-k, ties to the lower index, kept in
original order) and in-place compaction are shared C kernels. So an ablation over policies isolates
the rule itself.

A policy is a small frozen dataclass: ``RPCConfig(policy="snapkv")`` uses the defaults below,
``RPCConfig(policy=SnapKV(kernel_size=7))`` sets them. ``RPC`` is one of them, with its own settings
(``RPC(pooling=..., kernel_size=..., aggregation=...)``; ``RPCConfig(pooling=..., ...)`` is a shorthand
for them), and runs the fused RPC kernel (``KVCache.compress``). The others compute scores with the kernels of
``rpc_py._C`` (``attn_scores``, ``redundancy``, ``fill_scores``, H2O's accumulators) and then call
``select`` and ``KVCache.compact``. Their float64 oracle is ``rpc_py.policy_reference``.

Under tensor parallelism (``rpc_py.hf.parallel``) a process holds some of the heads. Every score that
averages over heads for one kept set per sequence (``aggregation="all"``) goes through
``ScoreContext.head_mean``: the sum over this process's heads, before pooling, is added over the ranks
(one all-reduce), divided by the model's head count, then pooled (``pool_scores``). Per-KV-head scores
need no communication; ``random`` hashes the model-wide KV head index.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["Policy", "RPC", "Recent", "Random", "TOVA", "H2O", "SnapKV", "RKV", "Attention", "POLICIES", "as_policy",
           "ring_positions", "pool_scores"]

_AGGREGATIONS = ("all", "group")
_POOLINGS = ("avg", "max")


def _check_choice(owner, name, value, choices):
    if value not in choices:
        raise ValueError(f"{owner}.{name}: expected one of {choices}, got {value!r}")


def _check_kernel(owner, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{owner}.kernel_size: expected an odd int >= 1, got {value!r}")


@dataclass(frozen=True)
class Policy:
    """Base class. ``name`` is what statistics, tables and ``RPCConfig(policy=...)`` call it."""

    name: ClassVar[str] = ""
    #: the policy reads the selector-query ring (the last ``window`` decode queries)
    uses_queries: ClassVar[bool] = True
    #: the policy needs per-token accumulated attention, updated at every decode step (H2O)
    uses_accumulators: ClassVar[bool] = False
    #: the kernel families its scores run (rpc_py.selfcheck checks them on a CUDA device first)
    kernel_families: ClassVar[tuple] = ()

    def rows(self, kv_heads: int) -> int:
        """Index sets per sequence: 1 (one for all heads) or ``kv_heads`` (one per KV head)."""
        return 1 if getattr(self, "aggregation", "all") == "all" else kv_heads

    def uses_fused_kernel(self, tensor_parallel) -> bool:
        """True when a compression runs as one fused kernel call (RPC in a single process) rather than
        scores from ``scores`` followed by the shared select and compact kernels."""
        return False

    def scores(self, ctx: "ScoreContext"):
        """Scores ``[B, A, N]`` (float32 torch tensor on the cache's device) of the candidates."""
        raise NotImplementedError


@dataclass(frozen=True)
class RPC(Policy):
    """Reasoning Path Compression (Song et al., NeurIPS 2025): attention of the last ``window``
    queries, softmax over the candidates, summed over queries, averaged over heads (``aggregation``
    ``"all"``: one kept set per sequence; ``"group"``: one per KV head), pooled (``pooling``,
    ``kernel_size``; the paper's defaults: average, 7). In a single process it runs the fused kernel
    (``KVCache.compress``: score, select and compact in one call). ``RPCConfig(pooling=...,
    kernel_size=..., aggregation=...)`` sets these fields for the default policy."""

    name: ClassVar[str] = "rpc"
    kernel_families: ClassVar[tuple] = ("score",)
    pooling: str = "avg"
    kernel_size: int = 7
    aggregation: str = "all"

    def __post_init__(self):
        _check_choice("RPC", "pooling", self.pooling, _POOLINGS)
        _check_kernel("RPC", self.kernel_size)
        _check_choice("RPC", "aggregation", self.aggregation, _AGGREGATIONS)

    def uses_fused_kernel(self, tensor_parallel) -> bool:
        # Over all heads of a tensor-parallel model the scores are reduced across ranks before pooling
        # and selection, which the fused kernel cannot do: that case takes the policy path.
        return tensor_parallel is None or self.aggregation == "group"

    def scores(self, ctx):
        return ctx.rpc_scores(self.aggregation, self.pooling, self.kernel_size)


@dataclass(frozen=True)
class Recent(Policy):
    """Keep the most recent candidates (StreamingLLM-style, Xiao et al. ICLR 2024; here the protected
    prompt plays the attention sink)."""

    name: ClassVar[str] = "recent"
    kernel_families: ClassVar[tuple] = ("fill",)
    uses_queries: ClassVar[bool] = False

    def scores(self, ctx):
        return ctx.fill("recent", 1)


@dataclass(frozen=True)
class Random(Policy):
    """A uniformly random subset of the candidates, drawn anew at every compression from a
    counter-based hash of (seed, layer, compression, row, candidate): the same on every device."""

    name: ClassVar[str] = "random"
    kernel_families: ClassVar[tuple] = ("fill",)
    uses_queries: ClassVar[bool] = False
    seed: int = 0
    aggregation: str = "all"

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Random.seed: expected an int >= 0, got {self.seed!r}")
        _check_choice("Random", "aggregation", self.aggregation, _AGGREGATIONS)

    def scores(self, ctx):
        return ctx.fill("random", self.rows(ctx.kv_heads), seed=self.seed, per_kv_head=self.aggregation == "group")


@dataclass(frozen=True)
class TOVA(Policy):
    """Token Omission Via Attention (Oren et al., 2024): the newest query's attention (softmax over
    every cached token), averaged over heads; no pooling."""

    name: ClassVar[str] = "tova"
    kernel_families: ClassVar[tuple] = ("attn_scores",)
    aggregation: str = "all"

    def __post_init__(self):
        _check_choice("TOVA", "aggregation", self.aggregation, _AGGREGATIONS)

    def scores(self, ctx):
        return ctx.attention(ctx.newest_query(), ctx._positions(ctx.length - 1, 1), norm="causal",
                             aggregation=self.aggregation)


@dataclass(frozen=True)
class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023): attention each token has received, summed
    over every decode step since it was written (softmax over every cached token), averaged over
    heads; no pooling. The cache keeps a float32 accumulator per token, compacted with K/V."""

    name: ClassVar[str] = "h2o"
    kernel_families: ClassVar[tuple] = ("accumulate",)
    uses_queries: ClassVar[bool] = False
    uses_accumulators: ClassVar[bool] = True
    aggregation: str = "all"

    def __post_init__(self):
        _check_choice("H2O", "aggregation", self.aggregation, _AGGREGATIONS)

    def scores(self, ctx):
        acc = ctx.accumulator()[:, :, ctx.start : ctx.end]  # [B, Hkv, N], sums over each KV head's G heads
        if self.aggregation == "all":
            return ctx.head_mean(acc.sum(dim=1, keepdim=True), ctx.total_q_heads).contiguous()
        return (acc / (ctx.q_heads // ctx.kv_heads)).contiguous()


@dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV (Li et al., NeurIPS 2024) applied at each compression: the window queries' attention
    (softmax over every token each query saw), summed over the window, averaged over each KV head's
    query heads and selected per KV head (``group``), pooled (the published code's default: average,
    kernel 5)."""

    name: ClassVar[str] = "snapkv"
    kernel_families: ClassVar[tuple] = ("attn_scores",)
    pooling: str = "avg"
    kernel_size: int = 5
    aggregation: str = "group"

    def __post_init__(self):
        _check_choice("SnapKV", "pooling", self.pooling, _POOLINGS)
        _check_kernel("SnapKV", self.kernel_size)
        _check_choice("SnapKV", "aggregation", self.aggregation, _AGGREGATIONS)

    def scores(self, ctx):
        queries, positions = ctx.window_queries()
        return ctx.attention(queries, positions, norm="causal", aggregation=self.aggregation,
                             pooling=self.pooling, kernel_size=self.kernel_size)


@dataclass(frozen=True)
class RKV(Policy):
    """R-KV (Cai et al., 2025): ``mix_lambda * importance - (1 - mix_lambda) * redundancy`` per KV
    head. Importance: the window queries' attention with each group's logits max-pooled (softmax over
    every token older than the window, mean over queries, max-pooled along the sequence, kernel 7).
    Redundancy: how similar (cosine) a key is to the others, the newest of near-duplicates (similarity
    above ``threshold``) spared. Defaults are the published code's."""

    name: ClassVar[str] = "rkv"
    kernel_families: ClassVar[tuple] = ("attn_scores", "redundancy")
    mix_lambda: float = 0.07
    threshold: float = 0.5
    pooling: str = "max"
    kernel_size: int = 7
    aggregation: str = "group"

    def __post_init__(self):
        for field in ("mix_lambda", "threshold"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"RKV.{field}: expected a float, got {type(v).__name__}")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"RKV.mix_lambda: expected a value in [0, 1], got {self.mix_lambda}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"RKV.threshold: expected a cosine similarity in [-1, 1], got {self.threshold}")
        _check_choice("RKV", "pooling", self.pooling, _POOLINGS)
        _check_kernel("RKV", self.kernel_size)
        _check_choice("RKV", "aggregation", self.aggregation, _AGGREGATIONS)

    def scores(self, ctx):
        queries, _ = ctx.window_queries()
        importance = ctx.attention(queries, None, norm="past", gqa="max_logits", query_reduce="mean",
                                   aggregation="group", pooling=self.pooling, kernel_size=self.kernel_size)
        redundancy = ctx.redundancy(self.threshold)[:, :, ctx.start : ctx.end]
        mixed = self.mix_lambda * importance - (1.0 - self.mix_lambda) * redundancy
        if self.aggregation == "all":
            if ctx.tp is None:
                mixed = mixed.mean(dim=1, keepdim=True)
            else:
                mixed = ctx.head_mean(mixed.sum(dim=1, keepdim=True), ctx.total_kv_heads)
        return mixed.contiguous()


@dataclass(frozen=True)
class Attention(Policy):
    """A point of the design space the attention-based rules share: the window queries' attention to
    each candidate, with every choice a setting of its own (docs/policies.md gives the coordinates of
    rpc, snapkv, tova, rkv and h2o in it):

    * ``norm``: which keys share a query's softmax: ``"candidates"`` (RPC: the candidates only),
      ``"causal"`` (every key the query saw, as the model computed it: SnapKV, TOVA), ``"past"`` (every
      key older than the window: R-KV);
    * ``aggregation``: one kept set per sequence over all heads (``"all"``) or one per KV head
      (``"group"``); ``gqa``: a KV head's query heads averaged after their softmax (``"mean_probs"``) or
      their logits max-pooled before one (``"max_logits"``);
    * ``weighting``: how the window's queries are weighted in the sum: ``"uniform"`` (every query 1),
      ``"newest"`` (only the newest: TOVA's signal), ``"recency"`` (the i-th newest weighs
      ``0.5 ** (i / half_life)``);
    * ``pooling`` and ``kernel_size`` along the candidates (``kernel_size=1``: none).

    The defaults are RPC's coordinates (``Attention()`` keeps exactly RPC's tokens, through the general
    kernel instead of the fused one)."""

    name: ClassVar[str] = "attention"
    kernel_families: ClassVar[tuple] = ("attn_scores",)
    norm: str = "candidates"
    aggregation: str = "all"
    gqa: str = "mean_probs"
    weighting: str = "uniform"
    half_life: float = 8.0
    pooling: str = "avg"
    kernel_size: int = 7

    def __post_init__(self):
        _check_choice("Attention", "norm", self.norm, ("candidates", "causal", "past"))
        _check_choice("Attention", "aggregation", self.aggregation, _AGGREGATIONS)
        _check_choice("Attention", "gqa", self.gqa, ("mean_probs", "max_logits"))
        _check_choice("Attention", "weighting", self.weighting, ("uniform", "newest", "recency"))
        if isinstance(self.half_life, bool) or not isinstance(self.half_life, (int, float)) or not self.half_life > 0:
            raise ValueError(f"Attention.half_life: expected a number > 0, got {self.half_life!r}")
        _check_choice("Attention", "pooling", self.pooling, _POOLINGS)
        _check_kernel("Attention", self.kernel_size)

    def scores(self, ctx):
        queries, positions = ctx.window_queries()
        weights = None
        if self.weighting != "uniform":
            age = (ctx.length - 1) - positions  # 0 for the newest query of the ring (slot order)
            if self.weighting == "newest":
                weights = (age == 0).float()
            else:
                weights = (0.5 ** (age.double() / float(self.half_life))).float()
        return ctx.attention(queries, positions, norm=self.norm, aggregation=self.aggregation, gqa=self.gqa,
                             pooling=self.pooling, kernel_size=self.kernel_size, query_weights=weights)


POLICIES = {cls.name: cls for cls in (RPC, Recent, Random, TOVA, H2O, SnapKV, RKV, Attention)}


def as_policy(value) -> Policy:
    """A Policy instance from a name or an instance (``RPCConfig`` calls this)."""
    if isinstance(value, Policy):
        if type(value) is Policy:
            raise TypeError("policy: Policy is the base class; use RPC(), Recent(), SnapKV(), ...")
        return value
    if isinstance(value, str):
        cls = POLICIES.get(value.lower())
        if cls is None:
            raise ValueError(f"RPCConfig.policy: expected one of {tuple(POLICIES)} or a policy object, got {value!r}")
        return cls()
    raise TypeError(f"RPCConfig.policy: expected a policy name or object, got {type(value).__name__}")


def ring_positions(head: int, window: int, length: int) -> list[int]:
    """Cache position of the query held by each slot of a full query ring: slot ``head - 1`` (mod
    ``window``) holds the newest query, whose own key is the last live position ``length - 1``; the
    window's tokens are always kept together at the end of the cache, so the ``i``-th newest query's
    key is at ``length - 1 - i``."""
    return [length - 1 - ((head - 1 - s) % window) for s in range(window)]


def pool_scores(scores, pooling: str, kernel_size: int, kernels: str = "native"):
    """RPC's pooling of float32 scores ``[B, A, N]`` along the candidates (stride 1, padding
    ``kernel_size // 2``; ``avg`` counts the zero padding, ``max`` ignores it and propagates NaN): the
    kernels' own definition (``rpc_py._C.pool``, summed in double, rounded once), or the torch kernels'
    with ``kernels="torch"``. Used where scores are pooled after a tensor-parallel reduction; the
    single-process paths pool inside the kernels."""
    if kernel_size == 1:
        return scores
    import torch

    if kernels == "torch":
        from . import torch_kernels as tk

        return tk.pool(scores, pooling, kernel_size)
    from . import _C

    scores = scores.to(torch.float32).contiguous()
    out = torch.empty_like(scores)
    stream = torch.cuda.current_stream(scores.device).cuda_stream if scores.device.type == "cuda" else None
    _C.pool(scores, pooling, kernel_size, stream=stream, out=out)
    return out


@dataclasses.dataclass
class ScoreContext:
    """What a policy may look at during one compression of one layer (built by the cache).

    ``q_heads``/``kv_heads`` are the heads this process holds; under tensor parallelism ``tp`` (a
    ``rpc_py.hf.parallel.TensorParallel``) gives the model's counts and this rank's share."""

    kvcache: object  # rpc_py._C.KVCache
    layer: int
    compression: int  # compressions this layer has done before this one
    start: int  # candidates are [start, end); the prompt is [0, start)
    end: int
    length: int  # live tokens L; the window is [end, L)
    window: int
    q_heads: int
    kv_heads: int
    batch: int
    padding: object  # left-padding per sequence: ints, or an int64 tensor on the keys' device
    keys: object  # torch view [B, Hkv, L, D]
    stream: object = None
    tp: object = None  # TensorParallel, or None in a single process
    kernels: str = "native"  # "native": rpc_py._C; "torch": rpc_py.torch_kernels (rpc_py.kernel_choice)

    # Every score below is written into a torch tensor of ours (``out=``), and query positions are
    # built on the keys' device, so a compression allocates nothing through rpc_py and copies nothing
    # from the host: no device allocation or sync per compression on CUDA.

    @property
    def n(self) -> int:
        return self.end - self.start

    @property
    def total_q_heads(self) -> int:
        """Query heads of the model (all tensor-parallel ranks together)."""
        return self.q_heads if self.tp is None else self.tp.q_heads

    @property
    def total_kv_heads(self) -> int:
        return self.kv_heads if self.tp is None else self.tp.kv_heads

    def head_mean(self, local_sum, heads: int):
        """The mean over the model's ``heads`` heads of scores summed over this process's heads
        (float32 ``[B, 1, N]``): under tensor parallelism the ranks' sums are added first (one
        all-reduce on the model's tensor-parallel group), so every rank gets the same result."""
        import torch

        if self.tp is not None:
            local_sum = self.tp.all_reduce_sum(
                local_sum.to(dtype=torch.float32).contiguous(),
                f"the all-reduce of layer {self.layer}'s scores (compression {self.compression + 1})",
            )
        return local_sum / heads

    @property
    def _native(self) -> bool:
        return self.kernels == "native"

    def _empty(self, *shape):
        import torch

        return torch.empty(*shape, dtype=torch.float32, device=self.keys.device)

    def _positions(self, first: int, count: int, ring_head: int | None = None):
        """int64 key positions on the keys' device without a host copy: ``first + arange(count)``, or
        with ``ring_head`` the position of each slot of the query ring (``ring_positions``)."""
        import torch

        slots = torch.arange(count, dtype=torch.int64, device=self.keys.device)
        if ring_head is None:
            return slots + first
        return (self.length - 1) - torch.remainder((ring_head - 1) - slots, self.window)

    def fill(self, kind: str, rows: int, *, seed: int = 0, per_kv_head: bool = False):
        """``_C.fill_scores`` over ``rows`` rows; ``per_kv_head``: one row per KV head, numbered by the
        model-wide KV head index (so a tensor-parallel rank draws its heads' rows of the single-process
        draw)."""
        from . import _C
        from . import torch_kernels as tk

        dev = self.keys.device
        device = "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"
        sharded = per_kv_head and self.tp is not None
        if sharded:
            rows = self.tp.kv_heads
        if self._native:
            out = self._empty(self.batch, rows, self.n)
            _C.fill_scores(kind, self.batch, rows, self.n, seed=seed, layer=self.layer, compression=self.compression,
                           device=device, stream=self.stream, out=out)
        else:
            out = tk.fill_scores(kind, self.batch, rows, self.n, seed=seed, layer=self.layer,
                                 compression=self.compression, device=dev)
        if sharded:  # this rank's KV heads' rows of the model-wide draw
            offset = self.tp.kv_head_offset
            out = out[:, offset : offset + self.kv_heads].contiguous()
        return out

    def window_queries(self):
        """The ring ``[B, Hq, R, D]`` (slot order) and each slot's key position (int64 on the device)."""
        import torch

        kv = self.kvcache
        ring = torch.from_dlpack(kv.queries(self.layer))
        count = kv.num_queries(self.layer)
        if count < self.window:
            raise RuntimeError(f"layer {self.layer}: {count} selector queries recorded, {self.window} needed")
        return ring, self._positions(0, self.window, ring_head=kv.ring_position(self.layer))

    def newest_query(self):
        import torch

        kv = self.kvcache
        if kv.num_queries(self.layer) < 1:
            raise RuntimeError(f"layer {self.layer}: no selector query recorded")
        ring = torch.from_dlpack(kv.queries(self.layer))
        slot = (kv.ring_position(self.layer) - 1) % self.window
        return ring[:, :, slot : slot + 1]

    def _attn(self, queries, *, aggregation, pooling, kernel_size, **common):  # common: norm, gqa, weights, ...
        from . import _C
        from . import torch_kernels as tk

        if not self._native:
            return tk.attn_scores(queries, self.keys, self.start, self.end, aggregation=aggregation, pooling=pooling,
                                  kernel_size=kernel_size, **common)
        rows = 1 if aggregation == "all" else self.kv_heads
        out = self._empty(self.batch, rows, self.n)
        _C.attn_scores(queries, self.keys, self.start, self.end, aggregation=aggregation, pooling=pooling,
                       kernel_size=kernel_size, stream=self.stream, out=out, **common)
        return out

    def attention(self, queries, positions, *, norm, aggregation, gqa="mean_probs", query_reduce="sum",
                  pooling="avg", kernel_size=1, query_weights=None):
        common = dict(query_positions=positions, padding=self.padding, norm=norm, gqa=gqa, query_reduce=query_reduce)
        if query_weights is not None:
            common["query_weights"] = query_weights
        if self.tp is None or aggregation == "group":
            return self._attn(queries, aggregation=aggregation, pooling=pooling, kernel_size=kernel_size, **common)
        # All heads of all ranks: this rank's mean (unpooled) times its head count is its sum.
        mean = self._attn(queries, aggregation="all", pooling="avg", kernel_size=1, **common)
        local, total = ((self.q_heads, self.total_q_heads) if gqa == "mean_probs"
                        else (self.kv_heads, self.total_kv_heads))  # "max_logits" averages KV heads
        return pool_scores(self.head_mean(mean * local, total), pooling, kernel_size, self.kernels)

    def _rpc(self, queries, aggregation, pooling, kernel_size):
        from . import _C
        from . import torch_kernels as tk

        if not self._native:
            return tk.score(queries, self.keys, self.start, self.end, aggregation=aggregation, pooling=pooling,
                            kernel_size=kernel_size)
        import torch

        rows = 1 if aggregation == "all" else self.kv_heads
        out = self._empty(self.batch, rows, self.n)
        args = dict(aggregation=aggregation, pooling=pooling, kernel_size=kernel_size)
        workspace = None
        if self.keys.device.type == "cuda":
            size = _C.score_workspace_size(queries, self.keys, self.start, self.end, **args)
            workspace = torch.empty(size + 256, dtype=torch.uint8, device=self.keys.device)
            workspace = workspace[(-workspace.data_ptr()) % 256 :]  # 256-byte aligned
        _C.score(queries, self.keys, self.start, self.end, stream=self.stream, out=out, workspace=workspace, **args)
        return out

    def rpc_scores(self, aggregation: str, pooling: str, kernel_size: int):
        """RPC's scores (``_C.score``) of the ring's queries; under tensor parallelism with
        ``aggregation="all"`` the ranks' head sums are reduced before pooling (``head_mean``). The
        single-process cache runs the fused ``KVCache.compress`` instead."""
        queries, _ = self.window_queries()
        if self.tp is None or aggregation == "group":
            return self._rpc(queries, aggregation, pooling, kernel_size)
        mean = self._rpc(queries, "all", "avg", 1)
        return pool_scores(self.head_mean(mean * self.q_heads, self.total_q_heads), pooling, kernel_size,
                           self.kernels)

    def redundancy(self, threshold: float):
        from . import _C
        from . import torch_kernels as tk

        if not self._native:
            return tk.redundancy(self.keys, padding=self.padding, threshold=threshold)
        B, H, L, _ = self.keys.shape
        out = self._empty(B, H, L)
        _C.redundancy(self.keys, padding=self.padding, threshold=threshold, stream=self.stream, out=out)
        return out

    def accumulator(self):
        import torch

        return torch.from_dlpack(self.kvcache.accumulator(self.layer))
