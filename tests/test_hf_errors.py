"""Misuse of the transformers integration fails early with messages that say what to change."""

import pytest
import torch
import transformers

from hf_testing import make_model, prompts
from rpc_py.config import RPCConfig
from rpc_py.hf import RPCCache, check_model_supported, compress, generate
from rpc_py.hf.generate import _cache_kwarg

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


def test_contexts_do_not_nest_and_handles_expire(model):
    with compress(model, RPC) as handle:
        with pytest.raises(RuntimeError, match="nest"):
            with compress(model, RPC):
                pass
        with pytest.raises(RuntimeError, match="nest"):
            generate(model, prompts(1)[0], max_new_tokens=2)
        assert model.config._attn_implementation == "rpc_sdpa"
    with pytest.raises(RuntimeError, match="exited"):
        handle.generate(prompts(1)[0], max_new_tokens=2)
    assert model.config._attn_implementation == "sdpa"


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


def test_multi_token_step_after_decoding_refused(model):
    cache = RPCCache(model, RPC)
    key = _cache_kwarg(model)
    with compress(model, RPC), torch.no_grad():
        model(input_ids=prompts(1)[0], use_cache=True, **{key: cache})
        model(input_ids=torch.tensor([[5]]), use_cache=True, **{key: cache})
        with pytest.raises(NotImplementedError, match="one token per step"):
            model(input_ids=torch.tensor([[5, 6]]), use_cache=True, **{key: cache})


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
