"""RPC inside vLLM (CPU build, float32, greedy): every request's tokens and kept positions equal
``rpc_py.generate`` on that prompt alone with the same settings, while requests of different lengths
arrive at different times and share the engine (continuous batching, chunked prefill); blocks return
to the pool; a request without compression equals plain vLLM.

One engine serves every test here: the engine's RPC settings are the default and each request may
bring its own policy (``SamplingParams.extra_args``), so rpc, recent, snapkv and h2o run side by side.
Tests that need an engine of their own are in test_vllm_engines.py (vLLM allows one in-process engine
at a time: closing one tears down the process's model-parallel groups).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM tests run in their own environment)")

from rpc_py import RPCConfig

from vllm_testing import (DEFAULT, close, NEW, assert_same_positions, kept, make_engine, params, prompts, reference,
                          run_staggered, save_tiny, scheduler, internal_id)

POLICIES = {"rpc": DEFAULT, "recent": DEFAULT.replace(policy="recent"), "snapkv": DEFAULT.replace(policy="snapkv"),
            "h2o": DEFAULT.replace(policy="h2o"), "rpc-group": DEFAULT.replace(aggregation="group", kernel_size=5)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("llama")), "llama", seed=0)


@pytest.fixture(scope="module")
def engine(llama):
    llm = make_engine(llama)
    yield llm
    close(llm)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_staggered_requests_equal_rpc_py_generate_alone(engine, llama, policy):
    rpc = POLICIES[policy]
    ps = prompts([5, 37, 90, 12], seed=len(policy))
    jobs = [(f"{policy}-{i}", p, params(rpc)) for i, p in enumerate(ps)]
    got = run_staggered(engine, jobs)
    for rid, p, _ in jobs:
        want, positions = reference(llama, p, rpc, NEW)
        assert got[rid] == want, f"{rid}: tokens differ from rpc_py.generate"
        assert_same_positions(kept(engine, rid), positions, rid)


def test_compressed_requests_return_blocks_to_the_pool(engine):
    sched = scheduler(engine)
    pool = sched.kv_cache_manager.block_pool
    free0, returned0 = pool.get_num_free_blocks(), sched.rpc_blocks_returned
    rpc = RPCConfig(interval=32, window=8, ratio=8)
    engine_step = engine.llm_engine
    engine_step.add_request("blocks-0", {"prompt_token_ids": prompts([40], seed=3)[0]}, params(rpc, n=300))
    peak_held, rid = 0, None
    while engine_step.has_unfinished_requests():
        engine_step.step()
        rid = rid or internal_id(sched, "blocks-0")
        blocks = sched.rpc_manager.req_to_blocks.get(rid)
        if blocks is not None:
            peak_held = max(peak_held, len(blocks))
    assert sched.rpc_blocks_returned > returned0
    # without RPC the request would hold ceil(340 / 32) = 11 blocks at the end; under RPC its peak is the schedule's
    assert peak_held == -(-rpc.peak_length(40, 300) // 32) < -(-(40 + 299) // 32)
    assert pool.get_num_free_blocks() == free0  # finished: every block back, none leaked


def test_aborted_request_frees_everything_and_leaves_others_exact(engine, llama):
    sched = scheduler(engine)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    core = engine.llm_engine
    ps = prompts([30, 60], seed=11)
    for i, p in enumerate(ps):
        core.add_request(f"abort-{i}", {"prompt_token_ids": p}, params(DEFAULT, n=NEW))
    outputs, step = {}, 0
    while core.has_unfinished_requests():
        if step == 40:  # past several compressions of both requests
            core.abort_request(["abort-0"])
        for out in core.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    want, _ = reference(llama, ps[1], DEFAULT, NEW)
    assert outputs["abort-1"] == want
    assert "abort-0" not in outputs or len(outputs["abort-0"]) < NEW
    assert pool.get_num_free_blocks() == free0
    # the worker hears of ended requests at the next scheduled step: after one more request, no state left
    engine.generate([{"prompt_token_ids": [7, 8, 9]}], params(DEFAULT, n=2))
    live = engine.collective_rpc("rpc_py_requests")[0]["live"]
    assert not [r for r in live if r.startswith("abort-")], live


def test_prefix_caching_shares_prompt_blocks_only(engine, llama):
    """Two requests with the same 96-token prompt prefix: the second reuses the first's full prompt
    blocks (prefix caching), never a block RPC rewrote, and both stay exact."""
    sched = scheduler(engine)
    manager = sched.kv_cache_manager
    if not manager.enable_caching:
        pytest.skip("prefix caching is off in this vLLM build's defaults")
    hits = {}
    lookup = manager.get_computed_blocks

    def spy(request):
        blocks, hit, *rest = lookup(request)
        hits[request.request_id.rsplit("-", 1)[0]] = hit
        return (blocks, hit, *rest)

    manager.get_computed_blocks = spy
    try:
        base = prompts([96], seed=21)[0]
        ps = [base + prompts([10], seed=22)[0], base + prompts([20], seed=23)[0]]
        first = run_staggered(engine, [("prefix-0", ps[0], params(DEFAULT))])
        second = run_staggered(engine, [("prefix-1", ps[1], params(DEFAULT))])
    finally:
        manager.get_computed_blocks = lookup
    assert hits["prefix-1"] == 96  # three full blocks of the shared prompt prefix, nothing RPC rewrote
    for rid, p, got in (("prefix-0", ps[0], first), ("prefix-1", ps[1], second)):
        want, _ = reference(llama, p, DEFAULT, NEW)
        assert got[rid] == want


def test_bad_settings_are_refused_before_the_engine_starts(llama):
    from vllm import LLM

    with pytest.raises(ValueError, match="interval"):
        LLM(model=llama, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=512,
            block_size=32, additional_config={"rpc_py": {"interval": 0, "window": 8, "ratio": 2}})


def test_parallel_sampling_runs_each_sample_as_its_own_rpc_request(engine, llama):
    """``n > 1`` (vLLM refuses it with greedy sampling, so seeded sampling here): vLLM runs every sample
    as a child request with its own blocks, so each gets its own RPC state and schedule; every sample's
    layout is the schedule's length and every block returns."""
    from vllm import SamplingParams

    sched = scheduler(engine)
    free0 = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    p = prompts([33], seed=31)[0]
    before = set(engine.collective_rpc("rpc_py_requests")[0]["finished"])
    sampled = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=NEW, min_tokens=NEW, ignore_eos=True)
    out = engine.generate([{"prompt_token_ids": p}], sampled)[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == NEW for o in out.outputs)
    engine.generate([{"prompt_token_ids": [7, 8, 9]}], params(DEFAULT, n=2))  # the worker hears they ended
    finished = [r for r in engine.collective_rpc("rpc_py_requests")[0]["finished"] if r not in before]
    children = [r for r in finished if r.split("_", 1)[-1].rsplit("-", 1)[0] == out.request_id]  # "{i}_{parent}-..."
    assert len(children) == 3, finished
    for child in children:
        assert kept(engine, child)["length"] == DEFAULT.physical_length(len(p), NEW - 1)
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == free0


def test_bad_request_settings_are_refused_at_admission_and_the_engine_keeps_serving(engine, llama):
    from vllm import SamplingParams

    bad = SamplingParams(max_tokens=4, extra_args={"rpc_py": {"interval": -1, "window": 8, "ratio": 2}})
    with pytest.raises(ValueError, match="interval"):
        engine.generate([{"prompt_token_ids": [5, 6, 7]}], bad)
    unknown = SamplingParams(max_tokens=4, extra_args={"rpc_py": {"windw": 8}})
    with pytest.raises(ValueError, match="unknown keys"):
        engine.generate([{"prompt_token_ids": [5, 6, 7]}], unknown)
    p = prompts([20], seed=41)[0]
    out = engine.generate([{"prompt_token_ids": p}], params(DEFAULT))[0]
    assert list(out.outputs[0].token_ids) == reference(llama, p, DEFAULT, NEW)[0]
