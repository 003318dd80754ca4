#!/usr/bin/env bash
# gpu_check.sh: the device check, in stages that each fit one GPU command (well under 8 minutes) and
# each print their own summary last (a later stage never depends on a summary of an earlier one).
#
#   bash benchmarks/gpu_check.sh 1   build + CUDA correctness tests                      est. 4-5 min
#   bash benchmarks/gpu_check.sh 2   kernel benchmarks + end-to-end generate, 16K output  est. 6-7 min
#   bash benchmarks/gpu_check.sh 2b  end-to-end generate, 32K output (CUDA-graph loops)    est. 6-7 min
#   bash benchmarks/gpu_check.sh 3   compute-sanitizer memcheck on a small selection       est. 3-5 min
#
# Time estimates (H200, from the numbers we have; confirm and correct them on the first run):
#   build: nvcc, 3 .cu files x (sm_80, sm_90, compute_90): 1.5 min measured on the shared 2-core CI
#     machine, about the same there (setup.py compiles one file at a time), then the C files
#     (seconds). Every stage rebuilds only when rpc_py._C is missing or lacks CUDA (a fresh machine),
#     so 2/2b/3 add ~1.5 min on a cold machine and ~0 on a warm one.
#   1: CUDA tests (test_compress_cuda, test_kernels_v2_cuda, the cuda-marked rest): ~250 cases, mostly
#     sub-second kernels plus a few 64K-token oracles on the CPU in float64 (~5-20 s each): ~1.5-2 min.
#   2: decode bench (2 batches x 3 lengths x 3 variants, CUDA graphs of 50 calls): ~30 s; compression
#     bench at 3 lengths, B=32 (the public torch code costs ~4-12 ms a call, 10 repeats): ~40 s;
#     generate at 16K output, B=32, R1-7B shape: model build ~20 s, graph loops (d) rpc_off_graph and
#     (e) rpc_graph: 16K steps at ~6-10 ms (off) and ~4-6 ms (RPC) per step = ~2 + ~1.5 min; the eager
#     loops (a)-(c) cannot run 16K tokens here (~63 ms per step = 17 min each): they run 1,024 tokens
#     (~65 s each, measured rate at short length) and a step-time sweep to 16K integrates them
#     ("integrated, not measured end to end"): ~1.5 min. Each bench has its own --max-seconds guard.
#   2b: batch 16 (batch 32 without compression needs ~120 GB of KV at 32K): (e) rpc_graph at 32K
#     (~2.5 min) and (d) rpc_off_graph at 32K (~4 min at ~4-10 ms per step; its --max-seconds guard
#     skips it if (e) took too long).
#   3: compute-sanitizer memcheck (10-100x slower kernels) over ~40 small cases: ~2-4 min.
#
# Interpreter: python3 (PYTHON=... overrides). Outputs (logs, JSON) go to $OUT when set, else
# /tmp/rpc_gpu_out. Each step runs under `timeout`; a failing step does not stop the stage; the exit
# status is non-zero when a step failed.
set -uo pipefail

STAGE="${1:-}"
case "$STAGE" in
1 | 2 | 2b | 3) ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh 1|2|2b|3   (see the header for what each stage runs)" >&2
    exit 2
    ;;
esac
OUT="${OUT:-/tmp/rpc_gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip --disable-pip-version-check)
FAILED=()
T_STAGE=$SECONDS

section() { printf '\n==================== %s ====================\n' "$*"; }

