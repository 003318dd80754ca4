#!/usr/bin/env bash
# gpu_check.sh: the device check. GPU time comes in commands of at most 10 minutes and ~15 minutes in
# all, start-up included, so the stage to run first is ONE command that fits 7 minutes with the build:
#
#   bash benchmarks/gpu_check.sh quick            build (sm_90), copy rate, every kernel against the CPU
#                                                 kernels, decode attention B=32 L=16K, compression at
#                                                 the R1-7B shape, a short CUDA-graph generate, the CUDA
#                                                 tests                                   budget 410 s
#   bash benchmarks/gpu_check.sh quick --dry-run  print that plan and its budgets (any machine, no GPU)
#   bash benchmarks/gpu_check.sh quick --cpu-smoke the same steps on the CPU at toy sizes, with the torch
#                                                 kernels' self-check: proves the script itself (steps,
#                                                 budgets, the report after every step) before GPU time
#                                                 is spent on it; tests/test_ci_scripts.py runs it
#
# Longer stages, for later sessions (each fits one 10-minute command; the build is skipped on a warm
# machine):
#   tests        every CUDA test, full output                                              budget 360 s
#   bench        decode + compression at 3 lengths, eager generate 1K + step-time sweep    budget 420 s
#   generate16k  CUDA-graph generate, 16K output, B=32 (~330 s estimated)                  budget 480 s
#   generate32k  CUDA-graph generate, 32K output, B=16                                     budget 480 s
#   sanitizer    compute-sanitizer memcheck on a small selection                           budget 420 s
#
# Every step runs under `timeout` with its budget; a failing or killed step does not stop the stage.
# After every step the stage's JSON ($OUT/gpu_check_<stage>.json) is rewritten with what that step
# measured (its own JSON, which the benchmarks write incrementally, so a killed step keeps its rows),
# so a stage cut short keeps everything measured before. The device's copy rate is measured first and
# every bandwidth is also reported as a fraction of it.
#
# Estimates (no GPU run yet; correct them after the first): build ~30 s of nvcc for sm_90 on one core
# (measured on the 2-core CI machine: 30 s) plus pip; selfcheck ~10 s with the CUDA start-up; decode
# bench ~10 s; compression bench ~15 s; short generate: R1-7B random bf16 weights ~20 s to build, 2 x
# 1K steps at ~9 ms under a graph; CUDA tests ~400 cases, mostly sub-second.
#
# Interpreter: python3 (PYTHON=... overrides; exported, so every script below uses the same one).
# Outputs (logs, JSON) go to $OUT when set, else /tmp/rpc_gpu_out. Exit status: non-zero when a step
# failed or timed out.
set -uo pipefail

STAGE="${1:-}"
DRY=0
SMOKE=0
case "${2:-}" in
--dry-run) DRY=1 ;;
--cpu-smoke) SMOKE=1 ;;
"") ;;
*) echo "unknown option: $2" >&2; exit 2 ;;
esac
if [ "$SMOKE" = 1 ] && [ "$STAGE" != quick ]; then
    echo "--cpu-smoke: only the quick stage has a CPU smoke run" >&2
    exit 2
fi
# What a stage may take: quick 7 minutes (of ~15 in all: the rest is start-up and a rerun); the longer
# stages one command (10 minutes) with a margin.
LIMIT_S=570
[ "$STAGE" = quick ] && LIMIT_S=420

# The plans: "name budget_seconds" per step, in order.
plan() {
    case "$1" in
    quick) printf '%s\n' "device 10" "build 100" "copy_bandwidth 20" "selfcheck 40" "bench_decode 30" \
        "bench_compress 40" "generate_graph 70" "cuda_tests 100" ;;
    tests) printf '%s\n' "device 10" "build 100" "cuda_tests_full 250" ;;
    bench) printf '%s\n' "device 10" "build 100" "copy_bandwidth 20" "bench_decode_all 60" "bench_compress_all 80" \
        "generate_1k_eager 90" "generate_sweep 60" ;;
    generate16k) printf '%s\n' "device 10" "build 100" "generate_16k_graph 370" ;;
    generate32k) printf '%s\n' "device 10" "build 100" "generate_32k_graph 370" ;;
    sanitizer) printf '%s\n' "device 10" "build 100" "compute_sanitizer 310" ;;
    *) return 1 ;;
    esac
}

