"""Drop-in parity with ``model.generate`` (issue 10): the gaps a new user hits.

1. options reach generate in every way ``model.generate`` accepts them (keyword, positional
   ``GenerationConfig``, ``model.generation_config`` defaults): unsupported ones are refused,
   supported ones honoured;
2. ``rpc_py.generate`` takes ``model.generate``'s arguments in the same positions;
3. plain and compressed generations on one model in several threads are each what they would be
   alone (real threads; events force the interleavings);
4. the eager path grows its storage up to the schedule's peak instead of reserving it up front;
5. continuing from a returned cache (multi-token append), with and without compression;
6. no deprecation warning from rpc_py's own attribute access, ``last_cache`` across threads and
   without keeping storage alive, Phi-3.5-style ``sliding_window >= max_position_embeddings``,
   kept logical positions per layer (mapping ``output_attentions`` columns).

Tiny config-built float32 models on CPU with fixed seeds (tests/hf_testing.py).
"""

from __future__ import annotations

import gc
import logging
import threading
import warnings
import weakref

import pytest
import torch
import transformers
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers import StoppingCriteriaList
from transformers.cache_utils import Cache

import rpc_py
import rpc_py.hf.attention as rpc_attention
from hf_testing import VOCAB, greedy, make_model, one_torch_thread, prompts  # noqa: F401 (fixture)
from rpc_py.config import RPCConfig
from rpc_py.hf import RPCCache, check_model_supported, compress, generate, last_cache
from rpc_py.hf.registry import cache_kwarg as _cache_kwarg

RPC = RPCConfig(interval=16, window=4, ratio=4)
FIRST = RPC.interval + RPC.window
NEW = 60
WAIT = 120  # seconds; a thread that does not arrive in time fails the test instead of hanging it


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def returned_cache(out):
    """The cache in a generate output, found without touching deprecated attributes."""
    found = [v for v in out.values() if isinstance(v, Cache)]
    assert len(found) == 1
    return found[0]


def cache_kw(model, cache):
    return {_cache_kwarg(model): cache}


class StopAtLength(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


class BanToken(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


# ============================================================ 1. options, however they arrive
def test_positional_generation_config_unsupported_options_refused():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [9])
    helper = make_model("qwen2", seed=3)
    with compress(model, RPC):
        # The case: silently re-appended the whole sequence every step.
        with pytest.raises(ValueError, match="use_cache"):
            model.generate(ids, GenerationConfig(use_cache=False, max_new_tokens=30, do_sample=False))
        with pytest.raises(NotImplementedError, match="beam search"):
            model.generate(ids, GenerationConfig(num_beams=2, max_new_tokens=5))
        with pytest.raises(ValueError, match="cache_implementation"):
            model.generate(ids, GenerationConfig(cache_implementation="static", max_new_tokens=5))
        with pytest.raises(NotImplementedError, match="contrastive"):
            model.generate(ids, GenerationConfig(penalty_alpha=0.6, top_k=4, max_new_tokens=5))
        with pytest.raises(NotImplementedError, match="assisted"):
            model.generate(ids, GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=5))
        # assistant_model is generate's 7th positional parameter
        with pytest.raises(NotImplementedError, match="assisted"):
            model.generate(ids, None, None, None, None, None, helper, max_new_tokens=5)
        # keyword options override the positional config, as in model.generate
        with pytest.raises(ValueError, match="use_cache"):
            model.generate(ids, GenerationConfig(max_new_tokens=5), use_cache=False)
    assert model.config._attn_implementation == "sdpa" and "generate" not in model.__dict__


@pytest.mark.parametrize("field, value, exc, words", [
    ("use_cache", False, ValueError, "use_cache"),
    ("num_beams", 3, NotImplementedError, "beam search"),
    ("cache_implementation", "static", ValueError, "cache_implementation"),
])
def test_model_generation_config_defaults_checked(field, value, exc, words):
    model = make_model("qwen2")
    setattr(model.generation_config, field, value)
    with pytest.raises(exc, match=words):
        generate(model, prompts(1)[0], max_new_tokens=4, rpc=RPC)


