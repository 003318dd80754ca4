"""User entry points: ``rpc_py.generate`` and the ``rpc_py.compress`` context manager.

Both run ``model.generate`` with an ``RPCCache`` that the call owns: a fresh one per call, sized
from the prompt and the RPC schedule, or the caller's own (continuing from a returned cache).
Everything that makes a call compressed travels with that cache: its layers leave a per-thread note
for the rpc attention function (``rpc_py.hf.cache``), which is the plain attention function for
everything else. That is what lets several generations share one model in several threads, each
exactly as it would run alone:

* the model's attention implementation is switched to the rpc wrapper of the one it uses while at
  least one rpc_py call or ``compress`` block is active on it (a count per model, under a lock),
  and restored when the last one ends; the wrapper changes nothing for plain calls;
* ``rpc_py.generate`` never touches ``model.generate``;
* inside ``compress``, ``model.generate`` is shadowed by an instance attribute that compresses
  calls made by the threads that opened a ``compress`` block on this model (the innermost block of
  that thread wins) and runs plain ``generate`` for every other thread. ``handle.generate``
  compresses from any thread (e.g. a ``TextIteratorStreamer`` worker). Leaving the last block
  deletes the attribute (or puts back one the user had).

Options are checked on the effective ``GenerationConfig`` (``rpc_py.hf.options``), however they
arrive. After a call the cache is released (its C storage freed) unless ``generate`` returned it
(``return_dict_in_generate=True``); ``rpc_py.last_cache()`` / ``handle.last_cache`` refer to the
latest call's cache without keeping a returned cache alive.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref

import torch

from ..config import RPCConfig
from .attention import register_attention, rpc_implementation_for
from .cache import RPCCache, clear_pending
from .options import bind_generate_arguments, generate_parameters, resolve_call
from .parallel import collective_failure

__all__ = ["generate", "compress", "RPCHandle", "last_cache", "check_model_supported"]


class _LatestCache:
    """The latest cache of a series of calls. Held weakly while somebody else may own it (the call
    that is running, or the output it was returned in), strongly once rpc_py released it (then only
    its statistics remain, so keeping it costs nothing)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._get = lambda: None

    def started(self, cache: RPCCache) -> None:
        with self._lock:
            self._get = weakref.ref(cache)

    def released(self, cache: RPCCache) -> None:
        with self._lock:
            if self._get() is cache:
                self._get = lambda: cache

    def get(self) -> RPCCache | None:
        return self._get()


_LAST = _LatestCache()


def last_cache() -> RPCCache | None:
    """The RPCCache of the most recent ``rpc_py.generate`` (or ``compress``-d generate) call in any
    thread (set when the call starts, so a streamer can watch it), for its statistics (``.stats()``,
    ``.summary()``). A cache that ``generate`` returned is not kept alive by this: once the output
    holding it is gone, this returns None."""
    return _LAST.get()


