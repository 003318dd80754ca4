"""rpc_py.notebook: HTML tables, the progress bar / length-recording streamer and the plot helper.

Oracles: the RPC schedule in closed form (``RPCConfig.length_schedule``, itself checked against a
simulation in test_hf_config), the lengths a hand-written decoding loop reads from the cache after
every step, the ``RPCStats`` fields the tables display, and the token stream ``generate`` returns.
"""

import io
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from hf_testing import greedy, make_model, one_torch_thread, prompts  # noqa: F401 (fixture)
from rpc_py.config import RPCConfig
from rpc_py.hf import RPCCache, RPCStats, compress, generate, last_cache
from rpc_py.hf.registry import cache_kwarg as _cache_kwarg
from rpc_py.notebook import (GenerationMonitor, LengthHistory, cache_html, history_of, plot_cache_lengths,
                             stats_html)

RPC = RPCConfig(interval=16, window=4, ratio=4)
NEW = 70  # 69 decode steps: compressions after steps 20, 36, 52, 68


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet_monitor(**kw):
    """A monitor whose bar (if any) writes to a buffer, refreshed on every token."""
    buf = io.StringIO()
    kw.setdefault("tqdm_kwargs", {"file": buf, "mininterval": 0, "miniters": 1})
    return GenerationMonitor(**kw), buf


def table_rows(markup: str) -> dict:
    """Parse one of the helpers' tables (well-formed XHTML) into {header: cell text}."""
    root = ET.fromstring(markup)
    assert root.tag == "table"
    rows = {}
    for tr in root.iter("tr"):
        th, td = tr.find("th"), tr.find("td")
        rows[th.text] = "".join(td.itertext())
    return rows


def expected_compressions(rpc, lp, steps):
    """(step, before, after) of each compression, from the closed-form schedule."""
    schedule = [lp] + rpc.length_schedule(lp, steps)
    return [(s, schedule[s - 1] + 1, schedule[s]) for s in range(1, steps + 1) if schedule[s] < schedule[s - 1] + 1]


# ------------------------------------------------------------------------------- recording lengths
@pytest.mark.parametrize("rpc", [RPC, RPC.replace(budget=6), RPCConfig(interval=8, window=12, ratio=2),
                                 RPC.replace(aggregation="group", pooling="max", kernel_size=3),
                                 RPC.replace(policy="snapkv"), None])
def test_monitor_records_the_schedule(rpc):
    model = make_model("qwen2", layers=3)
    ids, mask, _ = prompts(3, [5, 9, 7])  # left padding: the prompt (padding included) is never compressed
    lp, steps = ids.shape[1], NEW - 1
    monitor, _ = quiet_monitor(progress=False)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, rpc=rpc, streamer=monitor, **greedy())
    cache = last_cache()
    history = monitor.history
    assert history is history_of(cache) and len(history) == steps
    assert list(history.steps) == list(range(1, steps + 1))
    assert history.prompt_length == lp and history.num_layers == 3
    schedule = (rpc or RPCConfig(enabled=False)).length_schedule(lp, steps)
    for layer in range(3):
        assert list(history.lengths[layer]) == schedule
        if rpc is None:
            assert history.compressions[layer] == []
        else:
            assert history.compressions[layer] == expected_compressions(rpc, lp, steps)
            assert len(history.compressions[layer]) == rpc.compressions_after(steps)
    assert monitor.tokens == NEW
    # The monitor only watched: same tokens as without it.
    assert torch.equal(out, generate(model, ids, attention_mask=mask, max_new_tokens=NEW, rpc=rpc, **greedy()))