def test_positional_generation_config_honoured():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [9])
    lp = ids.shape[1]
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, config)
    assert plain.shape[1] == lp + NEW
    with compress(model, RPCConfig(interval=1000, window=4)) as handle:
        out = model.generate(ids, config)
    assert torch.equal(out, plain)
    cache = handle.last_cache
    assert cache.stats().generated == NEW - 1
    assert cache.max_capacity == RPCConfig(interval=1000, window=4).peak_length(lp, NEW)
    # With compression: the positional config gives the same run as the same options by keyword.
    with compress(model, RPC) as handle:
        out = model.generate(ids, config)
    assert torch.equal(out, generate(model, ids, rpc=RPC, max_new_tokens=NEW, **greedy()))
    assert handle.last_cache.stats().compressions == [RPC.compressions_after(NEW - 1)] * 2
    assert handle.last_cache.max_capacity == RPC.peak_length(lp, NEW)
    # A keyword overrides the config's value, as in model.generate.
    with compress(model, RPC):
        short = model.generate(ids, config, max_new_tokens=7)
    assert short.shape[1] == lp + 7


# ============================================================ 2. signature of rpc_py.generate
def test_generate_takes_model_generate_positional_arguments():
    model = make_model("llama")
    ids, _, _ = prompts(1, [8])
    config = GenerationConfig(max_new_tokens=40, do_sample=False, pad_token_id=0)
    # The call: ``rpc_py.generate(model, ids, generation_config)``
    assert torch.equal(rpc_py.generate(model, ids, config, rpc=None), model.generate(ids, config))
    processors = LogitsProcessorList([BanToken(int(model.generate(ids, config)[0, -1]))])
    stopping = StoppingCriteriaList([StopAtLength(ids.shape[1] + 30)])
    want = model.generate(ids, config, processors, stopping)
    assert want.shape[1] == ids.shape[1] + 30
    assert torch.equal(rpc_py.generate(model, ids, config, processors, stopping, rpc=None), want)
    # Positional and keyword forms are the same call (here with compression).
    a = rpc_py.generate(model, ids, config, processors, stopping, rpc=RPC)
    b = rpc_py.generate(model, inputs=ids, generation_config=config, logits_processor=processors,
                        stopping_criteria=stopping, rpc=RPC)
    c = rpc_py.generate(model, input_ids=ids, logits_processor=processors, stopping_criteria=stopping, rpc=RPC,
                        max_new_tokens=40, do_sample=False)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_generate_second_positional_is_generation_config():
    model = make_model("qwen2")
    ids, mask, _ = prompts(2, [5, 7])
    with pytest.raises(TypeError, match="generation_config.*attention_mask="):
        rpc_py.generate(model, ids, mask, max_new_tokens=4)
    with pytest.raises(TypeError, match="multiple values.*generation_config"):
        rpc_py.generate(model, ids, GenerationConfig(), generation_config=GenerationConfig())
    assert model.config._attn_implementation == "sdpa"


def test_cuda_graph_flag_with_generate_positionals_falls_back():
    from rpc_py.hf.graph import GraphFallbackWarning

    model = make_model("qwen2")
    ids, _, _ = prompts(1, [8])
    config = GenerationConfig(max_new_tokens=30, do_sample=False, pad_token_id=0)
    with pytest.warns(GraphFallbackWarning, match="generation_config"):
        out = rpc_py.generate(model, ids, config, rpc=RPC, cuda_graph=True)
    assert torch.equal(out, rpc_py.generate(model, ids, config, rpc=RPC))


# ============================================================ 3. one model, several threads
class StepHook(StoppingCriteria):
    """Runs ``actions[step]()`` when generate has produced ``step`` new tokens; never stops."""

    def __init__(self, actions):
        self.actions = actions
        self.step = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.step += 1
        action = self.actions.get(self.step)
        if action is not None:
            action()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def signal(event):
    return event.set


def wait_for(event):
    def wait():
        assert event.wait(WAIT), "the other thread did not arrive"

    return wait


def both(*fns):
    def run():
        for fn in fns:
            fn()

    return run


def run_threads(targets):
    """Run callables in threads; re-raise the first error; return their results."""
    results, errors = [None] * len(targets), []

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def hooked(actions):
    return StoppingCriteriaList([StepHook(actions)])


