#!/usr/bin/env bash
# gpu_check.sh: the one script run on the GPU machine (H200, no network, a few minutes of device time).
#
# Builds rpc_py with CUDA, runs the test suite (CUDA tests included), runs the benchmarks and prints
# a compact summary of their JSON output last. Each step runs under `timeout` and a failing step
# does not stop the others; the exit status is non-zero when any step failed. Outputs (logs, JSON)
# go to ${OUT:-/tmp/rpc_gpu_out}. Target: under 6 minutes in total.
#
# Usage (from the repository root): bash benchmarks/gpu_check.sh
set -uo pipefail

OUT="${OUT:-/tmp/rpc_gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
FAILED=()

section() { printf '\n==================== %s ====================\n' "$*"; }

# step NAME SECONDS CMD...: run CMD under a timeout, log to $OUT/NAME.log, show the tail.
step() {
    local name="$1" secs="$2"
    shift 2
    section "$name"
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log" | cut -c1-300
    echo "[$name] exit $rc after $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
    return "$rc"
}

section "device"
timeout 30 nvidia-smi -L || FAILED+=("nvidia-smi")
timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" || true

# Build with CUDA required and warnings as errors (sm_80 + sm_90 + PTX, see setup.py).
export RPC_PY_CUDA=1 RPC_PY_WERROR=1
step build 180 "$PY" -m pip install --no-build-isolation --no-deps -e .

step features 60 "$PY" -c "import rpc_py; print(sorted(rpc_py.backend_features)); assert rpc_py.cuda_available(), 'CUDA backend not usable'"

# CUDA kernel tests first (fast feedback), then the other CUDA-marked tests (pyproject marker
# `cuda`); the CPU-only rest of the suite runs last, after the benchmarks, as CI covers it already.
step test_cuda_kernels 120 "$PY" -m pytest -q --maxfail=40 --tb=short -rfs -p no:cacheprovider tests/test_compress_cuda.py
step test_cuda_other 90 "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda tests --ignore=tests/test_compress_cuda.py

# Operator benchmark: RPC CUDA compression vs a torch implementation of the public code.
if [ -f benchmarks/bench_compress.py ]; then
    step bench_compress 150 "$PY" benchmarks/bench_compress.py --device cuda --json "$OUT/bench_compress_cuda.json"
else
    echo "benchmarks/bench_compress.py not present: skipped"
fi

# Decode attention kernel (CUDA-graph path) vs torch SDPA on the same live KV.
step bench_decode_attention 90 "$PY" benchmarks/bench_decode_attention.py --device cuda \
    --json "$OUT/bench_decode_attention_cuda.json"

# Generation benchmark, R1-7B shape (random bf16 weights), batch 32, prompt 128: (a) DynamicCache,
# (b) rpc_py rpc=None, (c) RPC with P scaled to the output (P=128, R=32, c=4: 3 compressions).
step bench_generate 200 "$PY" benchmarks/bench_generate.py --shape r1-7b --device cuda --batch 32 --prompt 128 \
    --output 512 --interval 128 --window 32 --ratio 4 --repeats 1 --max-seconds 170 --no-progress \
    --json "$OUT/bench_generate_r1-7b_cuda.json"
# Step time vs cache length up to 16K, integrated over 8K/16K generations with the paper's P=4096
# (labelled "integrated, not measured end to end").
step bench_generate_sweep 150 "$PY" benchmarks/bench_generate.py --shape r1-7b --device cuda --batch 32 --prompt 128 \
    --sweep --sweep-lengths 128 1024 2048 4096 8192 16512 --sweep-outputs 8192 16384 \
    --interval 4096 --window 32 --ratio 4 --max-seconds 120 --no-progress \
    --json "$OUT/bench_generate_sweep_r1-7b_cuda.json"

# Memory and race checking of the CUDA kernels on a small selection (skips when the tool is missing).
if [ -f ci/compute_sanitizer.sh ]; then
    step compute_sanitizer 150 bash ci/compute_sanitizer.sh
fi

# The CPU-only rest of the suite is CI's job; run it here only when asked (RPC_PY_GPU_CHECK_CPU=1).
if [ "${RPC_PY_GPU_CHECK_CPU:-0}" = "1" ]; then
    step test_cpu_rest 120 "$PY" -m pytest -q -p no:cacheprovider -m "not cuda" tests --ignore=tests/test_compress_cuda.py
fi

section "summary"
"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys

out = sys.argv[1]
files = sorted(glob.glob(os.path.join(out, "*.json")))
if not files:
    print("no JSON results in", out)


def rows_of(obj):
    """Yield flat dict rows from a benchmark JSON (a list of rows or a dict holding one)."""
    if isinstance(obj, list):
        for r in obj:
            if isinstance(r, dict):
                yield r
    elif isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if lists:
            for lst in lists:
                yield from lst
        else:
            yield obj


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, separators=(",", ":"))
        return s if len(s) <= 40 else s[:37] + "..."
    return str(v)


for path in files:
    print(f"--- {os.path.basename(path)}")
    try:
        with open(path) as f:
            data = json.load(f)
    except Exception as e:  # a truncated file from a timed-out step
        print("  unreadable:", e)
        continue
    rows = list(rows_of(data))
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    keys = keys[:12]
    table = [keys] + [[fmt(r.get(k, "")) for k in keys] for r in rows[:40]]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(keys))]
    for row in table:
        print("  " + "  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    if len(rows) > 40:
        print(f"  ... {len(rows) - 40} more rows")
EOF

section "result"
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "all steps passed; logs and JSON in $OUT"
    exit 0
fi
echo "FAILED steps: ${FAILED[*]}; logs in $OUT"
exit 1