def test_monitor_matches_a_hand_written_loop():
    model = make_model("llama")
    ids, _, _ = prompts(1, [6])
    cache = RPCCache(model, RPC)
    monitor = GenerationMonitor(progress=False, cache=cache)
    key = _cache_kwarg(model)
    read = []
    with compress(model, RPC), torch.no_grad():
        tok = model(input_ids=ids, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
        assert monitor.record() is False  # prefill only: no decode step yet
        for _ in range(50):
            tok = model(input_ids=tok, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
            assert monitor.record() is True
            assert monitor.record() is False  # the same step twice is recorded once
            read.append([cache.get_physical_length(i) for i in range(len(cache))])
    assert [list(row) for row in zip(*monitor.history.lengths)] == read
    assert monitor.history.compressions[0] == expected_compressions(RPC, ids.shape[1], 50)
    # A reset cache (new prompt) starts a new history.
    old = monitor.history
    cache.reset()
    with compress(model, RPC), torch.no_grad():
        tok = model(input_ids=ids, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
        model(input_ids=tok, use_cache=True, **{key: cache})
    assert monitor.record() is True
    assert monitor.history is not old and list(monitor.history.steps) == [1]


def test_monitor_serves_several_generations_and_chains_a_streamer():
    model = make_model("qwen2")
    ids, mask, _ = prompts(2, [4, 7])

    class Collect:
        def __init__(self):
            self.puts, self.ends = [], 0

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ends += 1

    inner = Collect()
    monitor, _ = quiet_monitor(progress=False, streamer=inner)
    with compress(model, RPC) as handle:
        first = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, streamer=monitor, **greedy())
        cache1, history1 = handle.last_cache, monitor.history
        second = model.generate(ids, attention_mask=mask, max_new_tokens=40, streamer=monitor, **greedy())
        cache2 = handle.last_cache
    assert history_of(cache1) is history1 and len(history1) == NEW - 1
    assert history_of(cache2) is monitor.history and len(monitor.history) == 39
    assert monitor.tokens == 40
    # The chained streamer saw everything: the prompt, then each new token, for both calls.
    assert inner.ends == 2 and len(inner.puts) == (1 + NEW) + (1 + 40)
    assert torch.equal(inner.puts[0], ids)
    assert torch.equal(torch.stack([p.reshape(-1) for p in inner.puts[1 : 1 + NEW]], 1), first[:, ids.shape[1]:])
    assert torch.equal(torch.stack([p.reshape(-1) for p in inner.puts[2 + NEW :]], 1), second[:, ids.shape[1]:])


def test_monitor_ignores_a_stale_cache():
    # model.generate outside rpc_py: last_cache() is an older, used cache that must not be recorded.
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [5])
    generate(model, ids, max_new_tokens=10, rpc=RPC, **greedy())
    stale = last_cache()
    monitor, _ = quiet_monitor(progress=False)
    model.generate(ids, max_new_tokens=10, streamer=monitor, **greedy())
    assert monitor.cache is None and monitor.history is None and monitor.tokens == 10
    assert history_of(stale) is None


# ------------------------------------------------------------------------------------ progress bar
def test_generate_progress_bar(capsys):
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [5])
    out = generate(model, ids, max_new_tokens=NEW, rpc=RPC, progress=True, **greedy())
    err = capsys.readouterr().err
    assert f"{NEW}/{NEW}" in err and "rpc_py.generate" in err
    assert "compressions" in err  # the postfix shows the cache
    assert len(history_of(last_cache())) == NEW - 1  # progress=True also records
    # Off by default: no bar, no recording, same tokens.
    cache_before = last_cache()
    assert torch.equal(generate(model, ids, max_new_tokens=NEW, rpc=RPC, **greedy()), out)
    assert capsys.readouterr().err == ""
    assert last_cache() is not cache_before and history_of(last_cache()) is None


def test_progress_bar_counts_tokens_and_closes():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [5])
    monitor, buf = quiet_monitor(total=NEW)
    generate(model, ids, max_new_tokens=NEW, rpc=RPC, streamer=monitor, **greedy())
    text = buf.getvalue()
    assert f"{NEW}/{NEW}" in text and "4 compressions" in text
    assert monitor.bar is None  # closed by end()
    assert f"{NEW + 1}/{NEW}" not in text  # the prompt is not counted


def test_progress_with_a_user_streamer_and_max_length(capsys):
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [5])
    seen = []

    class Count:
        def put(self, value):
            seen.append(value.numel())

        def end(self):
            seen.append("end")

    generate(model, ids, max_length=ids.shape[1] + 30, rpc=RPC, progress=True, streamer=Count(), **greedy())
    assert "30/30" in capsys.readouterr().err  # total from max_length - prompt
    assert len(seen) == 1 + 30 + 1 and seen[-1] == "end"
    # rpc_py.generate takes model.generate's arguments in its positions: a positional streamer too.
    from rpc_py.hf.options import generate_parameters

    positional, _ = generate_parameters(model)
    args = [ids] + [None] * (positional.index("streamer") - 1) + [Count()]
    seen.clear()
    generate(model, *args, max_new_tokens=12, rpc=RPC, progress=True, **greedy())
    assert "12/12" in capsys.readouterr().err
    assert len(seen) == 1 + 12 + 1 and seen[-1] == "end"