@pytest.mark.parametrize("order", ["rpc_first", "plain_first"])
def test_plain_and_rpc_generate_in_threads_are_each_what_they_are_alone(order):
    model = make_model("qwen2")
    ids_r, mask_r, _ = prompts(2, [5, 8], seed=1)
    ids_p, mask_p, _ = prompts(3, [6, 4, 9], seed=2)
    want_r = generate(model, ids_r, attention_mask=mask_r, rpc=RPC, max_new_tokens=NEW, **greedy())
    want_p = model.generate(ids_p, attention_mask=mask_p, max_new_tokens=NEW, **greedy())
    assert not torch.equal(want_r[:, -NEW:], generate(model, ids_r, attention_mask=mask_r, rpc=None,
                                                        max_new_tokens=NEW, **greedy())[:, -NEW:])
    r_in, p_in, r_done, p_mid = (threading.Event() for _ in range(4))
    if order == "rpc_first":
        # The plain call starts while rpc_py is active on the model and goes on after rpc_py returned.
        r_hooks = {2: both(signal(r_in), wait_for(p_in))}
        p_start = wait_for(r_in)
        p_hooks = {3: both(signal(p_in), wait_for(r_done))}
        r_start = lambda: None  # noqa: E731
    else:
        # The plain call decodes before, during and after an rpc_py call on the same model.
        p_start = lambda: None  # noqa: E731
        p_hooks = {2: both(signal(p_in), wait_for(r_in)), 5: both(signal(p_mid), wait_for(r_done))}
        r_start = wait_for(p_in)
        r_hooks = {2: both(signal(r_in), wait_for(p_mid))}

    def rpc_call():
        r_start()
        try:
            return generate(model, ids_r, attention_mask=mask_r, rpc=RPC, max_new_tokens=NEW,
                            stopping_criteria=hooked(r_hooks), **greedy())
        finally:
            r_done.set()

    def plain_call():
        p_start()
        return model.generate(ids_p, attention_mask=mask_p, max_new_tokens=NEW, stopping_criteria=hooked(p_hooks),
                              **greedy())

    got_r, got_p = run_threads([rpc_call, plain_call])
    assert torch.equal(got_r, want_r)
    assert torch.equal(got_p, want_p)
    assert model.config._attn_implementation == "sdpa" and "generate" not in model.__dict__


def test_two_concurrent_rpc_generations_on_one_model():
    model = make_model("llama", attn="eager")
    rpc_b = RPC.replace(aggregation="group", pooling="max", kernel_size=3)
    ids_a, mask_a, _ = prompts(2, [5, 8], seed=4)
    ids_b, mask_b, _ = prompts(1, [7], seed=5)
    want_a = generate(model, ids_a, attention_mask=mask_a, rpc=RPC, max_new_tokens=NEW, **greedy())
    want_b = generate(model, ids_b, rpc=rpc_b, max_new_tokens=NEW, **greedy())
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()

    def call_a():
        try:
            return generate(model, ids_a, attention_mask=mask_a, rpc=RPC, max_new_tokens=NEW,
                            stopping_criteria=hooked({3: both(signal(a_in), wait_for(b_in))}), **greedy())
        finally:
            a_done.set()

    def call_b():
        wait_for(a_in)()
        # b starts while a runs, and keeps decoding (and compressing) after a has returned
        return generate(model, ids_b, rpc=rpc_b, max_new_tokens=NEW,
                        stopping_criteria=hooked({2: both(signal(b_in), wait_for(a_done))}), **greedy())

    got_a, got_b = run_threads([call_a, call_b])
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
    assert model.config._attn_implementation == "eager"


def test_free_running_threads_mixed_on_one_model():
    """Three generations released together by a barrier and left to interleave freely."""
    model = make_model("qwen3")
    ids_a, mask_a, _ = prompts(2, [6, 3], seed=14)
    ids_b, _, _ = prompts(1, [9], seed=15)
    ids_c, mask_c, _ = prompts(2, [4, 7], seed=16)
    rpc_b = RPC.replace(interval=8, window=6, ratio=2)
    want = [
        generate(model, ids_a, attention_mask=mask_a, rpc=RPC, max_new_tokens=NEW, **greedy()),
        generate(model, ids_b, rpc=rpc_b, max_new_tokens=NEW, **greedy()),
        model.generate(ids_c, attention_mask=mask_c, max_new_tokens=NEW, **greedy()),
    ]
    start = threading.Barrier(3, timeout=WAIT)
    release = {1: start.wait}
    got = run_threads([
        lambda: generate(model, ids_a, attention_mask=mask_a, rpc=RPC, max_new_tokens=NEW,
                         stopping_criteria=hooked(dict(release)), **greedy()),
        lambda: generate(model, ids_b, rpc=rpc_b, max_new_tokens=NEW, stopping_criteria=hooked(dict(release)),
                         **greedy()),
        lambda: model.generate(ids_c, attention_mask=mask_c, max_new_tokens=NEW,
                               stopping_criteria=hooked(dict(release)), **greedy()),
    ])
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert model.config._attn_implementation == "sdpa"