# step NAME SECONDS CMD...: run CMD under a timeout, log to $OUT/NAME.log, show the tail.
step() {
    local name="$1" secs="$2"
    shift 2
    section "$name (limit ${secs}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log" | cut -c1-250
    echo "[$name] exit $rc after $((SECONDS - t0)) s"
    echo "$name $rc $((SECONDS - t0))" >>"$OUT/steps_stage$STAGE.txt"
    if [ "$rc" -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
    return "$rc"
}

cuda_ready() { "$PY" -c 'import sys, rpc_py; sys.exit(0 if rpc_py.cuda_available() else 1)' 2>/dev/null; }

# Build with CUDA required and warnings as errors, for the H200 only (sm_90 SASS + compute_90 PTX:
# RPC_PY_CUDA_ARCHS=90; CI's wheel build compiles every architecture), unless the in-place
# extension already has a usable CUDA backend (a warm machine).
ensure_built() {
    if cuda_ready; then
        echo "rpc_py._C already built with CUDA: no rebuild"
        return 0
    fi
    RPC_PY_CUDA=1 RPC_PY_WERROR=1 RPC_PY_CUDA_ARCHS="${RPC_PY_CUDA_ARCHS:-90}" step build 300 "${PIP[@]}" install --no-build-isolation --no-deps -e .
    step features 60 "$PY" -c "import rpc_py; print(sorted(rpc_py.backend_features)); assert rpc_py.cuda_available(), 'CUDA backend not usable'"
}

: >"$OUT/steps_stage$STAGE.txt"
section "device (stage $STAGE)"
timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || FAILED+=("nvidia-smi")
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" || true
date -u +"date %Y-%m-%dT%H:%M:%SZ"

ensure_built

case "$STAGE" in
1)
    step test_cuda_kernels 240 "$PY" -m pytest -q --maxfail=60 --tb=short -rfs -p no:cacheprovider \
        --junitxml="$OUT/junit_kernels.xml" tests/test_kernels_v2_cuda.py tests/test_compress_cuda.py
    step test_cuda_other 150 "$PY" -m pytest -q --maxfail=40 --tb=short -rfs -p no:cacheprovider -m cuda \
        --junitxml="$OUT/junit_other.xml" tests --ignore=tests/test_compress_cuda.py \
        --ignore=tests/test_kernels_v2_cuda.py
    ;;
2)
    step bench_decode_attention 90 "$PY" benchmarks/bench_decode_attention.py --device cuda --batch 1 32 \
        --lengths 4096 16384 32768 --json "$OUT/bench_decode_attention_cuda.json"
    step bench_compress 100 "$PY" benchmarks/bench_compress.py --device cuda --repeats 10 --no-reference \
        --json "$OUT/bench_compress_cuda.json"
    # Graph loops, 16K output, the paper's P = 4096 (3 compressions), R = 32, c = 4.
    step generate_16k_graph 250 "$PY" benchmarks/bench_generate.py --shape r1-7b --device cuda --batch 32 \
        --prompt 128 --output 16384 --interval 4096 --window 32 --ratio 4 --repeats 1 --warmup 4 \
        --configs rpc_graph rpc_off_graph --max-seconds 200 --no-progress --no-plot \
        --json "$OUT/bench_generate_r1-7b_16k_graph.json"
    # Eager loops: their measured rate at 1K output (same P scaled down: 3 compressions)...
    step generate_1k_eager 150 "$PY" benchmarks/bench_generate.py --shape r1-7b --device cuda --batch 32 \
        --prompt 128 --output 1024 --interval 256 --window 32 --ratio 4 --repeats 1 --warmup 4 \
        --configs hf_dynamic rpc_off rpc --max-seconds 120 --no-progress --no-plot \
        --json "$OUT/bench_generate_r1-7b_1k_eager.json"
    # ...and their step time vs cache length up to 16K, integrated over 16K and 32K generations.
    step generate_sweep 120 "$PY" benchmarks/bench_generate.py --shape r1-7b --device cuda --batch 32 --prompt 128 \
        --sweep --sweep-lengths 128 2048 8192 16512 --sweep-outputs 16384 32768 \
        --interval 4096 --window 32 --ratio 4 --max-seconds 90 --no-progress --no-plot \
        --json "$OUT/bench_generate_sweep_r1-7b_cuda.json"
    ;;
2b)
    # Batch 16: at 32K the uncompressed cache of batch 32 alone would take ~120 GB of the 139.
    step generate_32k_graph 420 "$PY" benchmarks/bench_generate.py --shape r1-7b --device cuda --batch 16 \
        --prompt 128 --output 32768 --interval 4096 --window 32 --ratio 4 --repeats 1 --warmup 4 \
        --configs rpc_graph rpc_off_graph --max-seconds 200 --no-progress --no-plot \
        --json "$OUT/bench_generate_r1-7b_32k_graph.json"
    ;;