if ! plan "$STAGE" >/dev/null 2>&1; then
    echo "usage: bash benchmarks/gpu_check.sh quick|tests|bench|generate16k|generate32k|sanitizer [--dry-run]" >&2
    exit 2
fi
budget_of() { plan "$STAGE" | awk -v n="$1" '$1 == n {print $2}'; }
TOTAL=$(plan "$STAGE" | awk '{s += $2} END {print s}')

if [ "$DRY" = 1 ]; then
    echo "gpu_check.sh $STAGE: plan (dry run, nothing is executed)"
    plan "$STAGE" | awk '{printf "  %-20s budget %4d s\n", $1, $2}'
    echo "  total budget: $TOTAL s of the $LIMIT_S s a stage may take ($(awk -v t="$TOTAL" 'BEGIN {printf "%.1f", t / 60}') min)"
    if [ "$TOTAL" -gt "$LIMIT_S" ]; then
        echo "OVER: the plan does not fit one command" >&2
        exit 1
    fi
    exit 0
fi

OUT="${OUT:-/tmp/rpc_gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHON="$PY" PY OUT
FAILED=()
T_STAGE=$SECONDS
REPORT="$OUT/gpu_check_$STAGE.json"
rm -f "$REPORT"

section() { printf '\n==================== %s ====================\n' "$*"; }

# step NAME [JSON] -- CMD...: run CMD under its budget, log to $OUT/NAME.log, show the tail, then
# append the step (and JSON, the file the step writes, if any) to the stage's report.
step() {
    local name="$1" json="" secs
    shift
    if [ "$1" != "--" ]; then json="$1"; shift; fi
    shift
    secs="$(budget_of "$name")"
    section "$name (budget ${secs}s)"
    local t0=$SECONDS
    # bash -c: the command may be one of the functions below (exported with export -f)
    timeout --kill-after=10 "$secs" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log" | cut -c1-250
    echo "[$name] exit $rc after $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
    "$PY" benchmarks/gpu_check_record.py "$REPORT" "$STAGE" "$name" "$secs" "$rc" "$((SECONDS - t0))" \
        "$OUT/$name.log" "$json" || echo "(could not record $name)"
    return "$rc"
}

cuda_ready() { "$PY" -c 'import sys, rpc_py; sys.exit(0 if rpc_py.cuda_available() else 1)' 2>/dev/null; }

device_info() {
    if [ "$SMOKE" = 1 ]; then echo "cpu smoke run: $(nproc) CPUs"; else
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    fi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
}

# Build with CUDA required and warnings as errors, sm_90 only (RPC_PY_CUDA_ARCHS=90: H100/H200; CI's
# wheel build compiles every architecture), unless rpc_py._C already has a usable CUDA backend.
build() {
    if cuda_ready; then
        echo "rpc_py._C already built with CUDA: no rebuild"
        return 0
    fi
    if [ "$SMOKE" = 1 ]; then
        "$PY" -c "import rpc_py; print('cpu smoke run: the installed rpc_py', rpc_py.__version__)"
        return
    fi
    RPC_PY_CUDA=1 RPC_PY_WERROR=1 RPC_PY_CUDA_ARCHS="${RPC_PY_CUDA_ARCHS:-90}" \
        "$PY" -m pip --disable-pip-version-check install --no-build-isolation --no-deps -e . || return 1
    "$PY" -c "import rpc_py; print(sorted(rpc_py.backend_features)); assert rpc_py.cuda_available(), 'CUDA backend not usable'"
}

