"""The accuracy harness (rpc_py.accuracy): answer extraction, scoring, intervals, settings, and a run on a
tiny model end to end (records, schedule-derived memory, JSON output of the command line)."""

from __future__ import annotations

import json
import math

import pytest

from rpc_py.accuracy import extract_answer, is_correct, parse_setting, summarize, wilson_interval

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("text, expected", [
    ("so the result is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\text{yes}} answer: 3", "\\text{yes}"),  # boxed wins over answer:
    ("... ; answer : 7", "7"),
    ("Answer: 12.\nmore text", "12"),
    ("answer is: -5", "-5"),
    ("no final answer here", None),
    ("\\boxed{unbalanced", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("42", 42) and is_correct(" 42. ", "42") and is_correct("$42$", "42")
    assert is_correct("42.0", "42") and is_correct("1,000", "1000")
    assert not is_correct("41", "42") and not is_correct(None, "42") and not is_correct("x", "y")
    assert is_correct("\\text{yes}", "yes")


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(81, 263)  # Wilson's classic example: 0.3080 with [0.2553, 0.3662]
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_contains_the_proportion_exactly():
    # k == n must end at exactly 1.0 (not an ulp below: plots read that as a negative error bar)
    for n in (1, 7, 24, 100, 200, 263, 1000):
        for k in (0, 1, n // 2, n - 1, n):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0


def test_parse_setting():
    s = parse_setting("P=128,R=16,c=4")
    assert s.rpc.interval == 128 and s.rpc.window == 16 and s.rpc.ratio == 4 and s.rpc.budget is None
    assert parse_setting("full").rpc is None
    b = parse_setting("mine:interval=64,window=8,ratio=2,budget=32,policy=recent")
    assert b.name == "mine" and b.rpc.budget == 32 and b.rpc.policy_name == "recent"
    with pytest.raises(ValueError, match="unknown key"):
        parse_setting("Q=3")
    with pytest.raises(ValueError, match="key=value"):
        parse_setting("P128")
    with pytest.raises(ValueError):
        parse_setting("P=8,c=16")  # interval < ratio, refused by RPCConfig


def test_summarize_bootstrap_with_several_samples():
    records = [{"setting": "s", "problem": p, "sample": i, "correct": (p + i) % 2 == 0, "trace_tokens": 10,
                "finished": True, "compressions": 1, "peak_kv_fraction": 0.5} for p in range(20) for i in range(4)]
    (row,) = summarize(records, samples=4)
    assert row["pass@1"] == 0.5 and row["ci_method"] == "bootstrap over problems"
    lo, hi = row["ci95"]
    assert lo <= 0.5 <= hi and lo == hi  # every problem's mean is 0.5: no spread


def _tiny_trace_model(tmp_path):
    from rpc_py.tracemodel.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return model, tok


def test_evaluate_records_and_memory(tmp_path):
    from rpc_py.accuracy import Setting, evaluate
    from rpc_py.tracemodel import heldout_problems
    from rpc_py import RPCConfig

    model, tok = _tiny_trace_model(tmp_path)
    problems = heldout_problems(5, trace_tokens=120)
    rpc = RPCConfig(interval=16, window=4, ratio=4)
    res = evaluate(model, tok, problems, [Setting("full", None), Setting("rpc", rpc)], batch_size=2,
                   max_new_tokens=60, progress=False)
    recs = res["records"]
    assert len(recs) == 10 and {r["setting"] for r in recs} == {"full", "rpc"}
    for r in recs:
        assert 1 <= r["trace_tokens"] <= 60
        if r["setting"] == "full":
            assert r["peak_kv_fraction"] == 1.0 and r["compressions"] == 0
        else:
            assert r["peak_kv_tokens"] == rpc.peak_length(r["prompt_tokens"], r["trace_tokens"])
            assert r["compressions"] == rpc.compressions_after(r["trace_tokens"] - 1)
    # Until the first compression takes effect the compressed run generates what the full one does.
    full = {r["problem"]: r for r in recs if r["setting"] == "full"}
    for r in recs:
        if r["setting"] == "rpc" and full[r["problem"]]["trace_tokens"] <= rpc.interval + rpc.window:
            assert r["prediction"] == full[r["problem"]]["prediction"]
    assert [s["setting"] for s in res["summary"]] == ["full", "rpc"]
    assert res["meta"]["problems"] == 5 and res["batches"]


def test_evaluate_refuses_bad_arguments(tmp_path):
    from rpc_py.accuracy import evaluate

    model, tok = _tiny_trace_model(tmp_path)
    problems = [{"problem": "a = 1 ;", "answer": "1"}]
    with pytest.raises(ValueError, match="unique"):
        evaluate(model, tok, problems, ["full", "full"], progress=False)
    with pytest.raises(ValueError, match="do_sample"):
        evaluate(model, tok, problems, ["full"], samples=2, progress=False)


def test_command_line_writes_json(tmp_path, capsys):
    from rpc_py.accuracy import main

    _tiny_trace_model(tmp_path / "model")
    problems = tmp_path / "p.jsonl"
    problems.write_text("\n".join(json.dumps({"problem": f"a = {i} ; trace", "answer": str(i)}) for i in range(3)))
    out = tmp_path / "r.json"
    rc = main(["--model", str(tmp_path / "model"), "--problems", str(problems), "--setting", "full",
               "--setting", "P=8,R=2,c=2", "--max-new-tokens", "20", "--batch-size", "2", "--out", str(out),
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["records"]) == 6 and data["meta"]["command"].startswith("python -m rpc_py.accuracy")
    assert "pass@1" in capsys.readouterr().out
    assert all(0.0 <= s["pass@1"] <= 1.0 and not math.isnan(s["mean_peak_kv_fraction"]) for s in data["summary"])
