#!/usr/bin/env bash
# ci/compute_sanitizer.sh: NVIDIA compute-sanitizer over the CUDA tests (GPU machine only).
#
# memcheck: out-of-bounds / misaligned device accesses and CUDA API errors in our kernels;
# racecheck: shared-memory data races (the score/select kernels reduce through shared memory).
# torch's caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so every torch tensor
# is its own cudaMalloc block and an overrun into a neighbouring tensor is reported instead of
# landing silently inside torch's pool.
#
# Fails (exit 2) when the interpreter it was given cannot import rpc_py: a sanitizer stage that
# checks nothing must not pass. Skips (exit 0) with a message when there is no GPU, no CUDA build of
# rpc_py or no compute-sanitizer (RPC_PY_CS_REQUIRE=1 turns each of those into a failure too); fails
# when either tool reports anything or a test fails.
#
# Usage: ci/compute_sanitizer.sh [pytest args]
#   default args: -q tests/test_compress_cuda.py tests/test_kvcache.py -m cuda
#   PYTHON=python3                         the interpreter that has rpc_py (default: python)
#   RPC_PY_CS_TOOLS="memcheck racecheck"   tools to run (synccheck, initcheck also work)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
REQUIRE="${RPC_PY_CS_REQUIRE:-0}"
skip() {
    if [ "$REQUIRE" = 1 ]; then echo "compute_sanitizer: FAIL ($1; RPC_PY_CS_REQUIRE=1)" >&2; exit 3; fi
    echo "compute_sanitizer: SKIP ($1)"
    exit 0
}
if ! out="$("$PY" -c 'import rpc_py, sys; print(rpc_py.__file__)' 2>&1)"; then
    echo "compute_sanitizer: FAIL: '$PY' cannot import rpc_py (set PYTHON to the interpreter it is installed in):" >&2
    echo "$out" | tail -3 >&2
    exit 2
fi
CS="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}"
if [ -z "$CS" ]; then
    for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
        if [ -n "$root" ] && [ -x "$root/bin/compute-sanitizer" ]; then CS="$root/bin/compute-sanitizer"; break; fi
    done
fi
if [ -z "$CS" ] || [ ! -x "$CS" ]; then
    skip "compute-sanitizer not found; set COMPUTE_SANITIZER or CUDA_HOME"
fi
if ! "$PY" -c 'import sys, rpc_py; sys.exit(0 if rpc_py.cuda_available() else 1)'; then
    skip "no usable CUDA device or rpc_py built without CUDA"
fi
PYBIN="$("$PY" -c 'import sys; print(sys.executable)')"
if [ "$#" -gt 0 ]; then ARGS=("$@"); else
    ARGS=(-q -p no:cacheprovider tests/test_compress_cuda.py tests/test_kvcache.py -m cuda)
fi
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in ${RPC_PY_CS_TOOLS:-memcheck racecheck}; do
    extra=()
    [ "$tool" = memcheck ] && extra=(--check-device-heap yes)
    [ "$tool" = racecheck ] && extra=(--racecheck-report all)
    echo "== compute-sanitizer --tool $tool: pytest ${ARGS[*]}"
    t0=$(date +%s)
    log="$(mktemp /tmp/rpc_py_cs_${tool}.XXXXXX.log)"
    "$CS" --tool "$tool" "${extra[@]}" --error-exitcode 86 --target-processes all --print-limit 50 \
        "$PYBIN" -m pytest "${ARGS[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    echo "   $tool: exit status $rc in $(( $(date +%s) - t0 ))s (log: $log)"
    if [ "$rc" -eq 86 ] || grep -qE "^========= (Invalid|Race|Error|Uninitialized|Barrier|Program hit)" "$log"; then
        echo "FAIL: compute-sanitizer $tool reported errors" >&2; status=1
    elif [ "$rc" -eq 5 ]; then
        echo "FAIL: no CUDA test was collected" >&2; status=1
    elif [ "$rc" -ne 0 ]; then
        echo "FAIL: tests failed under compute-sanitizer $tool (exit $rc)" >&2; status=1
    fi
done
[ "$status" -eq 0 ] && echo "OK: compute-sanitizer found nothing"
exit "$status"