copy_bandwidth() {
    "$PY" - "$OUT/copy_bandwidth.json" "$DEV" <<'PYEOF'
import json, sys, torch
from rpc_py._report import copy_bandwidth_gbps
dev = sys.argv[2]
size = (1 << 30) if dev == "cuda" else (1 << 26)
gbps = copy_bandwidth_gbps(dev, nbytes=size, repeats=20)
name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
print(f"device copy rate: {gbps:.1f} GB/s (read + write of {size >> 20} MiB, median of 20) on {name}")
json.dump({"copy_GBps": gbps, "device": name}, open(sys.argv[1], "w"))
PYEOF
}

pytest_cuda() { # NAME ARGS...: the CUDA tests with one JSON line per finished test (survives a kill)
    local name="$1"
    shift
    PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}" RPC_PY_TEST_LOG="$OUT/$name.jsonl" \
        "$PY" -m pytest -p pytest_progress -p no:cacheprovider -q --tb=short -rfs "$@"
}

DEV=cuda
[ "$SMOKE" = 1 ] && DEV=cpu
export SMOKE DEV
export -f cuda_ready device_info build copy_bandwidth pytest_cuda
CUDA_TESTS=(tests/test_compress_cuda.py tests/test_kernels_v2_cuda.py)

section "device (stage $STAGE, plan ${TOTAL}s)"
step device -- device_info
step build -- build
if plan "$STAGE" | grep -q '^copy_bandwidth '; then
    if step copy_bandwidth "$OUT/copy_bandwidth.json" -- copy_bandwidth; then
        RPC_PY_COPY_GBPS="$("$PY" -c "import json; print(json.load(open('$OUT/copy_bandwidth.json'))['copy_GBps'])")"
        export RPC_PY_COPY_GBPS # every later bandwidth is divided by this one measurement
    fi
fi

case "$STAGE" in
quick)
    if [ "$SMOKE" = 0 ]; then
        CHECK=(--dtype float32 --dtype bfloat16 --dtype float16 --head-dim 64 --head-dim 128)
        DECODE=(--batch 32 1 --lengths 16384)
        COMPRESS=(--lengths 11424 4256 --repeats 10)
        # R1-7B shape, random weights, 1K output with P=256 (3 compressions), both graph loops.
        GENERATE=(--shape r1-7b --batch 32 --prompt 128 --output 1024 --interval 256 --window 32 --ratio 4
            --configs rpc_graph rpc_off_graph --max-seconds 55)
        TESTS=(--maxfail=40 "${CUDA_TESTS[@]}" tests -m cuda)
    else # toy sizes on the CPU; the torch kernels stand in for the device kernels in the self-check
        CHECK=(--device cpu --impl torch --dtype bfloat16 --head-dim 64)
        DECODE=(--batch 1 --lengths 512)
        COMPRESS=(--batch 1 --lengths 600 --interval 256 --repeats 2)
        GENERATE=(--shape tiny --batch 2 --prompt 16 --output 40 --interval 8 --window 4 --ratio 2 --configs rpc_off rpc
            --threads 1)
        TESTS=(tests/test_selfcheck.py -k "cli or bad_arguments")
    fi
    step selfcheck "$OUT/selfcheck.json" -- "$PY" -m rpc_py.selfcheck "${CHECK[@]}" --json "$OUT/selfcheck.json"
    step bench_decode "$OUT/bench_decode.json" -- "$PY" benchmarks/bench_decode_attention.py --device "$DEV" \
        "${DECODE[@]}" --json "$OUT/bench_decode.json"
    step bench_compress "$OUT/bench_compress.json" -- "$PY" benchmarks/bench_compress.py --device "$DEV" \
        "${COMPRESS[@]}" --no-reference --json "$OUT/bench_compress.json"
    step generate_graph "$OUT/generate_graph.json" -- "$PY" benchmarks/bench_generate.py --device "$DEV" \
        "${GENERATE[@]}" --repeats 1 --warmup 4 --no-progress --no-plot --json "$OUT/generate_graph.json"
    step cuda_tests "$OUT/cuda_tests.jsonl" -- pytest_cuda cuda_tests "${TESTS[@]}"
    ;;
