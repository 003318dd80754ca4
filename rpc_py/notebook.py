"""Notebook helpers: HTML tables for the cache and its statistics, a progress bar for long
generations, and a plot of the physical cache length per layer with the compressions marked.

Nothing here is needed to generate, and nothing here is imported by ``import rpc_py``: tqdm,
matplotlib and IPython are imported lazily, when a helper that draws something is called.

* ``RPCStats._repr_html_`` and ``RPCCache._repr_html_`` show :func:`stats_html` and
  :func:`cache_html` (defined in ``rpc_py._html``, re-exported here), so a cache or a stats object as
  the last expression of a cell shows a compact table.
* :class:`GenerationMonitor` is a transformers streamer (``put``/``end``): ``generate`` calls it
  once with the prompt and once per new token. Per new token it advances an optional tqdm bar and
  records, per layer, the physical length of the cache after that decode step and the steps at
  which the layer was compressed. The cache already keeps these counters as plain Python ints, so a
  record is a handful of attribute reads and array appends: recording costs nothing unless asked
  for, and the decode loop itself is untouched. ``rpc_py.generate(..., progress=True)`` wraps
  the caller's streamer (if any) in a monitor with a bar.
* :func:`plot_cache_lengths` draws a recorded :class:`LengthHistory` (from a monitor, or found
  through the cache it was recorded from) with matplotlib.
"""

from __future__ import annotations

import sys
import weakref
from array import array

from ._html import RECORDED_HISTORIES, _config_text, cache_html, stats_html

__all__ = [
    "GenerationMonitor",
    "LengthHistory",
    "cache_html",
    "history_of",
    "plot_cache_lengths",
    "progress_streamer",
    "stats_html",
]

# cache -> the LengthHistory a monitor recorded from it (see rpc_py._html).
_HISTORIES = RECORDED_HISTORIES


class LengthHistory:
    """Physical cache length per layer after each recorded decode step, and the compressions.

    ``steps[j]`` is the decode step of record ``j`` (1 = the first token fed back after the prompt);
    ``lengths[layer][j]`` the physical length of that layer after that step (after its compression,
    if one ran in that step); ``compressions[layer]`` a list of ``(step, before, after)``: the layer
    held ``before`` tokens when it was compressed during ``step`` and ``after`` once compressed
    (``before`` is the previous record plus the tokens appended since, exact when every step is
    recorded). ``prompt_length`` is the uncompressed prefix.
    """

    def __init__(self, num_layers: int, prompt_length: int = 0, rpc=None):
        self.prompt_length = prompt_length
        self.rpc = rpc
        self.steps = array("q")
        self.lengths = [array("q") for _ in range(num_layers)]
        self.compressions: list[list[tuple[int, int, int]]] = [[] for _ in range(num_layers)]
        self._seen_compressions = [0] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.lengths)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        done = sum(len(c) for c in self.compressions)
        return f"LengthHistory({self.num_layers} layers, {len(self.steps)} steps, {done} compressions)"

    def record(self, cache) -> bool:
        """Record the cache's state if it decoded at least one step since the last record."""
        layers = cache.layers
        step = layers[0].generated
        if step == 0 or (self.steps and step <= self.steps[-1]):
            return False
        if not self.steps:
            self.prompt_length = layers[0].prompt_length
        prev_step = self.steps[-1] if self.steps else 0
        for i, layer in enumerate(layers):
            length = layer.length
            done = layer.compressions
            if done != self._seen_compressions[i]:
                prev = self.lengths[i][-1] if self.lengths[i] else layer.prompt_length
                before = prev + (step - prev_step) if done - self._seen_compressions[i] == 1 else -1
                self.compressions[i].append((step, before, length))
                self._seen_compressions[i] = done
            self.lengths[i].append(length)
        self.steps.append(step)
        return True


def history_of(cache) -> LengthHistory | None:
    """The LengthHistory a monitor recorded from ``cache``, if any."""
    return _HISTORIES.get(cache)


# ----------------------------------------------------------------------------------- progress bar
def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means "not a notebook kernel"
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _tqdm_class():
    try:
        from tqdm.std import tqdm
    except ImportError as e:
        raise ImportError("rpc_py: progress=True needs tqdm: pip install tqdm (or the 'notebook' extra)") from e
    if _in_notebook():
        try:
            import ipywidgets  # noqa: F401 - tqdm's widget bar needs it

            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        except ImportError:  # a text bar in the cell output instead of a widget
            pass
    return tqdm