def test_bad_arguments():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [5])
    with pytest.raises(TypeError, match="progress"):
        generate(model, ids, max_new_tokens=5, rpc=RPC, progress="yes")
    with pytest.raises(TypeError, match="progress"):
        GenerationMonitor(progress=1)
    with pytest.raises(TypeError, match="record"):
        GenerationMonitor(record=None)
    with pytest.raises(ValueError, match="total"):
        GenerationMonitor(total=-1)
    with pytest.raises(TypeError, match="streamer"):
        GenerationMonitor(streamer=object())
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="cache: expected an RPCCache"):
        GenerationMonitor(cache=DynamicCache())
    with pytest.raises(ValueError, match="no cache"):
        GenerationMonitor(progress=False).record()


def test_missing_tqdm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.std", None)
    with pytest.raises(ImportError, match="progress=True needs tqdm"):
        GenerationMonitor(progress=True)
    GenerationMonitor(progress=False)  # recording alone needs nothing


def test_import_rpc_py_loads_no_optional_package():
    # (transformers itself imports tqdm, so that one is only checked without rpc_py.hf)
    for imports, optional in (("rpc_py, rpc_py.notebook", "'tqdm', 'matplotlib', 'IPython', 'ipywidgets'"),
                              ("rpc_py, rpc_py.notebook, rpc_py.hf", "'matplotlib', 'IPython', 'ipywidgets'")):
        code = (f"import sys, {imports}; bad = [m for m in ({optional}) if m in sys.modules]; "
                "sys.exit(f'imported {bad}' if bad else 0)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------- HTML tables
def test_stats_and_cache_html():
    model = make_model("qwen2")
    ids, mask, _ = prompts(2, [4, 7])
    lp, steps = ids.shape[1], NEW - 1
    empty = RPCCache(model, RPC)
    assert table_rows(empty._repr_html_())["state"].startswith("empty")

    out = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, rpc=RPC, progress=False,
                   return_dict_in_generate=True, **greedy())
    cache = getattr(out, "cache", None) or out.past_key_values
    stats = cache.stats()
    rows = table_rows(stats._repr_html_())
    assert rows["RPC"].startswith("P=16, R=4, c=4;") and "avg pooling k=7" in rows["RPC"]
    assert rows["shape"] == f"batch 2, 2 layers, prompt {lp} tokens, {steps} decode steps"
    kept = RPC.physical_length(lp, steps)
    assert rows["tokens per layer"] == f"seen {lp + steps}, kept {kept} ({100 * kept / (lp + steps):.1f}%)"
    assert rows["compressions"].startswith(f"{RPC.compressions_after(steps)} per layer "
                                           f"({2 * RPC.compressions_after(steps)} in all), ")
    live_kib = stats.live_kv_bytes / 1024
    assert rows["KV memory"].startswith(f"{live_kib:.2f} KiB live")
    assert stats._repr_html_() == stats_html(stats)

    open_rows = table_rows(cache._repr_html_())
    assert open_rows["state"] == f"open, physical length {kept}"
    assert "recorded" not in open_rows
    cache.release()
    released = table_rows(cache_html(cache))
    assert released["state"].startswith("released") and released["shape"] == rows["shape"]