def test_compress_context_applies_to_its_thread_only():
    model = make_model("qwen2")
    ids, mask, _ = prompts(2, [6, 9], seed=6)
    want_rpc = generate(model, ids, attention_mask=mask, rpc=RPC, max_new_tokens=NEW, **greedy())
    want_plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **greedy())
    assert not torch.equal(want_rpc, want_plain)
    inside, plain_done = threading.Event(), threading.Event()

    def in_context():
        with compress(model, RPC) as handle:
            inside.set()
            assert plain_done.wait(WAIT)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **greedy())
            # the handle's generate compresses in any thread (the streamer pattern)
            side = run_threads([lambda: handle.generate(ids, attention_mask=mask, max_new_tokens=NEW, **greedy())])
            return out, side[0]

    def other_thread():
        try:
            assert inside.wait(WAIT)
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **greedy())
        finally:
            plain_done.set()

    (got_rpc, got_side), got_plain = run_threads([in_context, other_thread])
    assert torch.equal(got_rpc, want_rpc) and torch.equal(got_side, want_rpc)
    assert torch.equal(got_plain, want_plain)


def test_streaming_recipe_in_another_thread_warns_that_it_runs_uncompressed():
    """Thread(target=model.generate, ...) inside a compress block runs plain generate: never silently."""
    from rpc_py.hf import UncompressedThreadWarning

    model = make_model("qwen2")
    ids, mask, _ = prompts(1, [6], seed=2)
    want_plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **greedy())
    want_rpc = generate(model, ids, attention_mask=mask, rpc=RPC, max_new_tokens=NEW, **greedy())
    caught = []

    def background(target):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            out = target(ids, attention_mask=mask, max_new_tokens=NEW, **greedy())
        caught.append([w.category for w in got])
        return out

    with compress(model, RPC) as handle:
        plain = run_threads([lambda: background(model.generate)])[0]
        compressed = run_threads([lambda: background(handle.generate)])[0]
    assert torch.equal(plain, want_plain) and torch.equal(compressed, want_rpc)
    assert UncompressedThreadWarning in caught[0]
    assert UncompressedThreadWarning not in caught[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncompressedThreadWarning)
        model.generate(ids, attention_mask=mask, max_new_tokens=2, **greedy())  # no block open: no warning


def test_compress_contexts_nest_innermost_wins():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [7])
    other = RPC.replace(interval=8)
    with compress(model, RPC) as outer:
        with compress(model, other) as inner:
            a = model.generate(ids, max_new_tokens=NEW, **greedy())
            assert inner.last_cache.rpc == other
        b = model.generate(ids, max_new_tokens=NEW, **greedy())
        assert outer.last_cache.rpc == RPC
        assert model.config._attn_implementation == "rpc_sdpa"
    assert model.config._attn_implementation == "sdpa" and "generate" not in model.__dict__
    assert torch.equal(a, generate(model, ids, rpc=other, max_new_tokens=NEW, **greedy()))
    assert torch.equal(b, generate(model, ids, rpc=RPC, max_new_tokens=NEW, **greedy()))


# ============================================================ 4. memory grows as needed
def _per_token_bytes(model, batch=1):
    text = model.config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * batch * text.num_key_value_heads * head_dim * 4  # K and V, float32


@pytest.mark.parametrize("rpc", [None, RPCConfig()], ids=["no-rpc", "rpc-default"])
def test_early_eos_with_huge_max_new_tokens_allocates_little(rpc):
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [7])
    lp = ids.shape[1]
    first = model.generate(ids, max_new_tokens=6, **greedy())[0, lp:]
    k = next(i for i in range(2, 6) if int(first[i]) not in first[:i].tolist())
    eos = int(first[k])
    out = generate(model, ids, rpc=rpc, max_new_tokens=1_000_000, eos_token_id=eos, **greedy())
    assert out.shape[1] == lp + k + 1
    stats = last_cache().stats()
    # One first block of 256 tokens per layer (the growth minimum), never grown.
    assert stats.peak_kv_bytes == 2 * 256 * _per_token_bytes(model)


