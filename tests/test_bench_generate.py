"""benchmarks/bench_generate.py on a tiny config-built model: the JSON it writes, and that the three
configurations generate the same number of tokens on the schedule RPCConfig predicts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rpc_py.api import RPCConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_generate.py"
BATCH, PROMPT, OUTPUT = 2, 12, 30
RPC = RPCConfig(interval=8, window=4, ratio=2)
TINY = ["--shape", "tiny", "--device", "cpu", "--batch", str(BATCH), "--prompt", str(PROMPT),
        "--output", str(OUTPUT), "--interval", "8", "--window", "4", "--ratio", "2", "--warmup", "2",
        "--threads", "1", "--no-progress"]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "e2e.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--repeats", "2", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, out


def test_json_structure(end_to_end):
    data, _, _ = end_to_end
    assert data["benchmark"] == "bench_generate" and data["mode"] == "end_to_end"
    for key in ("cpu", "python", "torch_threads"):
        assert key in data["machine"]
    assert data["versions"]["torch"] == torch.__version__
    import transformers

    assert data["versions"]["transformers"] == transformers.__version__
    s = data["settings"]
    assert (s["batch"], s["prompt"], s["output"], s["interval"], s["window"], s["ratio"]) == (BATCH, PROMPT, OUTPUT, 8, 4, 2)
    assert [r["config"] for r in data["results"]] == ["hf_dynamic", "rpc_off", "rpc"]
    assert data["skipped"] == []
    assert len(data["details"]["runs"]) == 6  # 2 repeats x 3 configurations
    for row in data["results"]:
        assert row["repeats"] == 2
        assert row["decode_tok_s_min"] <= row["decode_tok_s"] <= row["decode_tok_s_max"]
        assert row["decode_tok_s"] > 0 and row["prefill_ms"] > 0
        assert row["peak_mem_mib"] > 0


def test_same_number_of_generated_tokens(end_to_end):
    data, _, _ = end_to_end
    assert data["checks"]["same_generated_tokens"] is True
    assert data["checks"]["generated_tokens"] == [OUTPUT]
    for run in data["details"]["runs"]:
        assert run["generated_tokens"] == OUTPUT
        assert len(run["step_ms"]) == OUTPUT - 1  # the first token comes from the prefill
        assert len(run["cache_length"]) == OUTPUT
    for row in data["results"]:
        assert row["generated_tokens_per_run"] == [OUTPUT, OUTPUT]


def test_cache_lengths_follow_the_schedule(end_to_end):
    data, _, _ = end_to_end
    full = [PROMPT + i for i in range(OUTPUT)]
    compressed = [PROMPT] + RPC.length_schedule(PROMPT, OUTPUT - 1)
    for run in data["details"]["runs"]:
        expected = compressed if run["config"] == "rpc" else full
        assert run["cache_length"] == expected, run["config"]
    by = {r["config"]: r for r in data["results"]}
    assert by["rpc"]["compressions"] == RPC.compressions_after(OUTPUT - 1) > 0
    assert by["rpc_off"]["compressions"] == 0 and by["hf_dynamic"]["compressions"] == 0


def test_kv_bytes(end_to_end):
    data, _, _ = end_to_end
    s = data["settings"]
    per_token = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * 4  # float32 K and V
    by = {r["config"]: r for r in data["results"]}
    # DynamicCache ends holding every token but the last generated one.
    assert by["hf_dynamic"]["kv_peak_mib"] * 2**20 == per_token * BATCH * (PROMPT + OUTPUT - 1)
    assert by["rpc_off"]["kv_final_mib"] == by["hf_dynamic"]["kv_final_mib"]
    assert by["rpc"]["kv_final_mib"] * 2**20 == per_token * BATCH * RPC.physical_length(PROMPT, OUTPUT - 1)
    assert by["rpc"]["kv_peak_mib"] < by["rpc_off"]["kv_peak_mib"]


def test_rpc_off_generates_the_same_tokens(end_to_end):
    data, _, _ = end_to_end
    checks = data["checks"]
    assert checks["rpc_off_tokens_equal_to_hf_dynamic"] == 1.0
    # RPC decodes exactly like full KV until its first compression takes effect.
    first = checks["rpc_first_divergent_token"]
    assert first is None or first >= RPC.interval + RPC.window + 1


def test_table_printed_last_and_plot(end_to_end):
    _, stdout, out = end_to_end
    lines = stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["config", "generated_tokens"])
    assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["hf_dynamic", "rpc_off", "rpc"]
    assert lines[-1].startswith("plot:")
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 0


def test_time_budget_skips_and_lists(tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "skip.json"
    assert bench.main([*TINY, "--repeats", "1", "--max-seconds", "0", "--no-plot", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"] == [] and data["details"]["runs"] == []
    assert sorted(s["config"] for s in data["skipped"]) == ["hf_dynamic", "rpc", "rpc_off"]
    assert "SKIPPED" in capsys.readouterr().out


def test_sweep_integrates_only_what_was_measured(tmp_path):
    bench = _load_script()
    out = tmp_path / "sweep.json"
    args = [*TINY, "--sweep", "--sweep-lengths", "12", "48", "--sweep-steps", "2", "--sweep-outputs", "20", "60",
            "--no-plot", "--json", str(out)]
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "sweep"
    assert sorted((p["cache"], p["length"]) for p in data["measured"]["step_time"]) == [
        ("hf_dynamic", 12), ("hf_dynamic", 48), ("rpc_off", 12), ("rpc_off", 48)]
    assert all(p["step_ms"] > 0 for p in data["measured"]["step_time"])
    assert [c["length_before"] for c in data["measured"]["compression"]] == [
        PROMPT + RPC.kept_after(n) + RPC.interval + RPC.window for n in range(RPC.compressions_after(59))]
    rows = {(r["config"], r["output_tokens"]): r for r in data["results"]}
    assert all(r["kind"] == "integrated, not measured end to end" for r in rows.values())
    # Output 20: full KV reaches L = 12 + 19 = 31 <= 48, integrated.
    for config in ("hf_dynamic", "rpc_off", "rpc"):
        assert rows[(config, 20)]["decode_tok_s"] > 0
    for config in ("hf_dynamic", "rpc_off", "rpc"):
        assert rows[(config, 20)]["extrapolated"] == [] and rows[(config, 20)]["extrapolated_fraction"] == 0
    # 12 <= prompt + 1: nothing added
    assert data["sweep_lengths_added"] == [] and data["sweep_lengths_measured"] == [12, 48]
    assert {p["origin"] for p in data["measured"]["step_time"]} == {"requested"}
    # Output 60: full KV needs L = 13..71, of which 49..71 (23 of 59 steps) lie above the largest measured
    # length: answered, with those steps extrapolated and said so. RPC's sawtooth peaks at 47: all measured.
    for config in ("hf_dynamic", "rpc_off"):
        row = rows[(config, 60)]
        assert row["decode_tok_s"] > 0
        assert [(e["side"], e["lengths"], e["steps"]) for e in row["extrapolated"]] == [("above", [49, 71], 23)]
        assert row["extrapolated_fraction"] == pytest.approx(23 / 59)
        assert "23 of 59 steps extrapolated" in row["step_times"]
    assert rows[("rpc", 60)]["decode_tok_s"] > 0 and rows[("rpc", 60)]["extrapolated"] == []
    assert rows[("rpc", 60)]["peak_cache_len"] == max(RPC.physical_length(PROMPT, g - 1) + 1 for g in range(1, 60))


def test_sweep_above_the_prompt_measures_the_short_end(tmp_path, capsys):
    """Smallest --sweep-lengths far above the prompt (the schedules start at L = prompt + 1): the sweep
    measures prompt + 1 as well and every configuration gets an integrated decode_tok_s."""
    bench = _load_script()
    out = tmp_path / "sweep_high.json"
    args = [*TINY, "--sweep", "--sweep-lengths", "40", "56", "--sweep-steps", "2", "--sweep-outputs", "30",
            "--no-plot", "--json", str(out)]
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    assert data["sweep_lengths_measured"] == [PROMPT + 1, 40, 56]
    assert [a["length"] for a in data["sweep_lengths_added"]] == [PROMPT + 1]
    origins = {(p["cache"], p["length"]): p["origin"] for p in data["measured"]["step_time"]}
    assert origins == {(c, L): ("added" if L == PROMPT + 1 else "requested")
                       for c in ("hf_dynamic", "rpc_off") for L in (PROMPT + 1, 40, 56)}
    assert [r["config"] for r in data["results"]] == ["hf_dynamic", "rpc_off", "rpc"]
    for row in data["results"]:
        assert row["decode_tok_s"] > 0, row
        assert row["extrapolated"] == [] and row["extrapolated_fraction"] == 0  # L = 13..41: all measured
    stdout = capsys.readouterr().out
    assert "added" in stdout and "extrapolated_fraction" in stdout

    # Exactly the lengths asked for: the short end is extrapolated (flat), answered and labelled.
    out = tmp_path / "sweep_exact.json"
    assert bench.main([*args[:-1], str(out), "--sweep-exact-lengths"]) == 0
    data = json.loads(out.read_text())
    assert data["sweep_lengths_added"] == [] and data["sweep_lengths_measured"] == [40, 56]
    rows = {r["config"]: r for r in data["results"]}
    for config in ("hf_dynamic", "rpc_off", "rpc"):
        row = rows[config]
        assert row["decode_tok_s"] > 0, row
        below = [e for e in row["extrapolated"] if e["side"] == "below"]
        assert len(below) == 1 and below[0]["lengths"][0] == PROMPT + 1 and "flat" in below[0]["rule"]
        assert 0 < row["extrapolated_fraction"] <= 1
    # full KV: L = 13..41 over 29 steps, 13..39 below 40
    assert rows["hf_dynamic"]["extrapolated"][0]["steps"] == 27
    assert rows["hf_dynamic"]["extrapolated_fraction"] == pytest.approx(27 / 29)
    assert "extrapolated below the measured lengths" in capsys.readouterr().out


def test_integrate_rules():
    bench = _load_script()
    curve = [(10, 1.0), (20, 2.0), (30, 4.0)]
    total, extrapolated = bench.integrate(curve, [10, 15, 30], extra_ms=0.5)
    assert total == pytest.approx(0.5 + 1.0 + 1.5 + 4.0) and extrapolated == []
    # below: flat at 1.0; above: the last segment's slope (0.2 per token), from 4.0
    total, extrapolated = bench.integrate(curve, [5, 8, 35])
    assert total == pytest.approx(1.0 + 1.0 + 5.0)
    assert [(e["side"], e["lengths"], e["steps"]) for e in extrapolated] == [("above", [35, 35], 1),
                                                                             ("below", [5, 8], 2)]
    # a falling last segment (noise) extrapolates flat, never below the largest length's step time
    assert bench.integrate([(10, 3.0), (20, 2.0)], [40])[0] == pytest.approx(2.0)
    assert bench.integrate(curve, [5], extrapolate=False) == (None, 5)
