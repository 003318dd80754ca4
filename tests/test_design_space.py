"""The selection rules as points of one design space (rpc_py.policies.Attention): each setting is an
independent knob of the shared kernels, the named policies sit at their documented coordinates, and
the new knob (how the window's queries are weighted) matches the float64 oracle on CPU and CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import rpc_py  # noqa: E402
from rpc_py import RPCConfig, _C, ops  # noqa: E402
from rpc_py import policy_reference as ref  # noqa: E402
from rpc_py import torch_kernels as tk  # noqa: E402
from rpc_py.policies import RPC, TOVA, Attention, SnapKV  # noqa: E402

from hf_testing import make_model, prompts  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if rpc_py.cuda_available() and torch.cuda.is_available() else [])


def _case(B=2, Hq=6, Hkv=2, R=5, D=32, L=137, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, R, D, generator=g).to(dtype)
    k = (1.5 * torch.randn(B, Hkv, L, D, generator=g)).to(dtype)
    return q, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,gqa,reduce,agg", [("candidates", "mean_probs", "sum", "all"),
                                                  ("causal", "mean_probs", "sum", "group"),
                                                  ("past", "max_logits", "mean", "group"),
                                                  ("causal", "max_logits", "sum", "all")])
@pytest.mark.parametrize("weights", ["ones", "newest", "recency", "mixed"])
def test_query_weights_match_the_oracle(device, norm, gqa, reduce, agg, weights):
    q, k = _case(seed=len(norm) + len(weights))
    R, L = q.shape[2], k.shape[2]
    positions = list(range(L - R, L))
    w = {"ones": [1.0] * R, "newest": [0.0] * (R - 1) + [1.0], "recency": [0.5 ** ((R - 1 - i) / 2) for i in range(R)],
         "mixed": [0.3, -0.2, 2.0, 0.0, 1.25]}[weights]
    want = ref.window_attention_reference(q, k, 7, 130, query_positions=positions, padding=[0, 3], norm=norm, gqa=gqa,
                                          query_reduce=reduce, aggregation=agg, pooling="avg", kernel_size=3,
                                          query_weights=w)[0]
    wt = torch.tensor(w, dtype=torch.float32)
    kw = dict(query_positions=positions, padding=[0, 3], norm=norm, gqa=gqa, query_reduce=reduce, aggregation=agg,
              pooling="avg", kernel_size=3)
    got = ops.attn_scores(q.to(device), k.to(device), 7, 130, query_weights=wt.to(device), **kw)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-7)
    if device == "cpu":
        scalar = torch.as_tensor(_C._attn_scores_scalar(q, k, 7, 130, query_weights=w, **kw))
        torch.testing.assert_close(scalar.double(), want, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(tk.attn_scores(q, k, 7, 130, query_weights=wt, **kw).double(), want, rtol=2e-5,
                                   atol=1e-7)
    if weights == "ones":  # weight 1 everywhere is the unweighted sum exactly
        plain = ops.attn_scores(q.to(device), k.to(device), 7, 130, **kw)
        assert torch.equal(got, plain)


def test_query_weights_are_checked():
    q, k = _case()
    with pytest.raises(ValueError, match="query_weights: expected 5 entries"):
        _C.attn_scores(q, k, 7, 130, query_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="query_weights: expected finite"):
        _C.attn_scores(q, k, 7, 130, query_weights=[1.0, float("nan"), 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="query_weights: expected a contiguous float32 tensor"):
        _C.attn_scores(q, k, 7, 130, query_weights=torch.ones(5, dtype=torch.float16))
    with pytest.raises(ValueError, match="query_weights: unsupported dtype float64"):
        _C.attn_scores(q, k, 7, 130, query_weights=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="query_weights: expected a contiguous float32 tensor"):
        _C.attn_scores(q, k, 7, 130, query_weights=torch.ones(10)[::2])
    with pytest.raises(TypeError, match="query_weights"):
        _C.attn_scores(q, k, 7, 130, query_weights=["a"] * 5)


def test_attention_settings_are_validated():
    for bad in (dict(norm="softmax"), dict(aggregation="head"), dict(gqa="sum"), dict(weighting="oldest"),
                dict(half_life=0), dict(pooling="median"), dict(kernel_size=4)):
        with pytest.raises(ValueError, match="Attention\\."):
            Attention(**bad)
    assert RPCConfig(policy="attention").policy == Attention()


# ------------------------------------------------------------------ named policies are points of the space


def _events(policy, arch="qwen2", new=40):
    model = make_model(arch, layers=2)
    ids, mask, _ = prompts(3, [7, 4, 6])
    rpc = RPCConfig(interval=8, window=4, ratio=2, policy=policy)
    events = []
    cache = rpc_py.RPCCache(model, rpc, padding=(mask.cumsum(-1) == 0).sum(-1))
    cache.compression_hook = events.append
    out = rpc_py.generate(model, ids, attention_mask=mask, rpc=rpc, max_new_tokens=new, do_sample=False,
                          past_key_values=cache)
    cache.release()
    return out, events


@pytest.mark.parametrize("named,point", [
    (RPC(), Attention()),
    (RPC(aggregation="group", kernel_size=5), Attention(aggregation="group", kernel_size=5)),
    (SnapKV(), Attention(norm="causal", aggregation="group", pooling="avg", kernel_size=5)),
    (TOVA(), Attention(norm="causal", weighting="newest", kernel_size=1)),
    (TOVA(aggregation="group"), Attention(norm="causal", aggregation="group", weighting="newest", kernel_size=1)),
])
def test_named_policies_are_points_of_the_space(named, point):
    """The same kept sets, compression by compression, and the same tokens (scores to float rounding:
    RPC's fused kernel and the general one sum in a different order)."""
    out_a, ev_a = _events(named)
    out_b, ev_b = _events(point)
    assert len(ev_a) == len(ev_b) > 0
    for a, b in zip(ev_a, ev_b):
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-7)
        assert torch.equal(a.indices, b.indices)
    assert torch.equal(out_a, out_b)


def test_recency_weighting_changes_what_is_kept():
    """A knob that changes nothing would be no knob: weighting the newest queries more keeps other tokens."""
    _, uniform = _events(Attention(norm="causal", aggregation="group", kernel_size=5))
    _, recent = _events(Attention(norm="causal", aggregation="group", kernel_size=5, weighting="recency",
                                  half_life=0.5))
    assert any(not torch.equal(a.indices, b.indices) for a, b in zip(uniform, recent))