def test_growth_is_geometric_up_to_the_schedule_peak():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [7])
    lp, per_token = ids.shape[1], _per_token_bytes(model)
    new = 300
    out = generate(model, ids, rpc=None, max_new_tokens=new, return_dict_in_generate=True, **greedy())
    cache = returned_cache(out)
    peak = RPCConfig(enabled=False).peak_length(lp, new)
    assert peak == lp + new - 1 == 306
    # 256 tokens, then doubled but capped at the schedule's peak; while a layer grows it holds both blocks.
    assert [cache.kvcache.capacity(i) for i in range(2)] == [peak, peak]
    assert cache.stats().peak_kv_bytes == (2 * peak + 256) * per_token
    cache.release()
    # With RPC the peak is small: one block of exactly the peak, never grown.
    out = generate(model, ids, rpc=RPC, max_new_tokens=new, return_dict_in_generate=True, **greedy())
    cache = returned_cache(out)
    peak = RPC.peak_length(lp, new)
    assert peak < 256
    assert [cache.kvcache.capacity(i) for i in range(2)] == [peak, peak]
    ring = 1 * model.config.num_attention_heads * RPC.window * 16 * 4  # [B, Hq, R, D] float32 per layer
    assert cache.stats().peak_kv_bytes == cache.stats().kv_bytes == 2 * (peak * per_token + ring)
    assert cache.kvcache.generation(0) == 1
    cache.release()


def test_graph_path_keeps_fixed_capacity(monkeypatch):
    import rpc_py.hf.graph as graph

    made = []

    class Recording(RPCCache):
        def release(self):
            if not self.closed:
                made.append([(self.kvcache.capacity(i), self.kvcache.generation(i)) for i in range(self.num_layers)])
            super().release()

    monkeypatch.setattr(graph, "RPCCache", Recording)
    model = make_model("qwen2")
    ids, mask, _ = prompts(2, [5, 7])
    rpc = RPCConfig(interval=8, window=4, ratio=2, kernel_size=3)
    graph.static_decode(model, ids, mask, rpc=rpc, max_new_tokens=45)
    assert made == [[(rpc.peak_length(ids.shape[1], 45), 1)] * 2]


# ============================================================ 5. continuing from a returned cache
def _followup(batch, n, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, n), generator=g)


