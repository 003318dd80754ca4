"""Tensor parallelism (issue 13): rpc_py on a decoder that transformers shards over 2 gloo processes
(``from_pretrained(..., tp_plan="auto")``) keeps, on every rank, exactly the positions of the
single-process run and generates its tokens.

One module-scoped launch (tests/tp_testing.py) runs every scenario in 2 spawned processes while this
process computes the single-process references; then each test compares. Rank r holds KV heads
``[2r, 2r + 2)`` of 4 (query heads ``[4r, 4r + 4)`` of 8), so per-KV-head results are compared with that
slice of the single-process ones. The first tests need no processes: the head reduction of every
policy on one machine, with the all-reduce played by hand, against the unsharded scores.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")

import rpc_py  # noqa: E402
from rpc_py import RPCConfig  # noqa: E402
from rpc_py import policy_reference as pref  # noqa: E402
from rpc_py.hf.parallel import TensorParallel, TensorParallelError, collective_failure, find_tensor_parallel  # noqa: E402
from rpc_py.policies import H2O, RKV, RPC, TOVA, Random, ScoreContext, SnapKV, pool_scores  # noqa: E402
from rpc_py.reference import _pool, score_reference, select_reference  # noqa: E402

import tp_testing  # noqa: E402
from hf_testing import make_model  # noqa: E402

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# ------------------------------------------------------------------ one process, the reduction by hand


class _Ring:
    """Stands in for the KVCache inside a ScoreContext: the query ring and H2O's accumulator."""

    def __init__(self, ring, acc=None):
        self.ring, self.acc = ring, acc

    def queries(self, layer):
        return self.ring

    def num_queries(self, layer):
        return self.ring.shape[2]

    def ring_position(self, layer):
        return 0

    def accumulator(self, layer):
        return self.acc


@dataclasses.dataclass(frozen=True)
class _HandReduced(TensorParallel):
    """A rank whose all-reduce is played by hand: pass 1 records each rank's partial sum and returns it
    unchanged; pass 2 returns the sum of the recorded partials (rank order, float32)."""

    exchange: dict = dataclasses.field(default_factory=dict, compare=False)

    def all_reduce_sum(self, tensor, what):
        partials = self.exchange.setdefault("partials", {})
        if self.exchange.get("pass", 1) == 1:
            assert tensor.dtype == torch.float32 and tensor.shape[1] == 1, (tensor.dtype, tensor.shape)
            partials[self.rank] = tensor.clone()
            return tensor
        total = partials[0].clone()
        for r in range(1, self.size):
            total += partials[r]
        return total


B, HQ, HKV, D, L, START, WINDOW = 2, 14, 2, 16, 146, 5, 4  # GQA 7; N = 137 candidates
PADDING = [0, 3]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, HKV, L, D, generator=g)
    ring = torch.randn(B, HQ, WINDOW, D, generator=g)
    acc = torch.rand(B, HKV, L, generator=g) * 3
    return keys, ring, acc


