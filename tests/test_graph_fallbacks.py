"""Graph-path fallbacks: models whose decode step syncs with the host inside a CUDA-graph capture
(dynamic / longrope RoPE, mixture-of-experts routing) are detected and run on the eager path with a
GraphFallbackWarning instead of raising. Tiny config-built models on CPU exercise the detection.
"""

import warnings

import pytest
import torch
import transformers

from rpc_py.config import RPCConfig
from rpc_py.hf import generate as eager_generate
from rpc_py.hf.generate import graph_generate
from rpc_py.hf.graph import GraphFallbackWarning, capture_blockers

from hf_testing import prompts

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, initializer_range=0.2,
              tie_word_embeddings=False)
RPC = RPCConfig(interval=8, window=4, ratio=2, kernel_size=3)


def build(kind):
    torch.manual_seed(3)
    if kind == "plain":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
    elif kind == "dynamic":
        cfg = transformers.Qwen2Config(**COMMON, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                  "rope_theta": 10000.0})
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "longrope":
        cfg = transformers.Qwen2Config(**COMMON, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0, "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8, "original_max_position_embeddings": 256})
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**COMMON, num_local_experts=4,
                                                                           num_experts_per_tok=2))
    elif kind == "qwen2moe":
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32))
    else:
        raise ValueError(kind)
    model.eval().set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*original_max_position_embeddings.*")
        yield


@pytest.mark.parametrize("kind,needle", [("dynamic", "'dynamic'"), ("longrope", "'longrope'"),
                                         ("mixtral", "num_local_experts=4"), ("qwen2moe", "num_experts=4")])
def test_detects_host_syncs(kind, needle):
    reasons = capture_blockers(build(kind))
    assert len(reasons) == 1 and needle in reasons[0], reasons


def test_plain_model_has_no_blockers():
    assert capture_blockers(build("plain")) == []


@pytest.mark.parametrize("kind", ["dynamic", "mixtral"])
def test_graph_generate_falls_back_with_a_warning(kind):
    model = build(kind)
    ids, mask, _ = prompts(2, [6, 4])
    want = eager_generate(model, input_ids=ids, attention_mask=mask, rpc=RPC, max_new_tokens=24, do_sample=False)
    with pytest.warns(GraphFallbackWarning, match="RoPE type 'dynamic'|mixture-of-experts"):
        got = graph_generate(model, ids, mask, rpc=RPC, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dynamic", "qwen2moe"])
def test_static_decode_capture_falls_back_on_cuda(kind):
    from rpc_py.hf.graph import static_decode

    model = build(kind).cuda()
    ids, mask, _ = prompts(2, [6, 4])
    ids, mask = ids.cuda(), mask.cuda()
    want = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=24, capture=False, do_sample=False)
    with pytest.warns(GraphFallbackWarning, match="without a graph"):
        got = static_decode(model, ids, mask, rpc=RPC, max_new_tokens=24, capture=True, do_sample=False)
    assert torch.equal(got, want)