def check_model_supported(model) -> None:
    """Raise a clear error if ``model`` is not a decoder-only model with full attention in every
    layer and a standard per-layer KV cache (what RPC compresses)."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        raise TypeError(f"rpc_py: model: expected a transformers generative model, got {type(model).__name__}")
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"rpc_py: {name} is an encoder-decoder model; RPC supports decoder-only models")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    supports_cache = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports_cache) and not supports_cache():
        raise NotImplementedError(
            f"rpc_py: {name} does not use a standard KV cache (recurrent / state-space / custom cache)"
        )
    # A sliding window at least as long as the longest position the model takes (Phi-3.5 style
    # configs) never hides a token: that attention is full.
    window = getattr(text, "sliding_window", None)
    max_positions = getattr(text, "max_position_embeddings", None)
    window_is_full = isinstance(window, int) and isinstance(max_positions, int) and window >= max_positions
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        other = sorted({t for t in layer_types
                        if t != "full_attention" and not (t == "sliding_attention" and window_is_full)})
        if other:
            raise NotImplementedError(
                f"rpc_py: {name} has layers of type {other}; RPC supports full-attention layers only "
                "(sliding-window, chunked, linear-attention and hybrid layers are not supported)"
            )
    else:
        if window is not None and getattr(text, "use_sliding_window", True) and not window_is_full:
            raise NotImplementedError(
                f"rpc_py: {name} uses sliding-window attention (config.sliding_window={window} < "
                f"max_position_embeddings={max_positions}); RPC supports full attention only (set sliding_window=None)"
            )
        if getattr(text, "attention_chunk_size", None) is not None:
            raise NotImplementedError(f"rpc_py: {name} uses chunked attention; RPC supports full attention only")
    for attr in ("kv_lora_rank", "num_kv_shared_layers", "kv_sharing_modes"):
        if getattr(text, attr, None):
            raise NotImplementedError(
                f"rpc_py: {name} has config.{attr}; latent-attention and shared-KV layers are not supported"
            )
    for attr in ("num_hidden_layers", "num_attention_heads"):
        if not isinstance(getattr(text, attr, None), int):
            raise NotImplementedError(f"rpc_py: {name}: the decoder config has no integer {attr}")
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        raise NotImplementedError(
            f"rpc_py: {name} does not dispatch attention through transformers.AttentionInterface"
        )
    rpc_implementation_for(getattr(config, "_attn_implementation", None))  # raises for flash/flex


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use what the model takes."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


_ROUTING_LOCK = threading.RLock()
_ROUTING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Routing:
    """What rpc_py has changed on one model: the attention switch (counted over active calls and
    blocks) and the ``generate`` shadow (installed while a ``compress`` block is open)."""

    def __init__(self):
        self.users = 0
        self.previous_impl = None
        self.blocks: dict[int, list] = {}  # thread id -> handles of the compress blocks it opened
        self.open_blocks = 0
        self.saved_generate = None  # (had an instance attribute, its value)

    def handle_for_this_thread(self):
        stack = self.blocks.get(threading.get_ident())
        return stack[-1] if stack else None


def _routing(model) -> _Routing:
    routing = _ROUTING.get(model)
    if routing is None:
        routing = _ROUTING[model] = _Routing()
    return routing


@contextlib.contextmanager
def _rpc_attention(model):
    """Keep the model on the rpc attention wrapper for the duration of the block."""
    with _ROUTING_LOCK:
        routing = _routing(model)
        if routing.users == 0:
            register_attention()
            previous = model.config._attn_implementation
            wanted = rpc_implementation_for(previous)
            if previous != wanted:
                model.set_attn_implementation(wanted)
                if model.config._attn_implementation != wanted:
                    if model.config._attn_implementation != previous:
                        model.set_attn_implementation(previous)
                    raise NotImplementedError(
                        f"rpc_py: {type(model).__name__} did not accept attn_implementation={wanted!r}"
                    )
            routing.previous_impl = previous
        routing.users += 1
    try:
        yield routing
    finally:
        with _ROUTING_LOCK:
            routing.users -= 1
            if routing.users == 0:
                if model.config._attn_implementation != routing.previous_impl:
                    model.set_attn_implementation(routing.previous_impl)
                if routing.open_blocks == 0:
                    _ROUTING.pop(model, None)


def _plain_generate(model):
    """``model.generate`` as it was before any ``compress`` block shadowed it."""
    current = model.__dict__.get("generate")
    original = getattr(current, "_rpc_original", None)
    return original if original is not None else model.generate


def _shadow(routing: _Routing, original):
    @functools.wraps(original)
    def generate(*args, **kwargs):
        with _ROUTING_LOCK:
            handle = routing.handle_for_this_thread()
        if handle is None:
            return original(*args, **kwargs)
        return handle.generate(*args, **kwargs)

    generate._rpc_original = original
    return generate


def _open_block(model, routing: _Routing, handle: "RPCHandle") -> None:
    with _ROUTING_LOCK:
        if routing.open_blocks == 0:
            had = "generate" in model.__dict__
            routing.saved_generate = (had, model.__dict__.get("generate"))
            model.generate = _shadow(routing, model.generate)
        routing.open_blocks += 1
        handle._thread = threading.get_ident()
        routing.blocks.setdefault(handle._thread, []).append(handle)


def _close_block(model, routing: _Routing, handle: "RPCHandle") -> None:
    with _ROUTING_LOCK:
        stack = routing.blocks.get(handle._thread, [])
        if handle in stack:
            stack.remove(handle)
        if not stack:
            routing.blocks.pop(handle._thread, None)
        routing.open_blocks -= 1
        if routing.open_blocks == 0:
            had, previous = routing.saved_generate
            if had:
                model.generate = previous
            else:
                model.__dict__.pop("generate", None)
            routing.saved_generate = None


def _returned(out, cache) -> bool:
    """Whether generate's output holds the cache (read without touching deprecated attributes)."""
    if out is cache:
        return True
    values = getattr(out, "values", None)
    if not callable(values) or isinstance(out, torch.Tensor):
        return False
    return any(v is cache for v in values())