tests)
    step cuda_tests_full "$OUT/cuda_tests_full.jsonl" -- pytest_cuda cuda_tests_full "${CUDA_TESTS[@]}" tests -m cuda
    ;;
bench)
    step bench_decode_all "$OUT/bench_decode_all.json" -- "$PY" benchmarks/bench_decode_attention.py --device cuda \
        --batch 1 32 --lengths 4096 16384 32768 --json "$OUT/bench_decode_all.json"
    step bench_compress_all "$OUT/bench_compress_all.json" -- "$PY" benchmarks/bench_compress.py --device cuda \
        --repeats 10 --no-reference --json "$OUT/bench_compress_all.json"
    step generate_1k_eager "$OUT/generate_1k_eager.json" -- "$PY" benchmarks/bench_generate.py --shape r1-7b \
        --device cuda --batch 32 --prompt 128 --output 1024 --interval 256 --window 32 --ratio 4 --repeats 1 \
        --warmup 4 --configs hf_dynamic rpc_off rpc --max-seconds 75 --no-progress --no-plot \
        --json "$OUT/generate_1k_eager.json"
    step generate_sweep "$OUT/generate_sweep.json" -- "$PY" benchmarks/bench_generate.py --shape r1-7b --device cuda \
        --batch 32 --prompt 128 --sweep --sweep-lengths 128 2048 8192 16512 --sweep-outputs 16384 32768 \
        --interval 4096 --window 32 --ratio 4 --max-seconds 45 --no-progress --no-plot --json "$OUT/generate_sweep.json"
    ;;
generate16k)
    step generate_16k_graph "$OUT/generate_16k_graph.json" -- "$PY" benchmarks/bench_generate.py --shape r1-7b \
        --device cuda --batch 32 --prompt 128 --output 16384 --interval 4096 --window 32 --ratio 4 --repeats 1 \
        --warmup 4 --configs rpc_graph rpc_off_graph --max-seconds 340 --no-progress --no-plot \
        --json "$OUT/generate_16k_graph.json"
    ;;
generate32k)
    # Batch 16: at 32K the uncompressed cache of batch 32 alone would take ~120 GB.
    step generate_32k_graph "$OUT/generate_32k_graph.json" -- "$PY" benchmarks/bench_generate.py --shape r1-7b \
        --device cuda --batch 16 --prompt 128 --output 32768 --interval 4096 --window 32 --ratio 4 --repeats 1 \
        --warmup 4 --configs rpc_graph rpc_off_graph --max-seconds 340 --no-progress --no-plot \
        --json "$OUT/generate_32k_graph.json"
    ;;
sanitizer)
    # memcheck only (racecheck over these kernels takes far longer than a command); a small selection
    # that still runs every kernel once. RPC_PY_CS_REQUIRE: a skip is a failure here.
    step compute_sanitizer -- env RPC_PY_CS_TOOLS=memcheck RPC_PY_CS_REQUIRE=1 bash ci/compute_sanitizer.sh -q \
        -p no:cacheprovider -x tests/test_kernels_v2_cuda.py tests/test_compress_cuda.py tests/test_decode_attention.py \
        tests/test_selfcheck.py \
        -k "(test_decode_v2_matches_oracle_and_v1 and G7) or test_decode_v2_never_reads or (test_decode_v2_split and S1000) \
or (test_score_v2_matches_oracle_and_v1 and all and bfloat16) or test_compact_v2 or test_select_all_nan \
or (test_score_matches_reference and float32 and avg and all) or test_cuda_graph_replay or test_compress_scratch \
or test_native_cuda_kernels_pass_every_check"
    ;;
esac

section "summary (stage $STAGE, $((SECONDS - T_STAGE)) s of a ${TOTAL} s plan)"
"$PY" benchmarks/gpu_check_record.py --summary "$REPORT" || true
section "result (stage $STAGE)"
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "stage $STAGE: all steps passed in $((SECONDS - T_STAGE)) s; report $REPORT, logs in $OUT"
    exit 0
fi
echo "stage $STAGE: FAILED steps: ${FAILED[*]}; report $REPORT, logs in $OUT"
exit 1
