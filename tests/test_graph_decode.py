"""The static decode step (rpc_py.hf.graph): same tokens as the eager rpc_py path.

On CPU the static step runs without capture (``static_decode(capture=False)``): device-length-driven
appends, the decode attention kernel, ring writes, compression between steps and sampling are the
code that a CUDA graph replays. CUDA cases (capture and replay) skip without a device.
"""

import warnings

import pytest
import torch

import rpc_py
from rpc_py.config import RPCConfig
from rpc_py.hf import generate as eager_generate
from rpc_py.hf.generate import graph_generate
from rpc_py.hf.graph import GraphFallbackWarning, static_decode

from hf_testing import make_model, prompts

RPC = RPCConfig(interval=8, window=4, ratio=2, kernel_size=3)


def eager(model, ids, mask, rpc, n, **kw):
    out = eager_generate(model, input_ids=ids, attention_mask=mask, rpc=rpc, max_new_tokens=n, **kw)
    return out if isinstance(out, torch.Tensor) else out.sequences


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("rpc", [RPC, None], ids=["rpc", "no-rpc"])
def test_greedy_static_equals_eager(arch, rpc):
    model = make_model(arch)
    ids, mask, _ = prompts(3, [7, 4, 6])
    want = eager(model, ids, mask, rpc, 40, do_sample=False)
    got = static_decode(model, ids, mask, rpc=rpc, max_new_tokens=40, do_sample=False)
    assert torch.equal(got, want)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_static_compresses_like_eager():
    """Several compressions happen within 40 tokens (P=8, R=4): the kept tokens decide later steps."""
    model = make_model("qwen2", layers=3)
    ids, mask, _ = prompts(2, [5, 7], seed=3)
    want = eager(model, ids, mask, RPC, 45)
    got = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=45)
    assert rpc_py.hf.last_cache() is not None
    assert torch.equal(got, want)


def test_last_cache_reports_the_static_decode_call():
    """rpc_py.last_cache() after a static (CUDA-graph) decode is that call's cache, not the one of the
    eager call before it."""
    model = make_model("qwen2", layers=2)
    ids, mask, _ = prompts(2, [5, 7], seed=3)
    eager(model, ids, mask, RPCConfig(interval=16, window=4, ratio=4), 10)
    before = rpc_py.last_cache()
    static_decode(model, ids, mask, rpc=RPC, max_new_tokens=33)
    cache = rpc_py.last_cache()
    assert cache is not None and cache is not before
    assert cache.rpc == RPC and cache.closed  # released by the call, statistics kept
    stats = cache.stats()
    assert stats.generated == 32 and stats.compressions == [RPC.compressions_after(32)] * 2


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (20, 0.9, 0.7)])
def test_seeded_sampling_equals_eager(top_k, top_p, temperature):
    model = make_model("qwen2")
    ids, mask, _ = prompts(2, [6, 3], seed=5)
    kw = dict(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature)
    torch.manual_seed(1234)
    want = eager(model, ids, mask, RPC, 30, **kw)
    torch.manual_seed(1234)
    got = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=30, **kw)
    assert torch.equal(got, want)
    # An explicit generator gives reproducible runs independent of the global RNG.
    a = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=20, generator=torch.Generator().manual_seed(7), **kw)
    torch.manual_seed(99)
    b = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=20, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("all_finish", [False, True])
def test_eos_stopping_matches_eager(all_finish):
    model = make_model("qwen2")
    ids, mask, _ = prompts(3, [7, 5, 6], seed=2)
    Lp = ids.shape[1]
    free = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=30)
    # EOS tokens taken from the free run: one sequence stops early, or every sequence does (then
    # generate ends the loop early and the output is shorter than max_new_tokens).
    eos = sorted({int(free[b, Lp + 5 + b]) for b in range(3)}) if all_finish else int(free[0, Lp + 5])
    want = eager(model, ids, mask, RPC, 30, eos_token_id=eos, pad_token_id=0)
    got = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=30, eos_token_id=eos, pad_token_id=0,
                        sync_every=4)
    assert torch.equal(got, want)
    assert (got.shape[1] < Lp + 30) == all_finish


def test_unsupported_options_are_refused():
    model = make_model("qwen2")
    ids, mask, _ = prompts(1)
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        static_decode(model, ids, mask, max_new_tokens=4, repetition_penalty=1.3)
    with pytest.raises(TypeError, match="unexpected generation arguments"):
        static_decode(model, ids, mask, max_new_tokens=4, temprature=0.5)
    with pytest.raises(ValueError, match="capture=True needs a CUDA model"):
        static_decode(model, ids, mask, max_new_tokens=4, capture=True)


def test_graph_generate_falls_back_on_cpu_with_warning():
    model = make_model("qwen2")
    ids, mask, _ = prompts(2, [5, 7])
    with pytest.warns(GraphFallbackWarning, match="CUDA graphs need a CUDA device"):
        got = graph_generate(model, ids, mask, rpc=RPC, max_new_tokens=12)
    assert torch.equal(got, eager(model, ids, mask, RPC, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph_generate(model, ids, mask, rpc=RPC, max_new_tokens=3, cuda_graph=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_greedy_equals_eager(dtype):
    torch.manual_seed(0)
    import transformers

    config = transformers.Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      initializer_range=0.2, max_position_embeddings=1024)
    model = transformers.Qwen2ForCausalLM(config).eval().to("cuda", dtype)  # head_dim 64
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids, mask, _ = prompts(3, [7, 4, 6])
    ids, mask = ids.cuda(), mask.cuda()
    n = 64 if dtype == torch.bfloat16 else 100
    want = eager(model, ids, mask, RPC, n)
    got = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=n, capture=True)
    assert torch.equal(got, want)


def test_generate_cuda_graph_flag_falls_back_on_cpu_with_warning():
    """rpc_py.generate(cuda_graph=True) on a CPU model warns and returns the eager path's tokens."""
    import warnings

    from rpc_py.hf.graph import GraphFallbackWarning

    torch.manual_seed(0)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 7))
    rpc = rpc_py.RPCConfig(interval=8, window=2, ratio=4)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = rpc_py.generate(model, ids, rpc=rpc, cuda_graph=True, **kw)
    assert any(issubclass(w.category, GraphFallbackWarning) for w in caught)
    ref = rpc_py.generate(model, ids, rpc=rpc, **kw)
    assert torch.equal(out, ref)