class RPCHandle:
    """A model with an RPC configuration: ``handle.generate`` is ``model.generate`` with an RPC cache.

    Returned by ``rpc_py.compress``; ``generate`` on it compresses from any thread while the block is
    open. ``last_cache`` is the cache of its latest call (held as ``rpc_py.last_cache()`` holds it).
    """

    def __init__(self, model, rpc: RPCConfig | None):
        if rpc is not None and not isinstance(rpc, RPCConfig):
            raise TypeError(f"rpc_py: rpc: expected an RPCConfig or None, got {type(rpc).__name__}")
        self.model = model
        self.rpc = rpc if rpc is not None else RPCConfig(enabled=False)
        self._last = _LatestCache()
        self._cache_kwarg = _cache_kwarg(model)
        self._thread = None
        self.active = False

    def __repr__(self) -> str:
        return f"RPCHandle({type(self.model).__name__}, {self.rpc!r}, active={self.active})"

    @property
    def last_cache(self) -> RPCCache | None:
        return self._last.get()

    def new_cache(self, prompt_length: int = 0, max_new_tokens: int | None = None, padding=None, *,
                  keep_layouts: bool = False) -> RPCCache:
        """A fresh RPCCache for this model and config. Its storage grows as tokens arrive, up to the
        schedule's peak for ``max_new_tokens`` (nothing is reserved up front)."""
        max_capacity = None
        if max_new_tokens is not None:
            max_capacity = max(self.rpc.peak_length(prompt_length, max_new_tokens), 1)
        return RPCCache(self.model, self.rpc, max_capacity=max_capacity, padding=padding, keep_layouts=keep_layouts)

    def generate(self, *args, **kwargs):
        """``model.generate(*args, **kwargs)`` with an RPC cache; returns what ``model.generate`` returns.

        Arguments are ``model.generate``'s, in the same positions. Passing an ``RPCCache`` as
        ``past_key_values`` (transformers 5.2x: ``cache``) continues from it; it is left open.
        """
        if not self.active:
            raise RuntimeError("rpc_py: this RPCHandle's compress() context has exited")
        model = self.model
        call = resolve_call(model, args, kwargs)
        kwargs = dict(kwargs)
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache", None)
        cache = call.cache
        owned = cache is None
        if owned:
            cache = self.new_cache(call.prompt_length, call.max_new_tokens, call.padding,
                                   keep_layouts=bool(call.config.output_attentions))
        elif cache.max_capacity is not None and call.max_new_tokens is not None and not cache.closed:
            # continuing: the appended tokens join the prefix, then the schedule starts again
            prefix = cache.get_physical_length() + max(call.prompt_length - cache.get_seq_length(), 0)
            cache.max_capacity = max(cache.max_capacity, cache.rpc.peak_length(prefix, call.max_new_tokens))
        kwargs[self._cache_kwarg] = cache
        self._last.started(cache)
        _LAST.started(cache)
        with _rpc_attention(model):
            try:
                out = _plain_generate(model)(*args, **kwargs)
            except BaseException as e:
                if owned:
                    self._release(cache)
                tp = cache.tensor_parallel
                if tp is not None and collective_failure(e):  # name the rank and the likely cause
                    raise tp.failed("a collective of the model's forward pass", e) from e
                raise
            finally:
                clear_pending(cache)
        if owned and not _returned(out, cache):
            self._release(cache)
        return out

    def _release(self, cache: RPCCache) -> None:
        cache.release()
        self._last.released(cache)
        _LAST.released(cache)


