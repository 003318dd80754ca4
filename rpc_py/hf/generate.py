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
import threading
import weakref

import torch

from ..config import RPCConfig
from .attention import register_attention, rpc_implementation_for
from .cache import RPCCache, clear_pending
from .options import bind_generate_arguments, generate_parameters, resolve_call
from .parallel import collective_failure
from .registry import LATEST, LatestCache, cache_kwarg, check_model_supported, last_cache

__all__ = ["generate", "compress", "graph_generate", "RPCHandle", "last_cache", "check_model_supported",
           "UncompressedThreadWarning"]


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


class UncompressedThreadWarning(UserWarning):
    """``model.generate`` ran without RPC in a thread other than the one that opened the ``compress``
    block (the usual streaming recipe): use the block's handle as the thread's target instead."""


def _shadow(routing: _Routing, original):
    @functools.wraps(original)
    def generate(*args, **kwargs):
        with _ROUTING_LOCK:
            handle = routing.handle_for_this_thread()
            elsewhere = routing.open_blocks > 0
        if handle is None:
            if elsewhere:
                import warnings

                warnings.warn(
                    "rpc_py.compress: model.generate was called from a thread that did not open the compress "
                    "block, so it runs WITHOUT RPC (a block applies to the thread that opened it). For a "
                    "streamer in a background thread, give the thread the block's handle: `with "
                    "rpc_py.compress(model, rpc) as handle: Thread(target=handle.generate, kwargs=...)`, or "
                    "call rpc_py.generate(..., streamer=...) in that thread.",
                    UncompressedThreadWarning, stacklevel=2)
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
        self.model = model
        self.rpc = RPCConfig.resolve(rpc)
        self._last = LatestCache()
        self._cache_kwarg = cache_kwarg(model)
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
        LATEST.started(cache)
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
        LATEST.released(cache)


@contextlib.contextmanager
def compress(model, rpc: RPCConfig | None = RPCConfig()):
    """Run ``model.generate`` with RPC inside the block::

        with rpc_py.compress(model, RPCConfig(interval=1024)) as handle:
            out = model.generate(**inputs, max_new_tokens=4096)
        print(handle.last_cache.summary())

    Inside the block, ``model.generate`` compresses when called from the thread that opened it (the
    innermost block of that thread wins; blocks nest); other threads get plain ``generate``, with an
    ``UncompressedThreadWarning`` (the usual streaming recipe, ``Thread(target=model.generate, ...)``,
    would otherwise run uncompressed without a word). ``handle.generate`` compresses from any thread
    (``Thread(target=handle.generate, ...)`` for a streamer). The model's attention implementation and ``generate`` are restored when the last
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
    It is off by default until it has been validated on a GPU (docs/benchmarks.md, CUDA-graph decoding).
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


def graph_generate(model, input_ids, attention_mask=None, rpc: RPCConfig | None = RPCConfig(), *,
                   cuda_graph: bool = True, max_new_tokens: int, **generation_kwargs) -> torch.Tensor:
    """``rpc_py.generate`` with CUDA-graph decoding; returns the token ids ``[B, prompt + new]``.

    Falls back to the eager ``generate`` with a ``GraphFallbackWarning`` where capture is impossible
    (``rpc_py.hf.graph.capture_unavailable`` says why: a model whose step syncs with the host, a CPU
    model, a CUDA build or device missing, the pure-torch kernels, generation options the static loop
    does not reproduce, a tensor-parallel model, whose ranks then run the eager path).
    """
    import warnings

    from .graph import GraphFallbackWarning, capture_unavailable, static_decode

    reason = "cuda_graph=False" if not cuda_graph else capture_unavailable(model, input_ids, generation_kwargs)
    if reason is not None:
        if cuda_graph:
            warnings.warn(f"rpc_py: CUDA-graph decoding unavailable ({reason}); running the eager path",
                          GraphFallbackWarning, stacklevel=2)
        out = generate(model, input_ids=input_ids, attention_mask=attention_mask, rpc=rpc,
                       max_new_tokens=max_new_tokens, **generation_kwargs)
        return out if isinstance(out, torch.Tensor) else out.sequences
    return static_decode(model, input_ids, attention_mask, rpc=rpc, max_new_tokens=max_new_tokens, capture=True,
                         **generation_kwargs)


def _graph_generate(model, args, kwargs, rpc):
    import warnings

    from .graph import GraphFallbackWarning

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
