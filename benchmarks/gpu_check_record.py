"""The report of one gpu_check.sh stage: a JSON file rewritten after every step.

    gpu_check_record.py REPORT STAGE STEP BUDGET_S RC SECONDS LOG [STEP_JSON]   append one step
    gpu_check_record.py --summary REPORT                                        print the stage's tables

Each step record holds its exit status, time, budget, whether the budget killed it, the last lines of
its log, and what the step measured: its own JSON (a benchmark's rows, the self-check's results) or,
for a JSON-lines test log, the per-test outcomes and their counts.
"""

import json
import os
import sys
import time


def _load_step_output(path):
    if not path or not os.path.exists(path):
        return None
    try:
        if path.endswith(".jsonl"):
            tests = [json.loads(line) for line in open(path) if line.strip()]
            counts = {}
            for t in tests:
                counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
            return {"counts": counts, "failed": [t for t in tests if t["outcome"] == "failed"],
                    "slowest": sorted(tests, key=lambda t: -t["seconds"])[:10], "tests": len(tests)}
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # a half-written file from a killed step
        return {"unreadable": str(e)}


def record(report, stage, name, budget, rc, seconds, log, step_json=None):
    data = {"stage": stage, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": []}
    if os.path.exists(report):
        with open(report) as f:
            data = json.load(f)
    tail = []
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = f.read().splitlines()[-40:]
    rc, budget, seconds = int(rc), int(budget), int(seconds)
    data["steps"].append({"step": name, "exit": rc, "seconds": seconds, "budget_s": budget,
                          "timed_out": rc in (124, 137), "log_tail": tail, "output": _load_step_output(step_json)})
    data["elapsed_s"] = sum(s["seconds"] for s in data["steps"])
    tmp = report + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, report)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(rows, keys):
    t = [keys] + [[_fmt(r.get(k)) for k in keys] for r in rows]
    w = [max(len(str(x[i])) for x in t) for i in range(len(keys))]
    for x in t:
        print("  " + "  ".join(str(c).rjust(n) for c, n in zip(x, w)))


def summary(report):
    with open(report) as f:
        data = json.load(f)
    _table(data["steps"], ["step", "exit", "seconds", "budget_s", "timed_out"])
    for s in data["steps"]:
        out = s.get("output")
        if not out:
            continue
        print(f"--- {s['step']}")
        if isinstance(out, dict) and "unreadable" in out:
            print("  unreadable:", out["unreadable"])
        elif s["step"] == "copy_bandwidth":
            print(f"  {out['copy_GBps']:.1f} GB/s on {out['device']}")
        elif s["step"] == "selfcheck":
            bad = [r for r in out if not r["ok"]]
            print(f"  {len(out) - len(bad)} of {len(out)} checks passed")
            for r in bad:
                print(f"  FAILED {r['family']} {r['dtype']}: {r['detail']}")
        elif s["step"].startswith("bench_decode"):
            _table(out, ["batch", "length", "v2_s", "v1_s", "sdpa_s", "v2_GBps", "sdpa_GBps", "v2_of_copy",
                         "sdpa_of_copy", "max_abs_err"])
        elif s["step"].startswith("bench_compress"):
            rows = [dict(L=r["L"], keep=r["keep"], rpc_py_ms=r["ms"]["rpc_py"], public_ms=r["ms"]["public"],
                         GBps=r["rpc_py_GBps"], of_copy=r.get("rpc_py_of_copy")) for r in out.get("rows", [])]
            _table(rows, ["L", "keep", "rpc_py_ms", "public_ms", "GBps", "of_copy"])
        elif "tests" in out and "counts" in out:
            print(f"  {out['tests']} results: {out['counts']}")
            for t in out["failed"][:20]:
                print(f"  FAILED {t['test']}: {t.get('message', '')[-200:]}")
        elif isinstance(out, dict) and "results" in out:
            _table(out["results"], ["config", "generated_tokens", "decode_tok_s", "kv_peak_mib", "compressions",
                                    "compress_ms", "output_tokens"])
            if out.get("partial"):
                print("  (partial: the step stopped before the end)")


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
    else:
        record(*sys.argv[1:8], *(sys.argv[8:9] or [None]))