@contextlib.contextmanager
def compress(model, rpc: RPCConfig | None = RPCConfig()):
    """Run ``model.generate`` with RPC inside the block::

        with rpc_py.compress(model, RPCConfig(interval=1024)) as handle:
            out = model.generate(**inputs, max_new_tokens=4096)
        print(handle.last_cache.summary())

    Inside the block, ``model.generate`` compresses when called from the thread that opened it (the
    innermost block of that thread wins; blocks nest); other threads get plain ``generate``.
    ``handle.generate`` compresses from any thread (``Thread(target=handle.generate, ...)`` for a
    streamer). The model's attention implementation and ``generate`` are restored when the last
    block or call on the model ends, also on errors. ``rpc=None`` uses the same path without
    compression.
    """
    check_model_supported(model)
    handle = RPCHandle(model, rpc)
    with _rpc_attention(model) as routing:
        _open_block(model, routing, handle)
        handle.active = True
        try:
            yield handle
        finally:
            handle.active = False
            _close_block(model, routing, handle)


_GRAPH_OPTIONS = frozenset({"inputs", "input_ids", "attention_mask"})


def generate(model, *args, rpc: RPCConfig | None = RPCConfig(), cuda_graph: bool = False, progress: bool = False,
             **kwargs):
    """Drop-in for ``model.generate`` with Reasoning Path Compression of the KV cache.

    Takes ``model.generate``'s arguments in the same positions (``generate(model, input_ids,
    generation_config, logits_processor, ...)``) plus ``rpc`` and ``cuda_graph`` by keyword; the mask
    goes by keyword (``attention_mask=...``), as for ``model.generate``. ``rpc=None`` runs the same
    cache path without compression (for ablations). Returns what ``model.generate`` returns; the
    cache's statistics are in ``rpc_py.last_cache()``. Safe to call from several threads on one
    model, alongside plain ``model.generate`` calls.

    ``cuda_graph=True`` decodes with one captured CUDA-graph step replayed per token
    (``rpc_py.hf.graph``) and returns the token ids; where capture is impossible (CPU, options the
    static loop does not reproduce) it warns with ``GraphFallbackWarning`` and runs this eager path.
    It is off by default until it has been validated on a GPU (see README, "CUDA-graph decoding").
    The graph path switches the model's attention for itself: do not run other generations on the
    same model while it runs.

    ``progress=True`` shows a tqdm progress bar (a widget in Jupyter) and records the cache length
    per layer and step for ``rpc_py.notebook.plot_cache_lengths(rpc_py.last_cache())``; it works
    through a streamer (``rpc_py.notebook.GenerationMonitor``) that also feeds a ``streamer`` passed
    here, so ``cuda_graph=True`` then falls back to the eager path.
    """
    if progress:
        from ..notebook import progress_streamer

        args, kwargs = progress_streamer(model, progress, args, kwargs)
    if cuda_graph:
        return _graph_generate(model, args, kwargs, rpc)
    check_model_supported(model)
    handle = RPCHandle(model, rpc)
    handle.active = True
    try:
        return handle.generate(*args, **kwargs)
    finally:
        handle.active = False


def _graph_generate(model, args, kwargs, rpc):
    import warnings

    from .graph import GraphFallbackWarning, graph_generate

    named = bind_generate_arguments(model, args, kwargs)
    _, params = generate_parameters(model)
    unsupported = sorted(k for k in params if k not in _GRAPH_OPTIONS and named.get(k) is not None)
    if unsupported:
        warnings.warn(f"rpc_py: CUDA-graph decoding unavailable ({', '.join(unsupported)} given); running the "
                      "eager path", GraphFallbackWarning, stacklevel=3)
        return generate(model, *args, rpc=rpc, **kwargs)
    input_ids = named.pop("inputs", None)
    if input_ids is None:
        input_ids = named.pop("input_ids", None)
    attention_mask = named.pop("attention_mask", None)
    options = {k: v for k, v in named.items() if k not in params}
    if input_ids is None:
        raise ValueError("rpc_py.generate: cuda_graph=True needs input_ids")
    if "max_new_tokens" not in options:
        raise ValueError("rpc_py.generate: cuda_graph=True needs max_new_tokens (the static cache is sized from it)")
    return graph_generate(model, input_ids, attention_mask, rpc=rpc, cuda_graph=True, **options)
