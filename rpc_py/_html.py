"""HTML tables of an ``RPCCache`` and its ``RPCStats`` (what Jupyter shows for either as the last
expression of a cell), and the registry of per-step histories that ``rpc_py.notebook`` records.

Kept apart from ``rpc_py.notebook`` so that the cache can render itself without importing the
notebook helpers (which import the generation code that imports the cache).
"""

from __future__ import annotations

import html
import weakref

from ._report import format_bytes as _fmt_bytes

__all__ = ["stats_html", "cache_html", "RECORDED_HISTORIES"]

# cache -> the LengthHistory a rpc_py.notebook.GenerationMonitor recorded from it, so that
# plot_cache_lengths(cache) works after rpc_py.generate(..., progress=True), where the caller never
# sees the monitor, and the cache's table can say that a history exists.
RECORDED_HISTORIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _span(values) -> str:
    """One number when every layer agrees, else ``min-max``."""
    values = list(values)
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}\u2013{hi}"


def _config_text(rpc) -> str:
    if not rpc.enabled:
        return "off (same cache path, no compression)"
    budget = "" if rpc.budget is None else f", budget {rpc.budget}"
    head = f"P={rpc.interval}, R={rpc.window}, c={rpc.ratio}{budget}; "
    if getattr(rpc, "policy_name", "rpc") != "rpc":  # another selection policy on RPC's schedule
        return head + f"policy {rpc.policy!r}"
    return head + f"{rpc.pooling} pooling k={rpc.kernel_size}, aggregation {rpc.aggregation!r}"


_STYLE = ("border-collapse:collapse;font-size:0.9em;margin:0.2em 0",
          "text-align:left;padding:1px 10px 1px 0;font-weight:600;vertical-align:top",
          "text-align:left;padding:1px 0")


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    table, th, td = _STYLE
    body = "".join(f'<tr><th style="{th}">{html.escape(k)}</th><td style="{td}">{v}</td></tr>' for k, v in rows)
    return (f'<table class="rpc-py" style="{table}"><caption style="text-align:left;font-weight:600">'
            f"{html.escape(title)}</caption>{body}</table>")


def _stats_rows(stats) -> list[tuple[str, str]]:
    layers = len(stats.tokens_seen)
    kept_pct = 100.0 * stats.kept_fraction
    return [
        ("RPC", html.escape(_config_text(stats.rpc))),
        ("shape", f"batch {stats.batch_size}, {layers} layers, prompt {stats.prompt_length} tokens, "
                  f"{stats.generated} decode steps"),
        ("tokens per layer", f"seen {_span(stats.tokens_seen)}, kept {_span(stats.tokens_kept)} ({kept_pct:.1f}%)"),
        ("compressions", f"{_span(stats.compressions)} per layer ({stats.total_compressions} in all), "
                         f"{1e3 * stats.compress_seconds:.2f} ms"),
        ("KV memory", f"{_fmt_bytes(stats.live_kv_bytes)} live, {_fmt_bytes(stats.kv_bytes)} allocated, "
                      f"peak {_fmt_bytes(stats.peak_kv_bytes)}"),
    ]


def stats_html(stats) -> str:
    """A compact HTML table of an ``RPCStats`` snapshot (what ``RPCStats._repr_html_`` shows)."""
    return _table("RPC cache statistics", _stats_rows(stats))


def cache_html(cache) -> str:
    """A compact HTML table of an ``RPCCache``: its state and its statistics."""
    if cache.closed:
        state = "released (storage freed; statistics kept)"
    elif cache.kvcache is None:
        state = "empty (no token appended yet)"
    else:
        state = f"open, physical length {_span(layer.length for layer in cache.layers)}"
    rows = [("state", html.escape(state))] + _stats_rows(cache.stats())
    history = RECORDED_HISTORIES.get(cache)
    if history is not None:
        rows.append(("recorded", f"per-layer lengths over {len(history.steps)} decode steps "
                                 "(<code>rpc_py.notebook.plot_cache_lengths(cache)</code>)"))
    return _table(f"RPCCache, {cache.num_layers} layers", rows)


# ------------------------------------------------------------------------------ length recording
