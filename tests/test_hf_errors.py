"""Misuse of the transformers integration fails early with messages that say what to change."""

import pytest
import torch
import transformers

from hf_testing import make_model, prompts
from rpc_py.config import RPCConfig
from rpc_py.hf import RPCCache, check_model_supported, compress, generate
from rpc_py.hf.registry import cache_kwarg as _cache_kwarg

RPC = RPCConfig(interval=16, window=4, ratio=4)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_model("qwen2")
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(num_beams=2), NotImplementedError, "beam search"),
        (dict(penalty_alpha=0.6, top_k=4), NotImplementedError, "contrastive"),
        (dict(prompt_lookup_num_tokens=3), NotImplementedError, "prompt-lookup"),
        (dict(use_cache=False), ValueError, "use_cache"),
        (dict(cache_implementation="static"), ValueError, "cache_implementation"),
        (dict(past_key_values=object()), ValueError, "own cache"),
    ],
)
def test_generate_rejects_unsupported_modes(model, kwargs, exc, words):
    ids, _, _ = prompts(1)
    with pytest.raises(exc, match=words):
        generate(model, ids, max_new_tokens=4, rpc=RPC, **kwargs)
    assert model.config._attn_implementation == "sdpa" and "generate" not in model.__dict__


def test_sliding_window_models_rejected():
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=64, sliding_window=64,
        )
    )
    with pytest.raises(NotImplementedError, match="sliding-window"):
        generate(mistral, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    qwen2 = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=64, use_sliding_window=True, sliding_window=8, max_window_layers=1,
        )
    )
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        check_model_supported(qwen2)


def test_encoder_decoder_rejected():
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32)
    )
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        with compress(t5, RPC):
            pass


def test_not_a_model_rejected():
    with pytest.raises(TypeError, match="model"):
        generate(torch.nn.Linear(2, 2), torch.ones(1, 2, dtype=torch.long))


def test_unsupported_attention_implementation(model):
    model.config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="flash_attention_2"):
            generate(model, prompts(1)[0], max_new_tokens=2)
    finally:
        model.config._attn_implementation_internal = "sdpa"


def test_contexts_nest_and_handles_expire(model):
    with compress(model, RPC) as handle:
        with compress(model, RPC.replace(interval=8)) as inner:
            assert model.config._attn_implementation == "rpc_sdpa"
        assert not inner.active and handle.active
        assert model.config._attn_implementation == "rpc_sdpa" and "generate" in model.__dict__
        generate(model, prompts(1)[0], max_new_tokens=2)  # a call inside a block is fine too
        assert model.config._attn_implementation == "rpc_sdpa"
    with pytest.raises(RuntimeError, match="exited"):
        handle.generate(prompts(1)[0], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="exited"):
        inner.generate(prompts(1)[0], max_new_tokens=2)
    assert model.config._attn_implementation == "sdpa" and "generate" not in model.__dict__


def test_cache_without_rpc_attention_is_detected(model):
    cache = RPCCache(model, RPC)
    with pytest.raises(RuntimeError, match="rpc_sdpa"):
        model.generate(prompts(1)[0], max_new_tokens=5, do_sample=False, **{_cache_kwarg(model): cache})


def test_cache_without_compression_needs_no_hook(model):
    ids = prompts(1)[0]
    cache = RPCCache(model, None)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, **{_cache_kwarg(model): cache})
    assert torch.equal(out, model.generate(ids, max_new_tokens=8, do_sample=False))
    assert cache.get_seq_length() == ids.shape[1] + 7


def test_multi_token_step_after_decoding_starts_a_new_turn(model):
    cache = RPCCache(model, RPC)
    key = _cache_kwarg(model)
    ids = prompts(1)[0]
    with compress(model, RPC), torch.no_grad():
        model(input_ids=ids, use_cache=True, **{key: cache})
        for _ in range(RPC.interval + RPC.window + 3):  # one compression per layer
            model(input_ids=torch.tensor([[5]]), use_cache=True, **{key: cache})
        assert cache.compressions(0) == 1 and cache.prompt_length == ids.shape[1]
        length = cache.get_physical_length()
        model(input_ids=torch.tensor([[5, 6]]), use_cache=True, **{key: cache})
        # everything held is now the uncompressed prefix; the compression count carries over
        assert cache.prompt_length == cache.get_physical_length() == length + 2
        assert cache.compressions(0) == 1 and cache.layers[0].kept == 0
        assert cache.get_seq_length() == ids.shape[1] + RPC.interval + RPC.window + 5


def test_compressed_cache_without_rpc_attention_fails_before_returning(model):
    """Once compressed, a layer's mask must be mapped onto its slots: running it with the plain
    attention function is caught at the next layer of the same forward."""
    cache = RPCCache(model, RPC)
    key = _cache_kwarg(model)
    with compress(model, RPC), torch.no_grad():
        model(input_ids=prompts(1)[0], use_cache=True, **{key: cache})
        for _ in range(RPC.interval + RPC.window):
            model(input_ids=torch.tensor([[5]]), use_cache=True, **{key: cache})
    assert cache.get_physical_length() < cache.get_seq_length()
    with torch.no_grad(), pytest.raises(RuntimeError, match="layer 0: a step ran without the RPC attention.*runs .sdpa."):
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **{key: cache})


