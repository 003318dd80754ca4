"""RPCCache: a transformers ``Cache`` whose storage is one ``rpc_py._C.KVCache``.

How the pieces meet:

* Each decoder layer has an ``RPCCacheLayer``. The attention module calls ``update(k, v)``; the layer
  appends into the C cache (in place, no ``torch.cat``) and returns torch views of the live part of
  the preallocated storage. The torch view of the whole storage is built once per reallocation
  (``KVCache.generation`` tells when) and sliced per step.
* The cache cannot see the queries, so the compression is driven from the attention function
  registered in ``rpc_py.hf.attention``: ``update`` leaves a per-thread "pending" note naming the
  layer (and the keys it returned); the attention function that runs right after it in the same
  module picks the note up, records the decode query into the C query ring and, when the schedule
  says so, compresses the layer after attention has used the uncompressed K/V. The note is per
  thread and per cache, so generations in other threads, with other caches, are untouched. A step
  that needs the hook is refused when the model (the cache was built from) runs another attention
  function; a note left untaken is caught at the next update of the same cache.
* Masks are built by transformers over *logical* positions: ``get_seq_length`` and
  ``get_mask_sizes`` report tokens seen, so RoPE positions, the causal order and every padding
  column are those of the uncompressed sequence. Each layer keeps the logical position of each
  physical slot (``rpc_py.hf.layout.SlotPositions``, per KV head with ``aggregation="group"``);
  once a layer has been compressed, the attention function gathers the mask's columns onto the
  physical slots. Before any compression the two layouts are the same and nothing is gathered.
* A multi-token append after decoding (continuing from a returned cache: a follow-up turn, or a
  finished trace plus more text) starts a new turn: every token held and the appended ones become
  the uncompressed prefix, and compression restarts on the tokens decoded after it.
* Storage grows geometrically (x2, at least 256 tokens) but never beyond ``max_capacity``, the
  schedule's peak that ``rpc_py.generate`` derives from ``max_new_tokens``; nothing is reserved for
  tokens that are never generated (early EOS).
* Under tensor parallelism (a model sharded by transformers' ``tp_plan``) each process's cache holds
  that process's heads; kept sets over all heads are agreed on with one all-reduce of the scores per
  layer and compression (``rpc_py.hf.parallel``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .._html import cache_html, stats_html
from .._report import format_bytes as _fmt_bytes
from ..config import RPCConfig
from ..policies import ScoreContext, ring_positions
from .layer_ops import NativeOps, ops_for
from .layout import SlotPositions, physical_mask
from .parallel import TensorParallel, find_tensor_parallel

__all__ = ["RPCCache", "RPCCacheLayer", "CompressionEvent", "RPCStats"]

_KVCACHE_CLASS = None  # resolved on first use; tests may substitute a stand-in


def _kvcache_class():
    global _KVCACHE_CLASS
    if _KVCACHE_CLASS is None:
        from .. import _C

        _KVCACHE_CLASS = _C.KVCache
    return _KVCACHE_CLASS


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_MIN_GROWTH = 256  # tokens; the first block of a growing layer (same minimum as the C cache's own growth)

# The note left by RPCCacheLayer.update for the attention function of the same layer.
_PENDING = threading.local()


def take_pending(layer_idx, key: torch.Tensor | None = None) -> "RPCCacheLayer | None":
    """Return (and clear) the layer whose update ran just before this attention call, if it is
    ``layer_idx`` and returned ``key``. Used by the rpc attention functions. A note that does not
    match ``key`` is stale (left by a forward that failed before its attention ran) and is dropped:
    the attention at hand belongs to some other cache."""
    layer = getattr(_PENDING, "layer", None)
    if layer is None or layer.layer_idx != layer_idx:
        return None
    _PENDING.layer = None
    if key is not None and (key.data_ptr(), key.shape[-2]) != layer._note_key:
        return None
    return layer


_NO_HOOK = (
    "RPCCache layer {layer}: a step ran without the RPC attention function, so its query was not recorded, "
    "no compression could run and a compressed layer's mask was not mapped to its slots. Run the model through "
    "rpc_py.generate / rpc_py.compress, or set attn_implementation to 'rpc_sdpa' or 'rpc_eager'."
)


_HOOKED_IMPLEMENTATIONS = ("rpc_sdpa", "rpc_eager")


def _check_note_taken(cache: "RPCCache") -> None:
    """A note of this cache still pending when another of its layers updates: that layer's attention
    ran without the rpc attention function. A note of another cache is stale: dropped."""
    layer = getattr(_PENDING, "layer", None)
    if layer is not None:
        _PENDING.layer = None
        if layer.cache is cache:
            raise RuntimeError(_NO_HOOK.format(layer=layer.layer_idx))


def clear_pending(cache: "RPCCache | None" = None) -> None:
    """Drop this thread's pending note (all of it, or only if it belongs to ``cache``), so that no
    reference to a finished cache outlives its generate call."""
    layer = getattr(_PENDING, "layer", None)
    if layer is not None and (cache is None or layer.cache is cache):
        _PENDING.layer = None


def _stream_of(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return None


def _to_torch(x):
    """Details from KVCache.compress are NumPy arrays (CPU) or DLPack views (CUDA)."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.from_dlpack(x)
    except (TypeError, AttributeError, RuntimeError, BufferError):
        return torch.as_tensor(x)