def _context(keys, ring, acc, tp=None, rank=0):
    heads_q, heads_kv = (HQ, HKV) if tp is None else (HQ // tp.size, HKV // tp.size)
    q = ring[:, rank * heads_q:(rank + 1) * heads_q]
    k = keys[:, rank * heads_kv:(rank + 1) * heads_kv].contiguous()
    a = acc[:, rank * heads_kv:(rank + 1) * heads_kv].contiguous()
    return ScoreContext(kvcache=_Ring(q.contiguous(), a), layer=1, compression=2, start=START, end=L - WINDOW,
                        length=L, window=WINDOW, q_heads=heads_q, kv_heads=heads_kv, batch=B, padding=PADDING,
                        keys=k, tp=tp)


def _score(policy, ctx, rpc_settings):
    if isinstance(policy, RPC):
        return ctx.rpc_scores(*rpc_settings)
    return policy.scores(ctx)


POLICIES_ALL = [
    (RPC(), ("all", "avg", 7)), (RPC(), ("all", "max", 5)), (TOVA(), None),
    (SnapKV(aggregation="all"), None), (SnapKV(pooling="max", kernel_size=3, aggregation="all"), None),
    (H2O(), None), (RKV(aggregation="all"), None), (Random(seed=5), None),
]
POLICIES_GROUP = [(RPC(), ("group", "avg", 7)), (SnapKV(), None), (Random(seed=5, aggregation="group"), None),
                  (H2O(aggregation="group"), None), (RKV(), None)]


@pytest.mark.parametrize("policy,rpc_settings", POLICIES_ALL + POLICIES_GROUP,
                         ids=lambda p: getattr(p, "name", str(p)))
@pytest.mark.parametrize("size", [2])
def test_sharded_scores_equal_the_unsharded_ones(policy, rpc_settings, size):
    """Every rank's scores after the (hand-played) all-reduce equal the single-process scores of its
    heads, and select the same positions; per-KV-head scores need no all-reduce at all."""
    keys, ring, acc = _inputs()
    full = _score(policy, _context(keys, ring, acc), rpc_settings)
    exchange = {}
    ranks = [_HandReduced(group=None, size=size, rank=r, q_heads=HQ, kv_heads=HKV, exchange=exchange)
             for r in range(size)]
    for r in range(size):
        _score(policy, _context(keys, ring, acc, ranks[r], r), rpc_settings)
    exchange["pass"] = 2
    per_kv = full.shape[1] > 1
    keep = 40
    for r in range(size):
        got = _score(policy, _context(keys, ring, acc, ranks[r], r), rpc_settings)
        if per_kv:
            expected = full[:, r * (HKV // size):(r + 1) * (HKV // size)]
            assert "partials" not in exchange, f"{policy.name} per KV head must not communicate"
            assert torch.equal(got, expected)
        else:
            expected = full
            torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-9)
        assert torch.equal(select_reference(got.double(), keep), select_reference(expected.double(), keep))


def test_sharded_rpc_scores_equal_the_float64_oracle():
    keys, ring, acc = _inputs(seed=3)
    exchange = {}
    ranks = [_HandReduced(group=None, size=2, rank=r, q_heads=HQ, kv_heads=HKV, exchange=exchange) for r in range(2)]
    for r in range(2):
        _context(keys, ring, acc, ranks[r], r).rpc_scores("all", "avg", 7)
    exchange["pass"] = 2
    expected, _ = score_reference(ring, keys, START, L - WINDOW, "all", "avg", 7)
    for r in range(2):
        got = _context(keys, ring, acc, ranks[r], r).rpc_scores("all", "avg", 7)
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-8)
        assert torch.equal(select_reference(got.double(), 60), select_reference(expected, 60))


def test_random_rows_use_the_model_wide_kv_head():
    """With one KV head per rank, rank r's per-KV-head random row is row r of the single-process draw."""
    keys, ring, acc = _inputs()
    policy = Random(seed=11, aggregation="group")
    for r in range(2):
        tp = _HandReduced(group=None, size=2, rank=r, q_heads=HQ, kv_heads=HKV)
        got = policy.scores(_context(keys, ring, acc, tp, r))
        expected = pref.random_scores_reference(B, HKV, L - WINDOW - START, seed=11, layer=1, compression=2)
        assert torch.equal(got.double(), expected[:, r:r + 1])


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("n", [1, 2, 137])
def test_pool_scores_is_rpcs_pooling(pooling, kernel_size, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=g)
    if n > 2:
        x[1, 0, 5] = float("nan")
    got = pool_scores(x, pooling, kernel_size)
    expected = _pool(x.double(), pooling, kernel_size) if kernel_size > 1 else x.double()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected.float().double(), rtol=0, atol=0, equal_nan=True)