def test_stale_note_from_an_aborted_forward_is_ignored(model):
    """A note left by a forward that failed between a layer's update and its attention must not be
    picked up by another cache's attention in the same thread."""
    from rpc_py.hf import cache as cache_module

    stale = RPCCache(model, RPC)
    key = _cache_kwarg(model)
    with compress(model, RPC), torch.no_grad():
        model(input_ids=prompts(1)[0], use_cache=True, **{key: stale})
        for _ in range(RPC.interval + RPC.window):
            model(input_ids=torch.tensor([[5]]), use_cache=True, **{key: stale})
    ids = prompts(2, [5, 7], seed=3)[0]
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    want_rpc = generate(model, ids, rpc=RPC, max_new_tokens=30, do_sample=False)
    cache_module._PENDING.layer = stale.layers[0]  # as if its forward had failed before attention
    model.set_attn_implementation("rpc_sdpa")
    try:
        got = model.generate(ids, max_new_tokens=8, do_sample=False)  # a DynamicCache through the wrapper
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(got, want)
    cache_module._PENDING.layer = stale.layers[0]
    assert torch.equal(generate(model, ids, rpc=RPC, max_new_tokens=30, do_sample=False), want_rpc)
    stale.release()


def test_logical_positions_and_layout_arguments(model):
    with pytest.raises(ValueError, match="max_capacity"):
        RPCCache(model, RPC, max_capacity=0)
    with pytest.raises(TypeError, match="keep_layouts"):
        RPCCache(model, RPC, keep_layouts=1)
    cache = RPCCache(model, RPC)
    with pytest.raises(ValueError, match="holds no tokens"):
        cache.logical_positions(0)
    key = _cache_kwarg(model)
    with compress(model, RPC), torch.no_grad():
        model(input_ids=prompts(1)[0], use_cache=True, **{key: cache})
    assert torch.equal(cache.logical_positions(1), torch.arange(7).expand(1, 2, 7))
    with pytest.raises(ValueError, match="seen"):
        cache.logical_positions(0, seen=8)
    with pytest.raises(IndexError):
        cache.logical_positions(5)
    cache.release()
    with pytest.raises(ValueError, match="closed"):
        cache.logical_positions(0)


def test_physical_mask_rejects_a_mask_it_cannot_map():
    from rpc_py.hf.layout import physical_mask

    positions = torch.tensor([[[0, 1, 4, 5]]])
    with pytest.raises(ValueError, match="4-D attention mask"):
        physical_mask(torch.ones(1, 1, 1, 4, dtype=torch.bool), positions, q=1, seen=6, q_heads=4)
    with pytest.raises(ValueError, match="4-D attention mask"):
        physical_mask(torch.ones(1, 6, dtype=torch.bool), positions, q=1, seen=6, q_heads=4)
    mask = torch.tensor([[[[True, False, True, True, True, True]]]])
    assert torch.equal(physical_mask(mask, positions, q=1, seen=6, q_heads=4),
                       torch.tensor([[[[True, False, True, True]]]]))


def test_released_cache_refuses_updates(model):
    cache = RPCCache(model, RPC)
    cache.release()
    cache.release()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    with pytest.raises(ValueError, match="closed"):
        cache.reset()


def test_cache_argument_validation(model):
    with pytest.raises(TypeError, match="config"):
        RPCCache(object())
    with pytest.raises(TypeError, match="rpc"):
        RPCCache(model, rpc={"interval": 4})
    with pytest.raises(ValueError, match="capacity"):
        RPCCache(model, RPC, capacity=-1)
    cache = RPCCache(model, RPC, padding=[0, 1])
    with pytest.raises(ValueError, match="padding"):
        cache.update(torch.zeros(3, 2, 4, 16), torch.zeros(3, 2, 4, 16), 0)
    cache = RPCCache(model, RPC)
    with pytest.raises(ValueError, match="float64"):
        cache.update(torch.zeros(1, 2, 4, 16, dtype=torch.float64), torch.zeros(1, 2, 4, 16, dtype=torch.float64), 0)
    with pytest.raises(TypeError, match="rpc"):
        generate(model, prompts(1)[0], rpc="fast")


def test_reordering_is_refused(model):
    cache = RPCCache(model, RPC)
    for call in (
        lambda: cache.reorder_cache(torch.tensor([0])),
        lambda: cache.batch_select_indices(torch.tensor([0])),
        lambda: cache.batch_repeat_interleave(2),
        lambda: cache.crop(-1),
    ):
        with pytest.raises(NotImplementedError):
            call()
    cache.crop(0)  # nothing to remove is fine


def test_padding_repeats_for_num_return_sequences(model):
    ids, mask, _ = prompts(2, [4, 6])
    torch.manual_seed(0)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=30, rpc=RPC, do_sample=True,
                   num_return_sequences=2, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values")
    assert cache.kvcache.padding == (2, 2, 0, 0)
    assert out.sequences.shape == (4, 36)
    cache.release()