class GenerationMonitor:
    """A transformers streamer that shows a progress bar and records the cache lengths per step.

    Args:
        progress: show a tqdm bar (a widget in Jupyter when ipywidgets is installed, text
            otherwise). ``False``: record only.
        record: record per-layer lengths (:class:`LengthHistory`) for :func:`plot_cache_lengths`.
        total: the bar's length in tokens (``max_new_tokens``); ``None``: an open-ended bar.
        cache: the ``RPCCache`` to watch; ``None``: the cache of the ``rpc_py.generate`` /
            ``rpc_py.compress`` call this monitor is passed to (``rpc_py.last_cache()`` when the
            generation starts).
        streamer: another streamer (e.g. transformers' ``TextStreamer``) that receives every call too.
        desc, tqdm_kwargs: the bar's label and further tqdm options (``file``, ``leave``, ...).

    Use it as ``streamer=`` of ``rpc_py.generate`` or of ``model.generate`` inside
    ``rpc_py.compress``; in a hand-written decoding loop call :meth:`record` after each step. The first
    ``put`` of a generation is the prompt and is not counted.
    """

    def __init__(self, *, progress: bool = True, record: bool = True, total: int | None = None,
                 cache=None, streamer=None, desc: str = "rpc_py.generate", tqdm_kwargs: dict | None = None):
        for name, value in (("progress", progress), ("record", record)):
            if not isinstance(value, bool):
                raise TypeError(f"GenerationMonitor: {name}: expected a bool, got {type(value).__name__}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"GenerationMonitor: total: expected an int >= 0 or None, got {total!r}")
        if streamer is not None and not (callable(getattr(streamer, "put", None))
                                         and callable(getattr(streamer, "end", None))):
            raise TypeError(f"GenerationMonitor: streamer: expected an object with put() and end(), "
                            f"got {type(streamer).__name__}")
        if cache is not None:
            from .hf.cache import RPCCache

            if not isinstance(cache, RPCCache):
                raise TypeError(f"GenerationMonitor: cache: expected an RPCCache or None, got {type(cache).__name__}")
        self.progress = progress
        self.recording = record
        self.total = total
        self.cache = cache
        self._own_cache = cache is not None  # else: the cache of each generation this monitor serves
        self.streamer = streamer
        self.desc = desc
        self.tqdm_kwargs = dict(tqdm_kwargs or {})
        self.history: LengthHistory | None = None
        self.tokens = 0  # new tokens seen by put (per sequence of the batch)
        self.bar = None
        self._started = False
        if progress:
            self._tqdm = _tqdm_class()  # fail now, not in the middle of a generation

    def __repr__(self) -> str:
        return f"GenerationMonitor(tokens={self.tokens}, total={self.total}, history={self.history!r})"

    # -- the transformers streamer protocol
    def put(self, value) -> None:
        if self.streamer is not None:
            self.streamer.put(value)
        if not self._started:  # the prompt
            self._start()
            return
        self.tokens += 1
        cache = self.cache
        if cache is not None and self.recording and not cache.closed:
            self.record(cache)
        if self.bar is not None:
            if cache is not None and cache.layers and not cache.closed:
                layer = cache.layers[0]
                n = layer.compressions
                self.bar.set_postfix_str(f"cache {layer.length} tok, {n} compression{'' if n == 1 else 's'}",
                                         refresh=False)
            self.bar.update(1)

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._started = False

    # -- recording
    def record(self, cache=None) -> bool:
        """Record ``cache`` (default: the watched one) now; True when a new decode step was recorded."""
        cache = cache if cache is not None else self.cache
        if cache is None:
            raise ValueError("GenerationMonitor.record: no cache to record (pass one)")
        history = _HISTORIES.get(cache)
        if history is not None and history.steps and cache.layers[0].generated < history.steps[-1]:
            history = None  # the cache was reset() for a new prompt: a new history
        if history is None:
            history = LengthHistory(cache.num_layers, rpc=cache.rpc)
            _HISTORIES[cache] = history
        self.history = history
        return history.record(cache)

    def plot(self, ax=None, **kwargs):
        """:func:`plot_cache_lengths` of what this monitor recorded."""
        return plot_cache_lengths(self, ax=ax, **kwargs)

    def _start(self) -> None:
        self._started = True
        self.tokens = 0
        if not self._own_cache:
            from .hf.registry import last_cache

            cache = last_cache()
            # Only a cache that has not started yet belongs to this generation (a plain
            # model.generate outside rpc_py leaves an older, used one in last_cache()).
            fresh = cache is not None and not cache.closed and cache.get_seq_length() == 0
            self.cache = cache if fresh else None
        if self.progress:
            options = dict(total=self.total, desc=self.desc, unit="tok", leave=True)
            options.update(self.tqdm_kwargs)
            self.bar = self._tqdm(**options)


def progress_streamer(model, progress, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """What ``rpc_py.generate(..., progress=True)`` passes on to ``model.generate``: the same
    arguments, all by name, with a :class:`GenerationMonitor` as the ``streamer`` (a bar of
    ``max_new_tokens`` tokens) that also feeds the caller's own ``streamer``."""
    if progress is not True:
        raise TypeError(f"rpc_py.generate: progress: expected True or False, got {progress!r}")
    from .hf.options import bind_generate_arguments, resolve_call

    named = bind_generate_arguments(model, args, kwargs)
    total = resolve_call(model, (), named).max_new_tokens
    named["streamer"] = GenerationMonitor(progress=True, total=total, streamer=named.get("streamer"))
    return (), named


# -------------------------------------------------------------------------------------------- plot
def plot_cache_lengths(source, ax=None, *, layers=None, full_cache: bool = True, title: str | None = None):
    """Plot the physical cache length per layer over the generation, with the compressions marked.

    ``source``: a :class:`GenerationMonitor`, a :class:`LengthHistory`, or an ``RPCCache`` a monitor
    recorded (e.g. ``rpc_py.last_cache()`` after ``rpc_py.generate(..., progress=True)``).
    ``layers``: the layers to draw (default all; layers with identical curves share one line and
    legend entry). ``full_cache``: also draw the length an uncompressed cache would have.
    Returns the matplotlib ``Axes``. matplotlib is imported here, not by ``import rpc_py``.
    """
    history = _as_history(source)
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("rpc_py.notebook.plot_cache_lengths needs matplotlib: pip install matplotlib") from e
    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(7, 3.5))
    chosen = range(history.num_layers) if layers is None else list(layers)
    for i in chosen:
        if not isinstance(i, int) or not 0 <= i < history.num_layers:
            raise IndexError(f"plot_cache_lengths: layers: {i!r} is not a layer index in [0, {history.num_layers})")
    steps = list(history.steps)
    if full_cache:
        ax.plot(steps, [history.prompt_length + s for s in steps], "--", color="0.6", lw=1, label="full KV cache")
    groups: dict[tuple, list[int]] = {}
    for i in chosen:  # identical curves (the usual case: every layer on the same schedule) share a line
        groups.setdefault((tuple(history.lengths[i]), tuple(history.compressions[i])), []).append(i)
    marked = False
    for (lengths, compressions), members in groups.items():
        label = _layer_label(members, history.num_layers)
        (line,) = ax.plot(steps, lengths, lw=1.5, label=label)
        for step, before, after in compressions:
            if before >= 0:
                ax.vlines(step, after, before, colors=line.get_color(), lw=0.8, alpha=0.6)
            ax.plot([step], [after], "v", color=line.get_color(), ms=5,
                    label=None if marked else "compression")
            marked = True
    ax.set_xlabel("decode step")
    ax.set_ylabel("physical cache length (tokens)")
    if title is None and history.rpc is not None:
        title = _plot_title(history.rpc)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    if own_figure:
        ax.figure.tight_layout()
    return ax


def _plot_title(rpc) -> str:
    if not rpc.enabled:
        return "no compression (rpc=None)"
    schedule = _config_text(rpc).split(";")[0]
    name = getattr(rpc, "policy_name", "rpc")
    return f"RPC {schedule}" if name == "rpc" else f"{name} on the RPC schedule, {schedule}"


def _layer_label(members: list[int], num_layers: int) -> str:
    if len(members) == num_layers and num_layers > 1:
        return f"all {num_layers} layers"
    if len(members) == 1:
        return f"layer {members[0]}"
    return "layers " + ", ".join(map(str, members))


def _as_history(source) -> LengthHistory:
    if isinstance(source, LengthHistory):
        history = source
    elif isinstance(source, GenerationMonitor):
        history = source.history
    else:
        history = _HISTORIES.get(source) if _weakrefable(source) else None
        if history is None and not hasattr(source, "layers"):
            raise TypeError(f"plot_cache_lengths: expected a GenerationMonitor, LengthHistory or RPCCache, "
                            f"got {type(source).__name__}")
    if history is None or len(history) == 0:
        raise ValueError("plot_cache_lengths: no per-step lengths were recorded; generate with "
                         "rpc_py.generate(..., progress=True) or streamer=rpc_py.notebook.GenerationMonitor()")
    return history


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True