def test_layout_validation():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        TensorParallel(group=None, size=3, rank=0, q_heads=8, kv_heads=4)
    with pytest.raises(ValueError, match="KV heads cannot be split evenly"):
        TensorParallel(group=None, size=4, rank=0, q_heads=8, kv_heads=2)
    tp = TensorParallel(group=None, size=2, rank=1, q_heads=28, kv_heads=4)
    assert (tp.local_q_heads, tp.local_kv_heads, tp.kv_head_offset) == (14, 2, 2)


def test_unsharded_models_have_no_tensor_parallel_layout():
    model = make_model("llama")
    assert find_tensor_parallel(model) is None
    assert rpc_py.RPCCache(model, RPCConfig()).tensor_parallel is None


def test_a_sharded_looking_cache_without_a_group_is_refused():
    """Keys with fewer KV heads than the config says (a model sharded by other means): a clear error
    at the first update, not a shape error deep inside the query ring later."""
    model = make_model("llama")  # 4 query heads, 2 KV heads
    cache = rpc_py.RPCCache(model, RPCConfig())
    k = torch.randn(1, 1, 5, 16)
    with pytest.raises(ValueError, match="looks sharded.*tp_group"):
        cache.update(k, k.clone(), 0)


def test_collective_failure_is_told_from_other_errors():
    assert not collective_failure(ValueError("x"))
    assert not collective_failure(RuntimeError("my own bug"))
    assert not collective_failure(TensorParallelError("already explained"))
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None:
        assert collective_failure(dist_error("peer closed"))


# ------------------------------------------------------------------ two processes


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("tensor_parallel")
    paths = {}
    for arch in ("llama", "qwen2"):
        paths[arch] = str(root / arch)
        tp_testing.save_tiny_model(arch, paths[arch])
    collect = tp_testing.launch(paths, str(root / "rendezvous"), world=2, group_timeout_s=GROUP_TIMEOUT_S)
    single = {}
    try:
        for arch, path in paths.items():
            model = tp_testing.load(path, tp=False)
            ids, mask = tp_testing.prompts()
            plain = model.generate(ids, attention_mask=mask, max_new_tokens=tp_testing.NEW_TOKENS, do_sample=False)
            single[(arch, "plain")] = plain[:, ids.shape[1]:].tolist()
            for name, (archs, _) in tp_testing.SCENARIOS.items():
                if arch in archs:
                    single[(arch, name)] = tp_testing.run_scenario(model, name)
            if arch == "llama":
                single[(arch, "compress_block")] = tp_testing.run_compress_block(model)
    finally:
        results = collect(timeout_s=300)
    return single, results


def _result(results, rank, key):
    crash = results.get((rank, ("worker", "crash")))
    if crash is not None:
        pytest.fail(f"rank {rank} crashed: {crash['message']}")
    if (rank, key) not in results:
        pytest.fail(f"rank {rank} reported nothing for {key} (ranks that finished: {results['finished']})")
    return results[(rank, key)]


