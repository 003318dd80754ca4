"""Selection policies end to end through rpc_py.generate: every compression's kept set equals what the
float64 oracle (rpc_py.policy_reference) selects from the same keys and queries; H2O's accumulated
attention equals the attention weights of a full-KV run; every policy uses exactly RPC's memory."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import rpc_py  # noqa: E402
from rpc_py import RPCConfig  # noqa: E402
from rpc_py import policy_reference as ref  # noqa: E402
from rpc_py.policies import H2O, RKV, SnapKV, TOVA, Random, as_policy  # noqa: E402
from rpc_py.reference import select_reference  # noqa: E402

from hf_testing import make_model, prompts  # noqa: E402

SCHEDULE = dict(interval=8, window=4, ratio=2)
NEW_TOKENS = 40


def _run(policy, *, batch_lengths=(7, 4, 6), arch="qwen2", attn="sdpa", seed=0, budget=None):
    model = make_model(arch, attn=attn, seed=seed, layers=2)
    ids, mask, singles = prompts(len(batch_lengths), list(batch_lengths))
    rpc = RPCConfig(**SCHEDULE, budget=budget, policy=policy)
    events = []
    cache = rpc_py.RPCCache(model, rpc, padding=(mask.cumsum(-1) == 0).sum(-1))
    cache.compression_hook = events.append
    out = rpc_py.generate(model, ids, attention_mask=mask, rpc=rpc, max_new_tokens=NEW_TOKENS, do_sample=False,
                          past_key_values=cache)
    padding = [int(p) for p in (mask.cumsum(-1) == 0).sum(-1)]
    return model, out, events, padding, cache, singles


def _per_layer_index(events):
    seen, out = {}, []
    for e in events:
        out.append(seen.get(e.layer, 0))
        seen[e.layer] = out[-1] + 1
    return out


def _expected_scores(policy, e, padding, compression, q_heads):
    keys = e.keys
    end = e.length_before - SCHEDULE["window"]
    B, Hkv = keys.shape[:2]
    if policy.name == "recent":
        return ref.recent_scores_reference(B, 1, end - e.start)
    if policy.name == "random":
        A = policy.rows(Hkv)
        return ref.random_scores_reference(B, A, end - e.start, seed=policy.seed, layer=e.layer, compression=compression)
    if policy.name == "tova":
        newest = max(range(len(e.query_positions)), key=lambda s: e.query_positions[s])
        return ref.tova_scores_reference(e.queries[:, :, newest : newest + 1], keys, e.start, end, padding=padding,
                                         aggregation=policy.aggregation)
    if policy.name == "snapkv":
        return ref.snapkv_scores_reference(e.queries, keys, e.start, end, query_positions=e.query_positions,
                                           padding=padding, aggregation=policy.aggregation, pooling=policy.pooling,
                                           kernel_size=policy.kernel_size)
    if policy.name == "rkv":
        return ref.rkv_scores_reference(e.queries, keys, e.start, end, padding=padding, mix_lambda=policy.mix_lambda,
                                        threshold=policy.threshold, aggregation=policy.aggregation,
                                        pooling=policy.pooling, kernel_size=policy.kernel_size)
    raise AssertionError(policy)


@pytest.mark.parametrize("policy", [
    "recent", "random", Random(seed=7, aggregation="group"), "tova", TOVA(aggregation="group"), "snapkv",
    SnapKV(pooling="max", kernel_size=3, aggregation="all"), "rkv", RKV(mix_lambda=0.5, aggregation="all"),
])
def test_kept_sets_equal_the_oracle(policy):
    policy = as_policy(policy)
    model, out, events, padding, cache, _ = _run(policy)
    assert len(events) == 2 * RPCConfig(**SCHEDULE).compressions_after(NEW_TOKENS - 1) > 0
    for e, n in zip(events, _per_layer_index(events)):
        assert e.policy == policy.name
        expected = _expected_scores(policy, e, padding, n, cache.num_q_heads)
        assert e.scores.shape == expected.shape
        torch.testing.assert_close(e.scores.double(), expected, rtol=2e-4, atol=2e-6)
        assert torch.equal(e.indices, select_reference(expected, e.keep))


@pytest.mark.parametrize("aggregation", ["all", "group"])
def test_h2o_accumulates_the_attention_the_model_computed(aggregation):
    """At the first compression nothing was evicted yet, so the accumulated attention must equal the
    sum of the attention weights an uncompressed eager run returns (output_attentions), over every
    decode step, summed over each KV head's query heads."""
    policy = H2O(aggregation=aggregation)
    model, out, events, padding, cache, _ = _run(policy, attn="eager")
    ids, mask, _ = prompts(3, [7, 4, 6])
    plain = make_model("qwen2", attn="eager", seed=0, layers=2)
    full = plain.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          return_dict_in_generate=True, output_attentions=True)
    first_step = SCHEDULE["interval"] + SCHEDULE["window"]
    assert torch.equal(full.sequences[:, : ids.shape[1] + first_step], out[:, : ids.shape[1] + first_step])
    lp = ids.shape[1]
    for e in events[:2]:  # the first compression of each layer
        assert e.generated == first_step
        acc = torch.zeros(3, 4, lp + first_step, dtype=torch.float64)
        for s in range(1, first_step + 1):  # decode steps (entry 0 is the prefill)
            a = full.attentions[s][e.layer][:, :, 0].double()  # [B, Hq, Lp + s]
            acc[:, :, : a.shape[-1]] += a
        cand = acc[:, :, e.start : e.length_before - SCHEDULE["window"]]
        G = cache.num_q_heads // e.keys.shape[1]
        per_kv = cand.reshape(3, -1, G, cand.shape[-1]).sum(2)
        expected = per_kv.sum(1, keepdim=True) / cache.num_q_heads if aggregation == "all" else per_kv / G
        torch.testing.assert_close(e.scores.double(), expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(e.indices, select_reference(expected, e.keep))


@pytest.mark.parametrize("policy", ["rpc", "recent", "random", "tova", "h2o", "snapkv", "rkv"])
def test_every_policy_uses_rpcs_memory(policy):
    _, out_rpc, ev_rpc, _, cache_rpc, _ = _run("rpc", budget=6)
    _, out, events, _, cache, _ = _run(policy, budget=6)
    assert [(e.layer, e.generated, e.keep, e.length_after) for e in events] == \
        [(e.layer, e.generated, e.keep, e.length_after) for e in ev_rpc]
    st = cache.stats()
    assert st.tokens_kept == cache_rpc.stats().tokens_kept
    assert f"selection policy {policy}" in st.summary()
    assert st.rpc.policy_name == policy


@pytest.mark.parametrize("policy", ["recent", "tova", "h2o", "snapkv", "rkv"])
def test_padded_batch_equals_sequences_alone(policy):
    model, out, _, _, _, singles = _run(policy)
    width = out.shape[1] - NEW_TOKENS
    for b, single in enumerate(singles):
        alone = rpc_py.generate(model, single, rpc=RPCConfig(**SCHEDULE, policy=policy), max_new_tokens=NEW_TOKENS,
                                do_sample=False)
        assert torch.equal(alone[0, single.shape[1]:], out[b, width:]), (policy, b)


def test_policy_configuration_errors():
    with pytest.raises(ValueError, match="policy"):
        RPCConfig(policy="lru")
    with pytest.raises(TypeError, match="policy"):
        RPCConfig(policy=3)
    with pytest.raises(ValueError, match="set it on the policy object"):
        RPCConfig(policy="snapkv", pooling="max")
    with pytest.raises(ValueError, match="aggregation"):
        TOVA(aggregation="head")
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKV(kernel_size=4)
    with pytest.raises(ValueError, match="mix_lambda"):
        RKV(mix_lambda=1.5)
    with pytest.raises(ValueError, match="seed"):
        Random(seed=-1)
    assert RPCConfig(policy="h2o").replace(interval=64).policy == H2O()
    assert "policy=SnapKV" in repr(RPCConfig(policy="snapkv"))
    assert RPCConfig(enabled=False).policy_name == "none"