@pytest.mark.parametrize("arch, attn", [("qwen2", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa")])
def test_continue_without_eviction_equals_full_kv(arch, attn):
    model = make_model(arch, attn=attn)
    ids, mask, _ = prompts(2, [5, 9], seed=7)
    rpc = RPCConfig(interval=1000, window=4)
    out1 = generate(model, ids, attention_mask=mask, rpc=rpc, max_new_tokens=10, return_dict_in_generate=True,
                    **greedy())
    ref1 = model.generate(ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True, **greedy())
    assert torch.equal(out1.sequences, ref1.sequences)
    ids2 = torch.cat([out1.sequences, _followup(2, 5)], dim=1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    cache = returned_cache(out1)
    out2 = generate(model, ids2, attention_mask=mask2, rpc=rpc, max_new_tokens=12, **cache_kw(model, cache), **greedy())
    ref2 = model.generate(ids2, attention_mask=mask2, max_new_tokens=12, **cache_kw(model, returned_cache(ref1)),
                          **greedy())
    assert torch.equal(out2, ref2)
    assert cache.get_seq_length() == ids2.shape[1] + 11
    # the growth bound follows the new turn: appended tokens join the prefix, the schedule restarts
    peak = rpc.peak_length(ids2.shape[1], 12)
    assert cache.max_capacity == peak and cache.kvcache.capacity(0) == peak
    # a third turn, through the compress context
    ids3 = torch.cat([out2, _followup(2, 3, seed=12)], dim=1)
    mask3 = torch.cat([mask2, torch.ones(2, ids3.shape[1] - mask2.shape[1], dtype=mask.dtype)], dim=1)
    ref3 = model.generate(ids3, attention_mask=mask3, max_new_tokens=6, **cache_kw(model, returned_cache(ref1)),
                          **greedy())
    with compress(model, rpc):
        out3 = model.generate(ids3, attention_mask=mask3, max_new_tokens=6, **cache_kw(model, cache), **greedy())
    assert torch.equal(out3, ref3)
    cache.release()


def _turn_one(model, rpc, ids, mask, new, keep_layouts=False):
    """Generate ``new`` tokens with compression; return (output, cache, events)."""
    events = []
    cache = RPCCache(model, rpc, keep_layouts=keep_layouts)
    cache.compression_hook = events.append
    with compress(model, rpc):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, **cache_kw(model, cache), **greedy())
    return out, cache, events


def test_continue_after_compression_equals_token_by_token():
    """Oracle for the multi-token append over an evicted layout: the same tokens appended one per step
    (q = 1, no padding: SDPA attends to every physical slot without any mask)."""
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [9])
    chunk = _followup(1, 6)
    key = _cache_kwarg(model)
    logits = []
    for one_by_one in (False, True):
        out, cache, events = _turn_one(model, RPC, ids, None, FIRST + 1)  # last decode step compresses
        assert len(events) == 2 and cache.get_physical_length() < cache.get_seq_length()
        tail = torch.cat([out[:, -1:], chunk], dim=1)
        with compress(model, RPC), torch.no_grad():
            if one_by_one:
                steps = [model(input_ids=tail[:, i : i + 1], use_cache=True, **{key: cache}).logits for i in
                         range(tail.shape[1])]
                logits.append(torch.cat(steps, dim=1))
            else:
                logits.append(model(input_ids=tail, use_cache=True, **{key: cache}).logits)
        assert cache.get_seq_length() == ids.shape[1] + FIRST + 7
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def _positions_from_events(events, layer, lp, aggregation, batch, kv_heads):
    """Physical slot -> token index per layer, rebuilt from the kept indices the C compression
    returned (independent of the cache's own bookkeeping). Returns (positions [B, A, L], seen)."""
    heads = kv_heads if aggregation == "group" else 1
    pos = torch.arange(lp).expand(batch, heads, lp)
    seen = lp
    for e in (e for e in events if e.layer == layer):
        now = lp + e.generated
        pos = torch.cat([pos, torch.arange(seen, now).expand(batch, heads, now - seen)], dim=2)
        seen = now
        assert pos.shape[2] == e.length_before
        cand = pos[:, :, e.start : e.length_before - RPC.window]
        kept = cand.gather(2, e.indices.to(torch.int64).expand(batch, heads, -1))
        pos = torch.cat([pos[:, :, : e.start], kept, pos[:, :, e.length_before - RPC.window :]], dim=2)
        assert pos.shape[2] == e.length_after
    return pos, seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_continue_after_compression_mask_matches_reference(attn, aggregation, monkeypatch):
    rpc = RPC.replace(aggregation=aggregation)
    model = make_model("qwen2", attn=attn)
    ids, mask, _ = prompts(2, [5, 8], seed=8)
    lp, new = ids.shape[1], 2 * RPC.interval + FIRST - 5
    out, cache, events = _turn_one(model, rpc, ids, mask, new)
    assert len(events) == 2 * rpc.compressions_after(new - 1) == 4
    # Follow-up: 6 tokens for sequence 1, 4 (left-padded by 2) for sequence 0: padding mid-sequence.
    chunk = _followup(2, 6)
    chunk_mask = torch.ones(2, 6, dtype=mask.dtype)
    chunk_mask[0, :2] = 0
    tail = torch.cat([out[:, -1:], chunk], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype), chunk_mask], dim=1)
    seen_before = cache.get_seq_length()
    assert full_mask.shape[1] == seen_before + tail.shape[1]

    captured = {}
    real = rpc_attention.sdpa_attention_forward
    real_eager = rpc_attention._eager_function

    def capture(module, query, key, value, attention_mask, **kw):
        if query.shape[2] > 1:
            captured[module.layer_idx] = (attention_mask.clone(), key.shape[2])
        return None

    def capturing_sdpa(module, query, key, value, attention_mask, **kw):
        capture(module, query, key, value, attention_mask)
        return real(module, query, key, value, attention_mask, **kw)

    def capturing_eager(module):
        fn = real_eager(module)

        def run(module, query, key, value, attention_mask, **kw):
            capture(module, query, key, value, attention_mask)
            return fn(module, query, key, value, attention_mask, **kw)

        return run

    monkeypatch.setattr(rpc_attention, "sdpa_attention_forward", capturing_sdpa)
    monkeypatch.setattr(rpc_attention, "_eager_function", capturing_eager)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, seen_before:]
    with compress(model, rpc), torch.no_grad():
        model(input_ids=tail, attention_mask=full_mask, position_ids=position_ids, use_cache=True,
              **cache_kw(model, cache))
    assert sorted(captured) == [0, 1]
    q = tail.shape[1]
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, (used, kv_len) in captured.items():
        pos, seen = _positions_from_events(events, layer, lp, aggregation, 2, model.config.num_key_value_heads)
        pos = torch.cat([pos, torch.arange(seen, seen_before + q).expand(2, pos.shape[1], -1)], dim=2)
        assert pos.shape[2] == kv_len == cache.get_physical_length(layer)
        assert torch.equal(cache.logical_positions(layer), pos.expand(2, model.config.num_key_value_heads, -1))
        query_pos = torch.arange(seen_before, seen_before + q)
        allowed = (pos[:, :, None, :] <= query_pos[None, None, :, None]) & full_mask.bool().gather(
            1, pos.reshape(2, -1)).reshape(pos.shape)[:, :, None, :]  # [B, A, q, L]
        if aggregation == "group":
            allowed = allowed.repeat_interleave(group, dim=1)
        got = used if used.dtype == torch.bool else used == 0
        got = got.expand(2, allowed.shape[1], q, kv_len)
        assert torch.equal(got, allowed), layer
    cache.release()