def _heads_of_rank(nested, rank, size=2):
    """[B][A][...] -> this rank's rows when A counts KV heads (A > 1); unchanged when A == 1."""
    out = []
    for per_seq in nested:
        a = len(per_seq)
        out.append(per_seq if a == 1 else per_seq[rank * a // size:(rank + 1) * a // size])
    return out


GROUP_TIMEOUT_S = 20.0
CASES = [(arch, name) for name, (archs, _) in tp_testing.SCENARIOS.items() for arch in archs]


@needs_gloo
@pytest.mark.parametrize("arch,name", CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_sharded_generation_equals_single_process(two_ranks, arch, name):
    single, results = two_ranks
    ref = single[(arch, name)]
    if name == "none":
        assert ref["tokens"] == single[(arch, "plain")]  # rpc=None is plain generate, in one process
        assert ref["events"] == []
    else:
        per_layer = RPCConfig(**tp_testing.SCHEDULE).compressions_after(tp_testing.NEW_TOKENS - 1)
        assert per_layer >= 3 and len(ref["events"]) == 2 * per_layer
    for rank in range(2):
        got = _result(results, rank, (arch, name))
        assert (got["tp_size"], got["tp_rank"], got["q_heads"]) == (2, rank, 4)
        assert got["tokens"] == ref["tokens"], f"rank {rank}: tokens differ from the single-process run"
        assert [e[:3] for e in got["events"]] == [e[:3] for e in ref["events"]]
        for n, (mine, theirs) in enumerate(zip(got["events"], ref["events"])):
            assert mine[3] == _heads_of_rank(theirs[3], rank), f"rank {rank}, compression {n}: kept sets differ"
        for layer, (mine, theirs) in enumerate(zip(got["positions"], ref["positions"])):
            assert mine == _heads_of_rank(theirs, rank), f"rank {rank}, layer {layer}: slot positions differ"
        # Every rank holds half of every head-proportional block (K, V, query ring, accumulator).
        assert 2 * got["kv_bytes"] == got["total_kv_bytes"] == ref["kv_bytes"]
        assert 2 * got["live_kv_bytes"] == got["total_live_kv_bytes"] == ref["live_kv_bytes"]
        assert f"KV memory of rank {rank} (1 of 2)" in got["summary"] and "KV memory of all 2 ranks" in got["summary"]


@needs_gloo
def test_compress_context_and_statistics(two_ranks):
    single, results = two_ranks
    ref = single[("llama", "compress_block")]
    assert ref["compressions"][0] >= 3
    for rank in range(2):
        got = _result(results, rank, ("llama", "compress_block"))
        assert got["tokens"] == ref["tokens"]
        assert got["compressions"] == ref["compressions"]
        assert 2 * got["peak_kv_bytes"] == got["total_peak_kv_bytes"] == ref["peak_kv_bytes"]


@needs_gloo
def test_graph_path_falls_back_with_a_warning(two_ranks):
    single, results = two_ranks
    for rank in range(2):
        got = _result(results, rank, ("llama", "graph_fallback"))
        assert any(w.startswith("GraphFallbackWarning") and "tensor parallel" in w for w in got["warnings"]), \
            got["warnings"]
        assert got["tokens"] == single[("llama", "rpc_all")]["tokens"]
        assert got["static_tokens"] == single[("llama", "rpc_all")]["tokens"]  # the static step, uncaptured


@needs_gloo
def test_a_cache_from_a_bare_config_with_an_explicit_group(two_ranks):
    single, results = two_ranks
    ref = single[("llama", "rpc_all")]
    for rank in range(2):
        got = _result(results, rank, ("llama", "explicit_group"))
        assert got["tokens"] == ref["tokens"]
        assert got["positions"] == [_heads_of_rank(p, rank) for p in ref["positions"]]


@needs_gloo
def test_ranks_with_different_settings_fail_clearly_on_every_rank(two_ranks):
    _, results = two_ranks
    for rank in range(2):
        got = _result(results, rank, ("llama", "mismatch"))
        assert got["error"] == "ValueError", got
        assert "do not run the same generation" in got["message"] and "the RPC settings" in got["message"]
        assert f"interval={8 if rank == 0 else 16}" in got["message"]


@needs_gloo
def test_a_failing_rank_is_an_error_on_every_rank(two_ranks):
    """Rank 1 raises mid-generation (after the first compressions) and then stays alive without joining
    any collective; rank 0, blocked in a collective, gets a TensorParallelError naming it when the
    group's timeout expires instead of hanging; both processes finish."""
    _, results = two_ranks
    failed = _result(results, 1, ("any", "failure"))
    assert failed["error"] == "RuntimeError" and "deliberate failure" in failed["message"]
    other = _result(results, 0, ("any", "failure"))
    assert other["error"] == "TensorParallelError", other
    assert "rank 0 of 2" in other["message"] and "another rank failed" in other["message"]
    assert other["seconds"] < 3 * GROUP_TIMEOUT_S
    assert results["finished"] == [0, 1]