@dataclasses.dataclass
class CompressionEvent:
    """What a compression saw and did; handed to ``RPCCache.compression_hook`` (debugging, tests).

    ``keys``/``values`` are copies of the layer's live K/V right before the compression,
    ``queries`` the selector queries (the ring, ``[B, Hq, R, D]``, order inside irrelevant),
    ``indices`` the kept candidate offsets from ``start`` (``[B, A, keep]``), ``scores`` the pooled
    scores ``[B, A, N]``, ``query_positions`` the cache position (the query's own key) of each ring
    slot's query, and ``policy`` the selection policy's name.
    """

    layer: int
    generated: int
    start: int
    keep: int
    length_before: int
    length_after: int
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor
    query_positions: list | None = None
    policy: str = "rpc"


@dataclasses.dataclass
class RPCStats:
    """Counters of one RPCCache (a snapshot).

    ``tokens_seen``: tokens that entered each layer (prompt with its padding, plus decoded
    tokens). ``tokens_kept``: physical length of each layer now. ``compressions``: per layer.
    ``prompt_length``: the uncompressed prefix (the prompt; after a continuation, every token up to
    the end of the last multi-token append). ``generated``: decode steps, all turns together.
    ``kv_bytes``/``peak_kv_bytes``: bytes allocated by the C cache (K, V and query rings) now and
    at most. ``live_kv_bytes``: bytes of the K/V tokens actually held. ``compress_seconds``: time
    spent compressing (device time via CUDA events on GPU, host time on CPU).

    Under tensor parallelism every byte count is this process's (its share of the KV heads);
    ``tp_size`` is the number of processes and ``tp_rank`` this one's index. Every rank holds the same
    number of heads and tokens per layer, so ``total_kv_bytes`` & co. (``tp_size`` times this rank's)
    are the counts of all ranks together.
    """

    rpc: RPCConfig
    batch_size: int
    prompt_length: int
    generated: int
    tokens_seen: list[int]
    tokens_kept: list[int]
    compressions: list[int]
    kv_bytes: int
    peak_kv_bytes: int
    live_kv_bytes: int
    compress_seconds: float
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def total_kv_bytes(self) -> int:
        """KV bytes allocated now by all tensor-parallel ranks together (= ``kv_bytes`` in one process)."""
        return self.kv_bytes * self.tp_size

    @property
    def total_peak_kv_bytes(self) -> int:
        return self.peak_kv_bytes * self.tp_size

    @property
    def total_live_kv_bytes(self) -> int:
        return self.live_kv_bytes * self.tp_size

    @property
    def total_compressions(self) -> int:
        return sum(self.compressions)

    @property
    def kept_fraction(self) -> float:
        seen = sum(self.tokens_seen)
        return sum(self.tokens_kept) / seen if seen else 1.0

    def summary(self) -> str:
        layers = len(self.tokens_seen)
        seen = self.tokens_seen[0] if layers else 0
        kept = self.tokens_kept[0] if layers else 0
        lines = [
            f"RPC cache summary ({self.rpc!r})",
            f"  batch {self.batch_size}, {layers} layers, prompt {self.prompt_length} tokens, "
            f"{self.generated} decode steps",
            f"  tokens per layer: seen {seen}, kept {kept} ({100.0 * self.kept_fraction:.1f}%)",
            f"  compressions: {self.total_compressions} "
            f"({self.compressions[0] if layers else 0} per layer), {1e3 * self.compress_seconds:.2f} ms, "
            f"selection policy {self.rpc.policy_name}",
            f"  KV memory: {_fmt_bytes(self.live_kv_bytes)} live, {_fmt_bytes(self.kv_bytes)} allocated, "
            f"peak {_fmt_bytes(self.peak_kv_bytes)}",
        ]
        if self.tp_size > 1:
            lines[-1] = lines[-1].replace("  KV memory:", f"  KV memory of rank {self.tp_rank} (1 of {self.tp_size}):")
            lines.append(
                f"  KV memory of all {self.tp_size} ranks: {_fmt_bytes(self.total_live_kv_bytes)} live, "
                f"{_fmt_bytes(self.total_kv_bytes)} allocated, peak {_fmt_bytes(self.total_peak_kv_bytes)}"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """A compact table in Jupyter (``rpc_py._html.stats_html``)."""
        return stats_html(self)


def _int_attr(obj, name: str) -> int:
    if obj is None:
        return 0
    value = getattr(obj, name)
    return int(value() if callable(value) else value)


class RPCCacheLayer(CacheLayerMixin):
    """One decoder layer's view of the shared C KVCache, plus that layer's RPC schedule state."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: "RPCCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self._reset_state()

    # CacheLayerMixin stores tensors in .keys/.values; here they are live views of the C storage.
    @property
    def keys(self):
        return None if not self.is_initialized else self._k_store[:, :, : self.length]

    @keys.setter
    def keys(self, value):
        if value is not None:
            raise AttributeError("RPCCacheLayer.keys is a view of the C KVCache and cannot be assigned")

    @property
    def values(self):
        return None if not self.is_initialized else self._v_store[:, :, : self.length]

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("RPCCacheLayer.values is a view of the C KVCache and cannot be assigned")

    def _reset_state(self) -> None:
        self.is_initialized = False
        self.device = None
        self.length = 0  # physical tokens (mirror of KVCache.length)
        self.seen = 0  # tokens seen (mirror of KVCache.seen)
        self.prompt_length = 0  # Lp: the uncompressed prefix
        self.generated = 0  # decode steps appended
        self.decoding = False
        self.compressions = 0
        self.kept = 0  # selected generated tokens kept by the last compression
        self.compress_due = False
        self.awaiting_attention = False
        self.compressions_before = 0  # compressions in earlier turns (see update: continuation)
        self._note_key = None  # (data_ptr, length) of the keys returned with the pending note
        self.layout = SlotPositions(keep_history=self.cache.keep_layouts)
        self._k_store = self._v_store = None
        self._generation = None

    def __repr__(self) -> str:
        return f"RPCCacheLayer({self.layer_idx}, length={self.length}, seen={self.seen})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache._ensure_kvcache(key_states)
        self.device = key_states.device
        self.is_initialized = True

    @property
    def ops(self):
        """The kernels this layer's cache runs (``rpc_py.hf.layer_ops``)."""
        return self.cache.ops

    def storage_views(self):
        """Torch views of the layer's whole K and V storage ``[B, H, capacity, D]`` (zero-copy)."""
        self._views()
        return self._k_store, self._v_store

    def _views(self):
        kv = self.cache.kvcache
        gen = kv.generation(self.layer_idx)
        if gen != self._generation:
            self._k_store = torch.from_dlpack(kv.storage_keys(self.layer_idx))
            self._v_store = torch.from_dlpack(kv.storage_values(self.layer_idx))
            self._generation = gen
        return self._k_store[:, :, : self.length], self._v_store[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cache = self.cache
        rpc = cache.rpc
        if cache.closed:
            raise ValueError("RPCCache is closed (released after generate); create a new RPCCache")
        if self.awaiting_attention:
            raise RuntimeError(_NO_HOOK.format(layer=self.layer_idx))
        _check_note_taken(cache)
        q = key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if q == 0:
            return self._views()

        # The prompt (possibly in chunks) is every update before the first single-token step. A
        # multi-token append after decoding (continuing from a returned cache) starts a new turn:
        # what the layer holds and the appended tokens become the uncompressed prefix.
        is_prefix = self.seen == 0 or q > 1
        # The rpc attention function must see this step if it decodes (query ring, compression) or
        # if the layer was compressed (its mask is mapped onto the slots); refuse before appending.
        hook_needed = not self.layout.identity or (not is_prefix and rpc.enabled)
        if hook_needed:
            impl = cache._attn_implementation()
            if impl is not None and impl not in _HOOKED_IMPLEMENTATIONS:
                raise RuntimeError(_NO_HOOK.format(layer=self.layer_idx) + f" (the model runs {impl!r})")
        if is_prefix and self.decoding:
            self._new_turn()

        stream = _stream_of(key_states)
        if cache.max_capacity is not None and self.ops is NativeOps:
            self._grow(self.length + q, key_states.device, stream)
        self.length = self.ops.append(self, key_states, value_states, stream)
        self.seen += q
        if is_prefix:
            self.prompt_length = self.length  # never compressed
        else:
            self.decoding = True
            self.generated += 1

        if self.decoding and rpc.enabled:
            held = self.length - self.prompt_length - self.kept
            if held > rpc.interval + rpc.window:  # cannot happen unless the state was corrupted: never compress late
                raise RuntimeError(f"RPCCache layer {self.layer_idx}: missed a compression ({held} tokens held > P+R)")
            self.compress_due = rpc.compress_due(held)
        views = self._views()
        if hook_needed:
            self.awaiting_attention = True
            self._note_key = (views[0].data_ptr(), views[0].shape[-2])
            _PENDING.layer = self
        return views

    def _new_turn(self) -> None:
        self.compressions_before += self.compressions
        self.compressions = 0
        self.kept = 0
        self.decoding = False
        self.compress_due = False

    def _grow(self, needed: int, device: torch.device, stream) -> None:
        """Grow the layer's storage geometrically, but not beyond ``cache.max_capacity`` (the schedule's
        peak) unless a step needs more."""
        kv = self.cache.kvcache
        capacity = kv.capacity(self.layer_idx)
        if needed <= capacity:
            return
        grown = max(2 * capacity, self.cache.capacity, _MIN_GROWTH)
        limit = self.cache.max_capacity
        if limit >= needed:
            grown = min(grown, limit)
        kv.allocate(self.layer_idx, device.type, device.index or 0, max(grown, needed), stream=stream)

    def attention_mask(self, mask, query: torch.Tensor):
        """The mask for this step's attention over the layer's physical slots: ``mask`` (transformers'
        mask over logical positions) with its columns gathered through the slot positions."""
        if self.layout.identity or (mask is None and query.shape[-2] == 1):
            return mask
        positions = self.layout.positions(self.seen, self.length, query.device, query.shape[0], current=True)
        return physical_mask(mask, positions, query.shape[-2], self.seen, query.shape[1])

    def after_attention(self, query: torch.Tensor) -> None:
        """Called by the rpc attention function after attention ran on this step's K/V."""
        self.awaiting_attention = False
        rpc = self.cache.rpc
        if not (self.decoding and rpc.enabled):
            return
        stream = _stream_of(query)
        held = self.length - self.prompt_length - self.kept
        if rpc.policy.uses_accumulators and query.shape[-2] == 1:
            self.ops.accumulate(self, query, stream)  # H2O: attention received, every step
        # Only the last R queries before a compression are ever scored; skip the others.
        if query.shape[-2] == 1 and rpc.records_query(held) and rpc.policy.uses_queries:
            self.ops.record_query(self, query, stream)
        if self.compress_due:
            self._compress(stream)

    def adopt_kernel_steps(self, steps: int) -> None:
        """Take over ``steps`` decode steps that kernels appended on their own (the CUDA-graph loop of
        ``rpc_py.hf.graph``, after ``KVCache.advance``): re-read length and seen from the C cache."""
        kv = self.cache.kvcache
        self.length = kv.length(self.layer_idx)
        self.seen = kv.seen(self.layer_idx)
        self.generated += steps
        self.decoding = True

    def compress_now(self, stream=None) -> None:
        """Run this layer's next scheduled compression now (used by loops that drive the schedule
        themselves, such as the CUDA-graph decode loop)."""
        self._compress(stream)

    def _compress(self, stream) -> None:
        cache = self.cache
        rpc = cache.rpc
        kv = cache.kvcache
        i = self.layer_idx
        keep = rpc.kept_after(self.compressions + 1)
        start = self.prompt_length
        hook = cache.compression_hook
        length_before = self.length
        if hook is not None:
            k_before, v_before = (t.clone() for t in self._views())
            queries = positions = None
            if rpc.policy.uses_queries:
                queries = torch.from_dlpack(kv.queries(i)).clone()
                positions = ring_positions(kv.ring_position(i), rpc.window, self.length)
        timer = cache._timer_start(self.device)
        if rpc.policy.uses_fused_kernel(cache.tensor_parallel):
            # The fused kernel writes the kept indices into a tensor of ours (torch's allocator: no
            # device allocation or sync once warm) and keeps its scores in the cache's reused scratch
            # unless a hook wants them.
            rows = rpc.policy.rows(self._k_store.shape[1])
            batch = cache.batch_size_
            indices = torch.empty(batch, rows, keep, dtype=torch.int64, device=self.device)
            scores = None
            if hook is not None:
                n = self.length - rpc.window - start
                scores = torch.empty(batch, rows, n, dtype=torch.float32, device=self.device)
            # the kept indices update the slot positions
            new_length = self.ops.compress_rpc(self, start, keep, rpc.policy, indices, scores, stream)
        else:  # scores from the policy, then the shared select and compact kernels
            new_length, scores, indices = self._compress_policy(rpc.policy, start, keep, stream)
        cache._timer_stop(timer)
        expected = rpc.length_after(start, self.compressions + 1)
        if new_length != expected:
            raise RuntimeError(
                f"RPCCache layer {i}: KVCache.compress returned length {new_length}, expected {expected}"
            )
        self.length = new_length
        self.layout.compacted(self.seen, length_before, start, indices, rpc.window, cache.batch_size_)
        self.compressions += 1
        self.kept = keep
        self.compress_due = False
        if hook is not None:
            hook(
                CompressionEvent(
                    layer=i,
                    generated=self.generated,
                    start=start,
                    keep=keep,
                    length_before=length_before,
                    length_after=new_length,
                    keys=k_before,
                    values=v_before,
                    queries=queries,
                    scores=scores.clone(),
                    indices=indices.clone(),
                    query_positions=positions,
                    policy=rpc.policy.name,
                )
            )

    def _compress_policy(self, policy, start: int, keep: int, stream):
        """Scores from the policy, then the shared select and in-place compaction kernels."""
        cache = self.cache
        kv = cache.kvcache
        keys, _ = self._views()
        ctx = ScoreContext(
            kvcache=kv,
            layer=self.layer_idx,
            compression=self.compressions,
            start=start,
            end=self.length - cache.rpc.window,
            length=self.length,
            window=cache.rpc.window,
            q_heads=cache.num_q_heads,
            kv_heads=keys.shape[1],
            batch=keys.shape[0],
            padding=cache.padding_tensor(keys.shape[0], keys.device),
            keys=keys,
            stream=stream,
            tp=cache.tensor_parallel,
            kernels=self.ops.name,
        )
        scores = policy.scores(ctx).to(torch.float32).contiguous()
        new_length, indices = self.ops.select_compact(self, scores, keep, start, stream)
        return new_length, scores, indices

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Logical: the mask covers every token seen; the attention function gathers it onto the
        # physical slots once the layer has been compressed (see the module docstring).
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5.2x
        return -1

    def reset(self) -> None:
        self._reset_state()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(_NO_BEAMS)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("RPCCache cannot be cropped (compression already dropped tokens)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(_NO_BEAMS)

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError(_NO_BEAMS)

    def offload(self):
        raise NotImplementedError("RPCCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("RPCCache does not support offloading")


_NO_BEAMS = (
    "RPCCache does not support beam search, contrastive search or other batch reordering: "
    "use greedy decoding or sampling (num_beams=1)"
)


class RPCCache(Cache):
    """A transformers ``Cache`` that compresses the generated part of the KV cache with RPC.

    Args:
        config: the model (or its config); the decoder's ``num_hidden_layers`` and
            ``num_attention_heads`` are read from it.
        rpc: an ``RPCConfig``; ``None`` keeps every token (same code path, no compression).
        capacity: tokens to preallocate per layer (``0``: grow on demand). Growth stays allowed.
        max_capacity: ``None`` or the most tokens a layer should ever need (the schedule's peak,
            ``RPCConfig.peak_length``; ``rpc_py.generate`` passes it from ``max_new_tokens``):
            storage then grows geometrically from 256 tokens (or ``capacity``) up to this bound
            instead of doubling past it; a step that needs more still grows.
        padding: per-sequence left-padding counts of the prompt (informational for the C cache;
            the prompt is never scored). A shorter list is repeated to the batch size
            (``num_return_sequences``).
        keep_layouts: keep the slot layout of every compression, so that
            ``logical_positions(layer, seen=...)`` answers for any past step (mapping
            ``output_attentions``); by default only the layout since the last compression is kept.
        tp_group: the torch.distributed process group a tensor-parallel model's attention heads are
            sharded over. Found on the model when it was loaded with transformers' ``tp_plan``
            (``rpc_py.hf.parallel.find_tensor_parallel``); needed only for a cache built from a bare
            config of such a model. The cache then holds this process's heads
            (``num_q_heads`` = the model's query heads / group size).

    The model must run with the rpc attention function (``rpc_py.generate`` / ``rpc_py.compress``
    do this), which records the selector queries, triggers compression and maps the attention mask
    of a compressed layer onto its slots.

    Continuing from a cache (``generate(full_ids, past_key_values=cache)`` with the previous
    output plus new tokens) appends the new tokens in one step; that starts a new turn (see
    ``rpc_py.hf.cache``). ``logical_positions`` tells which token each physical slot holds.
    """

    def __init__(
        self,
        config,
        rpc: RPCConfig | None = RPCConfig(),
        *,
        capacity: int = 0,
        max_capacity: int | None = None,
        padding: Sequence[int] | torch.Tensor | None = None,
        keep_layouts: bool = False,
        tp_group=None,
    ):
        model_config = getattr(config, "config", None)
        model = config if model_config is not None else None
        config = config if model_config is None else model_config  # accept a model
        if not hasattr(config, "get_text_config"):
            raise TypeError(f"RPCCache: config: expected a transformers model or config, got {type(config).__name__}")
        text = config.get_text_config(decoder=True)
        rpc = RPCConfig.resolve(rpc)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"RPCCache: capacity: expected an int >= 0, got {capacity!r}")
        if max_capacity is not None and (
            isinstance(max_capacity, bool) or not isinstance(max_capacity, int) or max_capacity < 1
        ):
            raise ValueError(f"RPCCache: max_capacity: expected None or an int >= 1, got {max_capacity!r}")
        if not isinstance(keep_layouts, bool):
            raise TypeError(f"RPCCache: keep_layouts: expected a bool, got {type(keep_layouts).__name__}")
        self.rpc = rpc
        self.num_layers = int(text.num_hidden_layers)
        if tp_group is not None:
            self.tensor_parallel = TensorParallel.from_group(tp_group, text)
        else:
            self.tensor_parallel = find_tensor_parallel(model, text) if model is not None else None
        tp = self.tensor_parallel
        # The query heads this process computes (all of them unless the model is tensor parallel).
        self.num_q_heads = int(text.num_attention_heads) // (tp.size if tp is not None else 1)
        kv_heads = getattr(text, "num_key_value_heads", None)
        self._config_kv_heads = kv_heads if isinstance(kv_heads, int) and not isinstance(kv_heads, bool) else None
        # Built from a model: its decoder config tells which attention function runs (checked where a
        # step needs the rpc one, for a clear error instead of a shape mismatch inside attention).
        self._model_text_config = text if model_config is not None else None
        self.capacity = capacity
        self.max_capacity = max_capacity
        self.keep_layouts = keep_layouts
        self.padding = None if padding is None else [int(p) for p in torch.as_tensor(padding).reshape(-1).tolist()]
        self.kvcache = None
        self.ops = None  # rpc_py.hf.layer_ops.NativeOps or TorchOps, chosen with the first tokens
        self.closed = False
        self.compression_hook = None  # callable(CompressionEvent), for debugging and tests
        self._timings: list = []  # floats (CPU) or (start, end) CUDA event pairs
        self._padding_tensors: dict = {}  # (batch, device) -> int64 padding counts (padding_tensor)
        self._final_stats: RPCStats | None = None
        super().__init__(layers=[RPCCacheLayer(self, i) for i in range(self.num_layers)])

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"length={self.get_physical_length()}, seen={self.get_seq_length()}"
        return f"RPCCache({self.num_layers} layers, {state}, rpc={self.rpc!r})"

    def _attn_implementation(self) -> str | None:
        return getattr(self._model_text_config, "_attn_implementation", None)

    # ------------------------------------------------------------------ C cache management
    def _ensure_kvcache(self, key_states: torch.Tensor) -> None:
        if self.kvcache is not None:
            return
        if key_states.dim() != 4:
            raise ValueError(
                f"RPCCache: key_states: expected [batch, kv_heads, tokens, head_dim], got {tuple(key_states.shape)}"
            )
        dtype = _DTYPE_NAMES.get(key_states.dtype)
        if dtype is None:
            raise ValueError(
                f"RPCCache: key_states: expected dtype float32, float16 or bfloat16, got {key_states.dtype}"
            )
        batch, kv_heads, _, head_dim = key_states.shape
        tp = self.tensor_parallel
        if tp is not None and kv_heads != tp.local_kv_heads:
            raise ValueError(
                f"RPCCache: key_states: expected {tp.local_kv_heads} KV heads on rank {tp.rank} (the model's "
                f"{tp.kv_heads} over a tensor-parallel group of {tp.size}), got {kv_heads}"
            )
        if tp is None and self._config_kv_heads is not None and kv_heads < self._config_kv_heads:
            raise ValueError(
                f"RPCCache: key_states carry {kv_heads} of the config's {self._config_kv_heads} KV heads: the model "
                "looks sharded (tensor parallel) but rpc_py found no tensor-parallel group on it; pass "
                "RPCCache(..., tp_group=<the process group its heads are sharded over>)"
            )
        if self.num_q_heads % kv_heads != 0:
            raise ValueError(
                f"RPCCache: num_attention_heads ({self.num_q_heads}) is not a multiple of the key heads ({kv_heads})"
            )
        if tp is not None:
            # Every rank must run the same generation: the collectives of the compressions pair up only then.
            tp.check_agreement(self._agreement_fields(key_states), key_states.device)
        self.ops = ops_for(key_states.device)
        if key_states.device.type == "cuda" and self.ops is NativeOps:
            # The first use of each kernel family on a CUDA device checks it against the CPU kernels
            # (rpc_py.selfcheck): a kernel that is wrong on this GPU raises instead of keeping wrong tokens.
            from ..selfcheck import ensure

            ensure(key_states.device, self._kernel_families(), dtype=key_states.dtype, head_dim=head_dim)
        self.kvcache = _kvcache_class()(
            self.num_layers,
            batch,
            kv_heads,
            head_dim,
            dtype,
            capacity=self.capacity,
            fixed_capacity=False,
            window=self.rpc.window if self.rpc.enabled else 0,
            q_heads=self.num_q_heads,
            **({"accumulators": True} if self.rpc.enabled and self.rpc.policy.uses_accumulators else {}),
        )
        if self.padding is not None:
            if len(self.padding) == 0 or batch % len(self.padding) != 0:
                raise ValueError(
                    f"RPCCache: padding: expected {batch} per-sequence counts (the batch), got {len(self.padding)}"
                )
            self.kvcache.set_padding(self.padding_for(batch))
        self.batch_size_ = batch

    def _kernel_families(self) -> list[str]:
        """The kernel families (``rpc_py.selfcheck.FAMILIES``) this cache's generation will run."""
        families = ["copy"]
        rpc = self.rpc
        if rpc.enabled:
            if rpc.policy.uses_fused_kernel(self.tensor_parallel):
                families.append("compress")  # the fused kernel
            else:
                families += ["select", "compact", *rpc.policy.kernel_families]
        return families

    def _agreement_fields(self, key_states: torch.Tensor) -> dict:
        """What all tensor-parallel ranks of one generation must share (checked on the first update)."""
        rpc = self.rpc
        return {  # ints are compared as they are, strings by a CRC-32
            "the RPC settings": repr(rpc),
            "the number of layers": self.num_layers,
            "the batch size": int(key_states.shape[0]),
            "the prompt width": int(key_states.shape[2]),
            "the KV heads per rank": int(key_states.shape[1]),
            "the head dimension": int(key_states.shape[3]),
            "the dtype": str(key_states.dtype),
            "the left padding": repr(self.padding),
            "max_capacity (from max_new_tokens)": -1 if self.max_capacity is None else self.max_capacity,
        }

    def padding_for(self, batch: int) -> list[int]:
        """Left-padding count of every sequence of the batch (zeros when unknown)."""
        if self.padding is None:
            return [0] * batch
        if len(self.padding) == batch:
            return list(self.padding)
        return [p for p in self.padding for _ in range(batch // len(self.padding))]

    def padding_tensor(self, batch: int, device: torch.device) -> torch.Tensor:
        """``padding_for(batch)`` as an int64 tensor on ``device``, built once per cache and device (the
        kernels read it in place: no copy per compression)."""
        key = (batch, str(device))
        cached = self._padding_tensors.get(key)
        if cached is None:
            cached = torch.tensor(self.padding_for(batch), dtype=torch.int64).to(device)
            self._padding_tensors[key] = cached
        return cached

    def _timer_start(self, device):
        if device is not None and device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            return ("cuda", start, end, device)
        return ("cpu", time.perf_counter())

    def _timer_stop(self, timer) -> None:
        if timer[0] == "cuda":
            _, start, end, device = timer
            end.record(torch.cuda.current_stream(device))
            self._timings.append((start, end))
        else:
            self._timings.append(time.perf_counter() - timer[1])

    def _compress_seconds(self) -> float:
        total = 0.0
        for t in self._timings:
            if isinstance(t, tuple):
                t[1].synchronize()
                total += t[0].elapsed_time(t[1]) / 1e3
            else:
                total += t
        return total

    # ------------------------------------------------------------------ public API
    @property
    def prompt_length(self) -> int:
        return self.layers[0].prompt_length

    def get_physical_length(self, layer_idx: int = 0) -> int:
        """Tokens physically held by a layer now (``get_seq_length`` counts tokens seen)."""
        return self.layers[layer_idx].length

    def compressions(self, layer_idx: int = 0) -> int:
        """Compressions of a layer so far (all turns)."""
        layer = self.layers[layer_idx]
        return layer.compressions_before + layer.compressions

    def logical_positions(self, layer_idx: int = 0, *, seen: int | None = None) -> torch.Tensor:
        """Which token each physical slot of a layer holds: int64 ``[batch, kv_heads, length]``.

        A token's logical position is its index among the tokens the layer has seen: its column in
        the 2-D attention mask of ``generate`` (prompt padding included) and in the attention of an
        uncompressed cache. Rows are identical across heads unless ``aggregation="group"``; query
        head ``h`` reads row ``h // (q_heads // kv_heads)``. So column ``j`` of
        ``output_attentions`` for layer ``i`` at some step is the token
        ``logical_positions(i, seen=...)[b, h // group, j]``.

        ``seen=None``: the layout now. ``seen=s``: the layout that the step bringing the layer to
        ``s`` tokens attended over (for ``generate``'s ``attentions[t]``: ``s = prompt width + t``);
        steps before the last compression need ``keep_layouts=True`` (``rpc_py.generate`` sets it
        when ``output_attentions=True``).
        """
        if self.closed:
            raise ValueError("RPCCache is closed (released after generate); create a new RPCCache")
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            raise ValueError(f"RPCCache.logical_positions: layer {layer_idx} holds no tokens yet")
        if seen is not None and (isinstance(seen, bool) or not isinstance(seen, int) or not 0 <= seen <= layer.seen):
            raise ValueError(f"RPCCache.logical_positions: seen: expected an int in [0, {layer.seen}], got {seen!r}")
        current = seen is None
        positions = layer.layout.positions(
            layer.seen if current else seen, layer.length if current else None, layer.device, self.batch_size_,
            current=current,
        )
        batch, kv_heads = self.batch_size_, layer._k_store.shape[1]
        return positions.expand(batch, kv_heads, positions.shape[-1])

    def stats(self) -> RPCStats:
        """A snapshot of the counters (still available after ``release``)."""
        if self._final_stats is not None:
            return self._final_stats
        kv = self.kvcache
        live = 0
        if kv is not None:
            for layer in self.layers:
                if layer.is_initialized:
                    k = layer._k_store
                    live += 2 * k.shape[0] * k.shape[1] * layer.length * k.shape[3] * k.element_size()
        return RPCStats(
            rpc=self.rpc,
            batch_size=getattr(self, "batch_size_", 0),
            prompt_length=self.layers[0].prompt_length,
            generated=self.layers[0].generated,
            tokens_seen=[layer.seen for layer in self.layers],
            tokens_kept=[layer.length for layer in self.layers],
            compressions=[layer.compressions_before + layer.compressions for layer in self.layers],
            kv_bytes=_int_attr(kv, "nbytes"),
            peak_kv_bytes=_int_attr(kv, "peak_nbytes"),
            live_kv_bytes=live,
            compress_seconds=self._compress_seconds(),
            tp_size=1 if self.tensor_parallel is None else self.tensor_parallel.size,
            tp_rank=0 if self.tensor_parallel is None else self.tensor_parallel.rank,
        )

    def summary(self) -> str:
        return self.stats().summary()

    def _repr_html_(self) -> str:
        """A compact table in Jupyter (``rpc_py._html.cache_html``)."""
        return cache_html(self)

    def release(self) -> None:
        """Free the C storage, keeping the statistics. Later updates raise. Idempotent."""
        if self.closed:
            return
        clear_pending(self)
        self._final_stats = self.stats()
        for layer in self.layers:
            layer._k_store = layer._v_store = None
            layer._generation = None
            layer.is_initialized = False
        if self.kvcache is not None:
            self.kvcache.close()
        self.kvcache = None
        self.closed = True

    close = release

    def reset(self) -> None:
        """Forget all tokens (keeps the allocations) so the cache can serve a new prompt."""
        if self.closed:
            raise ValueError("RPCCache is closed (released after generate); create a new RPCCache")
        if self.kvcache is not None:
            self.kvcache.reset()
        for layer in self.layers:
            initialized = layer.is_initialized
            store = (layer._k_store, layer._v_store, layer._generation, layer.device)
            layer.reset()
            if initialized:  # the C storage survives a reset; keep the torch views of it
                layer._k_store, layer._v_store, layer._generation, layer.device = store
                layer.is_initialized = True
        self._timings = []

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(_NO_BEAMS)

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(_NO_BEAMS)

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError(_NO_BEAMS)