def test_continued_padded_batch_equals_sequences_alone():
    """With padding inside the follow-up, each sequence of the batch continues exactly as it does alone."""
    model = make_model("llama")
    ids, mask, singles = prompts(2, [5, 8], seed=9)
    new = FIRST + 8
    chunk = _followup(2, 6, seed=13)
    lengths = [4, 6]
    out, cache, _ = _turn_one(model, RPC, ids, mask, new)
    chunk_b = chunk.clone()
    chunk_mask = torch.ones(2, 6, dtype=mask.dtype)
    chunk_b[0, :2], chunk_mask[0, :2] = 0, 0
    ids2 = torch.cat([out, chunk_b], dim=1)
    mask2 = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype), chunk_mask], dim=1)
    got = generate(model, ids2, attention_mask=mask2, rpc=RPC, max_new_tokens=FIRST + 6, **cache_kw(model, cache),
                   **greedy())
    for b, single in enumerate(singles):
        o, c, _ = _turn_one(model, RPC, single, None, new)
        assert torch.equal(o[0, single.shape[1] :], out[b, ids.shape[1] :])
        ids_alone = torch.cat([o, chunk[b : b + 1, 6 - lengths[b] :]], dim=1)
        alone = generate(model, ids_alone, rpc=RPC, max_new_tokens=FIRST + 6, **cache_kw(model, c), **greedy())
        assert torch.equal(alone[0, ids_alone.shape[1] :], got[b, ids2.shape[1] :]), b


# ============================================================ 6. smaller items
def test_return_dict_output_causes_no_deprecation_warning(monkeypatch):
    messages = []

    def recording(self, msg, *args, **kwargs):
        messages.append(str(msg))

    monkeypatch.setattr(logging.Logger, "warning_once", recording, raising=False)
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [7])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, ids, rpc=RPC, max_new_tokens=30, return_dict_in_generate=True, **greedy())
        with compress(model, RPC):
            out2 = model.generate(ids, max_new_tokens=30, return_dict_in_generate=True, **greedy())
    assert not [m for m in messages if "deprecated" in m], messages
    assert not [w for w in caught if "deprecated" in str(w.message)]
    assert not returned_cache(out).closed and not returned_cache(out2).closed


def test_last_cache_from_a_background_thread():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [7])
    got = run_threads([lambda: generate(model, ids, rpc=RPC, max_new_tokens=NEW, **greedy())])
    cache = last_cache()
    assert cache is not None and cache.closed
    assert cache.stats().generated == NEW - 1 and cache.stats().compressions == [RPC.compressions_after(NEW - 1)] * 2
    assert got[0].shape[1] == ids.shape[1] + NEW


def test_last_cache_does_not_keep_a_returned_cache_alive():
    model = make_model("qwen2")
    ids, _, _ = prompts(1, [7])
    for via_context in (False, True):
        if via_context:
            with compress(model, RPC) as handle:
                out = model.generate(ids, max_new_tokens=30, return_dict_in_generate=True, **greedy())
        else:
            handle = None
            out = generate(model, ids, rpc=RPC, max_new_tokens=30, return_dict_in_generate=True, **greedy())
        cache = returned_cache(out)
        assert last_cache() is cache and (handle is None or handle.last_cache is cache)
        ref = weakref.ref(cache)
        del out, cache
        gc.collect()
        assert ref() is None, "rpc_py kept the returned cache (and its storage) alive"
        assert last_cache() is None and (handle is None or handle.last_cache is None)
    # a cache released by rpc_py stays readable (its statistics only)
    generate(model, ids, rpc=RPC, max_new_tokens=30, **greedy())
    gc.collect()
    assert last_cache() is not None and last_cache().closed and last_cache().stats().generated == 29