3)
    # memcheck only (racecheck over these kernels takes far longer than a slot); a small selection that
    # still runs every kernel once: each v2 kernel and D, the v1 kernels, select, compact, append/ring.
    export RPC_PY_CS_TOOLS=memcheck
    step compute_sanitizer 400 bash ci/compute_sanitizer.sh -q -p no:cacheprovider -x \
        tests/test_kernels_v2_cuda.py tests/test_compress_cuda.py tests/test_decode_attention.py -m cuda \
        -k "(test_decode_v2_matches_oracle_and_v1 and G7) or test_decode_v2_never_reads or (test_decode_v2_split and S1000) \
or (test_score_v2_matches_oracle_and_v1 and all and bfloat16) or test_compact_v2 or test_select_all_nan \
or (test_score_matches_reference and float32 and avg and all) or test_cuda_graph_replay or test_compress_scratch"
    ;;
esac

section "summary (stage $STAGE, $((SECONDS - T_STAGE)) s)"
cat "$OUT/steps_stage$STAGE.txt" | awk '{printf "  %-26s exit %-4s %5s s\n", $1, $2, $3}'
"$PY" - "$OUT" "$STAGE" <<'EOF'
import glob, json, os, sys

out, stage = sys.argv[1], sys.argv[2]
want = {"1": ["junit_*.xml"], "2": ["bench_decode_attention_cuda.json", "bench_compress_cuda.json",
                                     "bench_generate_r1-7b_16k_graph.json", "bench_generate_r1-7b_1k_eager.json",
                                     "bench_generate_sweep_r1-7b_cuda.json"],
        "2b": ["bench_generate_r1-7b_32k_graph.json"], "3": []}[stage]


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, separators=(",", ":"))
        return s if len(s) <= 36 else s[:33] + "..."
    return str(v)


def table(rows, keys):
    t = [keys] + [[fmt(r.get(k, "")) for k in keys] for r in rows]
    w = [max(len(str(x[i])) for x in t) for i in range(len(keys))]
    for x in t:
        print("  " + "  ".join(str(c).rjust(n) for c, n in zip(x, w)))


for pattern in want:
    for path in sorted(glob.glob(os.path.join(out, pattern))):
        name = os.path.basename(path)
        print(f"--- {name}")
        if name.endswith(".xml"):
            import xml.etree.ElementTree as ET
            try:
                r = ET.parse(path).getroot()
                s = r if r.tag == "testsuite" else r.find("testsuite")
                print("  tests {} failures {} errors {} skipped {} time {}s".format(
                    *(s.get(k) for k in ("tests", "failures", "errors", "skipped", "time"))))
                for case in s.iter("testcase"):
                    for bad in list(case.findall("failure")) + list(case.findall("error")):
                        print(f"  FAIL {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:150]}")
            except Exception as e:  # a truncated file from a timed-out step
                print("  unreadable:", e)
            continue
        try:
            data = json.load(open(path))
        except Exception as e:
            print("  unreadable:", e)
            continue
        if name.startswith("bench_decode"):
            table(data, ["batch", "length", "splits", "v2_s", "v1_s", "sdpa_s", "v2_GBps", "v1_GBps", "sdpa_GBps",
                         "max_abs_err"])
        elif name.startswith("bench_compress"):
            print("  " + data.get("machine", ""))
            rows = [dict(L=r["L"], N=r["N"], keep=r["keep"], **{k + "_ms": v for k, v in r["ms"].items()},
                         x_public=r["speedup_vs_public"], GBps=r["rpc_py_GBps"]) for r in data["rows"]]
            table(rows, list(rows[0]) if rows else [])
        elif "sweep" in name:
            pts = data.get("measured", {}).get("step_time", [])
            if pts:
                table(pts, ["cache", "length", "step_ms", "step_ms_min", "step_ms_max"])
            integ = data.get("results", [])
            if integ:
                table(integ, ["config", "output_tokens", "kind", "decode_tok_s", "compressions_per_layer",
                              "peak_cache_len", "kv_peak_mib"])
            print("  skipped:", fmt(data.get("skipped")))
        else:
            res = data.get("results", [])
            if res:
                table(res, ["config", "generated_tokens", "decode_tok_s", "prefill_ms", "kv_peak_mib",
                            "compressions", "compress_ms"])
            print("  checks:", fmt(data.get("checks")))
            if data.get("skipped"):
                print("  skipped:", fmt(data.get("skipped")))
EOF

section "result (stage $STAGE)"
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "stage $STAGE: all steps passed in $((SECONDS - T_STAGE)) s; logs and JSON in $OUT"
    exit 0
fi
echo "stage $STAGE: FAILED steps: ${FAILED[*]}; logs in $OUT"
exit 1