def test_html_ranges_and_escaping():
    stats = RPCStats(rpc=RPCConfig(enabled=False), batch_size=1, prompt_length=3, generated=4,
                     tokens_seen=[7, 7, 7], tokens_kept=[5, 7, 6], compressions=[1, 0, 1], kv_bytes=3 << 20,
                     peak_kv_bytes=5 << 20, live_kv_bytes=100, compress_seconds=0.0012)
    rows = table_rows(stats_html(stats))
    assert rows["tokens per layer"] == "seen 7, kept 5\u20137 (85.7%)"
    assert rows["compressions"] == "0\u20131 per layer (2 in all), 1.20 ms"
    assert rows["KV memory"] == "100 B live, 3.00 MiB allocated, peak 5.00 MiB"
    assert rows["RPC"].startswith("off")
    other = RPCStats(**{**stats.__dict__, "rpc": RPCConfig(interval=8, window=2, ratio=2, policy="recent")})
    assert table_rows(stats_html(other))["RPC"] == "P=8, R=2, c=2; policy Recent()"
    # Text goes through html.escape: a hostile value cannot inject markup.
    weird = RPCStats(**{**stats.__dict__, "rpc": RPCConfig(pooling="max", kernel_size=3)})
    object.__setattr__(weird.rpc, "aggregation", "<b>&")
    markup = stats_html(weird)
    assert "<b>" not in markup and "&lt;b&gt;&amp;" in markup
    ET.fromstring(markup)


def test_cache_html_mentions_a_recording():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [5])
    generate(model, ids, max_new_tokens=30, rpc=RPC, streamer=GenerationMonitor(progress=False), **greedy())
    rows = table_rows(last_cache()._repr_html_())
    assert rows["recorded"].startswith("per-layer lengths over 29 decode steps")


# -------------------------------------------------------------------------------------------- plot
def test_plot_cache_lengths():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = make_model("qwen2", layers=3)
    ids, _, _ = prompts(1, [6])
    lp, steps = ids.shape[1], NEW - 1
    generate(model, ids, max_new_tokens=NEW, rpc=RPC, progress=False,
             streamer=GenerationMonitor(progress=False), **greedy())
    cache = last_cache()
    ax = plot_cache_lengths(cache)
    lines = {line.get_label(): line for line in ax.get_lines()}
    full, rpc_line = lines["full KV cache"], lines["all 3 layers"]  # identical layers share one line
    assert list(full.get_ydata()) == [lp + s for s in range(1, steps + 1)]
    assert list(rpc_line.get_xdata()) == list(range(1, steps + 1))
    assert list(rpc_line.get_ydata()) == RPC.length_schedule(lp, steps)
    markers = [line for line in ax.get_lines() if line.get_marker() == "v"]
    expected = expected_compressions(RPC, lp, steps)
    assert [(int(m.get_xdata()[0]), int(m.get_ydata()[0])) for m in markers] == [(s, a) for s, _, a in expected]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full KV cache", "all 3 layers", "compression"]
    assert ax.get_title().startswith("RPC P=16, R=4, c=4")
    plt.close(ax.figure)

    # One layer, an Axes of the caller's, no full-cache line; the monitor and the history plot the same.
    fig, axes = plt.subplots(1, 2)
    plot_cache_lengths(history_of(cache), ax=axes[0], layers=[1], full_cache=False, title="")
    assert [line.get_label() for line in axes[0].get_lines()][0] == "layer 1"
    assert len([line for line in axes[0].get_lines() if line.get_marker() == "v"]) == len(expected)
    assert axes[0].get_title() == ""
    # Other policies and no compression say so in the title.
    for rpc, title in ((RPC.replace(policy="recent"), "recent on the RPC schedule, P=16, R=4, c=4"),
                       (RPCConfig(enabled=False), "no compression (rpc=None)")):
        history = LengthHistory(1, prompt_length=3, rpc=rpc)
        history.steps.extend([1, 2])
        history.lengths[0].extend([4, 5])
        assert plot_cache_lengths(history, ax=axes[1]).get_title() == title
        axes[1].clear()
    plt.close(fig)


def test_plot_errors(monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [5])
    generate(model, ids, max_new_tokens=10, rpc=RPC, **greedy())
    with pytest.raises(ValueError, match="no per-step lengths were recorded"):
        plot_cache_lengths(last_cache())
    with pytest.raises(ValueError, match="no per-step lengths"):
        plot_cache_lengths(LengthHistory(2))
    with pytest.raises(TypeError, match="expected a GenerationMonitor"):
        plot_cache_lengths(42)
    monitor = GenerationMonitor(progress=False)
    generate(model, ids, max_new_tokens=10, rpc=RPC, streamer=monitor, **greedy())
    with pytest.raises(IndexError, match="layers"):
        plot_cache_lengths(monitor, layers=[2])
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        monitor.plot()