def _phi3(sliding_window):
    torch.manual_seed(5)
    config = transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=512, sliding_window=sliding_window, initializer_range=0.2,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    model = transformers.Phi3ForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("window", [512, 1024])
def test_sliding_window_covering_every_position_is_full_attention(window):
    model = _phi3(window)
    check_model_supported(model)
    ids, mask, _ = prompts(2, [5, 9])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **greedy())
    assert torch.equal(generate(model, ids, attention_mask=mask, rpc=None, max_new_tokens=NEW, **greedy()), want)
    out = generate(model, ids, attention_mask=mask, rpc=RPC, max_new_tokens=NEW, **greedy())
    lp = ids.shape[1]
    assert torch.equal(out[:, : lp + FIRST + 1], want[:, : lp + FIRST + 1])
    assert last_cache().stats().compressions == [RPC.compressions_after(NEW - 1)] * 2
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, max_position_embeddings=256, sliding_window=256))
    check_model_supported(mistral)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        check_model_supported(_phi3(511))


@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_output_attentions_columns_map_to_logical_positions(aggregation, monkeypatch):
    rpc = RPC.replace(aggregation=aggregation)
    model = make_model("qwen2", attn="eager")
    ids, mask, _ = prompts(2, [5, 8], seed=10)
    lp, B = ids.shape[1], 2
    hkv, hq = model.config.num_key_value_heads, model.config.num_attention_heads
    group = hq // hkv
    queries = {0: [], 1: []}
    keys = {0: [], 1: []}
    real_eager = rpc_attention._eager_function

    def capturing_eager(module):
        fn = real_eager(module)

        def run(module, query, key, value, attention_mask, **kw):
            i = module.layer_idx
            queries[i].append(query.clone())
            keys[i].append(key[:, :, -query.shape[2] :].clone())  # this step's new tokens
            return fn(module, query, key, value, attention_mask, **kw)

        return run

    monkeypatch.setattr(rpc_attention, "_eager_function", capturing_eager)
    out = generate(model, ids, attention_mask=mask, rpc=rpc, max_new_tokens=NEW, output_attentions=True,
                   return_dict_in_generate=True, **greedy())
    cache = returned_cache(out)
    assert cache.stats().total_compressions == 2 * rpc.compressions_after(NEW - 1) > 2
    scale = model.model.layers[0].self_attn.scaling
    checked = 0
    for layer in range(2):
        logical_k = torch.cat(keys[layer], dim=2)  # [B, Hkv, seen, D] in token order
        for t in range(1, NEW):
            weights = out.attentions[t][layer]  # [B, Hq, 1, physical length at step t]
            pos = cache.logical_positions(layer, seen=lp + t)  # [B, Hkv, L]
            assert pos.shape == (B, hkv, weights.shape[-1])
            k = logical_k.gather(2, pos[..., None].expand(-1, -1, -1, logical_k.shape[-1]))
            k = k.repeat_interleave(group, dim=1)
            scores = (queries[layer][t] @ k.transpose(2, 3)) * scale
            in_prompt = pos.clamp(max=mask.shape[1] - 1).reshape(B, -1)
            valid = mask.bool().gather(1, in_prompt).reshape(pos.shape) | (pos >= mask.shape[1])
            scores = scores.masked_fill(~valid.repeat_interleave(group, dim=1)[:, :, None, :], float("-inf"))
            torch.testing.assert_close(weights, scores.softmax(-1), rtol=1e-4, atol=1e-6)
            checked += 1
        # the physical keys now are the logical keys at the reported positions (exact copies)
        pos = cache.logical_positions(layer)
        phys = cache.layers[layer].keys
        assert torch.equal(phys, logical_k.gather(2, pos[..., None].expand(-1, -1, -1, phys.shape[-1])))
    assert checked == 2 * (NEW - 1)
    # without keep_layouts, only steps since the last compression can be mapped
    out = generate(model, ids, attention_mask=mask, rpc=rpc, max_new_tokens=NEW, return_dict_in_generate=True,
                   **greedy())
    cache = returned_cache(out)
    assert cache.logical_positions(0, seen=lp + NEW - 1).shape[-1] == cache.get_physical_length(0)
    with pytest.raises(ValueError, match="keep_layouts"):
        cache.logical_positions(0, seen=lp + 1)
    cache.release()
