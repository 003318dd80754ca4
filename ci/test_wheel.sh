#!/usr/bin/env bash
# ci/test_wheel.sh WHEEL [pytest args]: run the test suite against the *installed* wheel.
#
# A fresh virtual environment gets torch (the pinned CPU build on this machine's disk), the wheel with
# its `test` extra, and nothing of the checkout: the suite (tests/, notebooks/, benchmarks/, ci/*.sh,
# README.md, docs/ and the pytest settings in pyproject.toml) is copied to a scratch folder without
# rpc_py/, and python
# proves that `import rpc_py` comes from the environment's site-packages before pytest starts. The
# exit status is pytest's (5 = no test collected; .ci/run treats that as a failure).
#
# Usage: ci/test_wheel.sh dist/rpc_py-*.whl               (default pytest args: -q tests)
#   RPC_PY_TORCH=2.13.0      the torch version to install
#   RPC_PY_VENV_KEEP=1       keep the environment and the suite copy (paths are printed)
#   RPC_PY_VENV_OFFLINE=1    a machine without a package index (e.g. the GPU box): the environment
#                            sees the system's packages (torch, pytest, ...) and gets only the wheel,
#                            e.g. RPC_PY_VENV_OFFLINE=1 ci/test_wheel.sh dist/rpc_py-*.whl -q tests -m cuda
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
[ "$#" -ge 1 ] && [ -f "$1" ] || { echo "usage: ci/test_wheel.sh WHEEL [pytest args]" >&2; exit 2; }
WHEEL="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
PY="${PYTHON:-python}"
SCRATCH="$(mktemp -d /tmp/rpc_py_wheeltest.XXXXXX)"
cleanup() {
    if [ "${RPC_PY_VENV_KEEP:-0}" = 1 ]; then echo "kept $SCRATCH (venv/, suite/)"; else rm -rf "$SCRATCH"; fi
}
trap cleanup EXIT
VENV="$SCRATCH/venv"
SUITE="$SCRATCH/suite"

echo "== fresh virtual environment: $(basename "$WHEEL")"
t0=$SECONDS
if [ "${RPC_PY_VENV_OFFLINE:-0}" = 1 ]; then
    "$PY" -m venv --system-site-packages "$VENV"
else
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip install, quietly: the log is shown only when it fails (this machine's pip configuration names
# local index folders that do not all exist, and pip warns about each one).
pip_install() {
    "$VPY" -m pip install -q "$@" >"$SCRATCH/pip.log" 2>&1 || { cat "$SCRATCH/pip.log"; return 1; }
}
if [ "${RPC_PY_VENV_OFFLINE:-0}" = 1 ]; then
    pip_install --no-deps --no-index "$WHEEL"
else
    # torch first and pinned: the CPU build lies on local disk; unpinned, pip would fetch a CUDA build.
    pip_install "torch==${RPC_PY_TORCH:-2.13.0}"
    pip_install "${WHEEL}[test]" "transformers>=5.5,<6"
fi
"$VPY" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|numpy|rpc.py) " | tr -s ' ' | sed 's/^/   /' 
echo "   installed in $((SECONDS - t0)) s"

# The suite without the package: nothing here can shadow the installed rpc_py.
mkdir -p "$SUITE/benchmarks" "$SUITE/ci"
cp -r "$REPO/tests" "$REPO/notebooks" "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/docs" "$SUITE/"  # README + docs: tests/test_docs.py
cp "$REPO"/benchmarks/*.py "$REPO"/benchmarks/*.sh "$SUITE/benchmarks/"
cp "$REPO"/ci/*.sh "$SUITE/ci/"  # the scripts whose behaviour tests/test_ci_scripts.py checks
find "$SUITE" -name __pycache__ -prune -exec rm -rf {} +
cd "$SUITE"
"$VPY" - "$VENV" <<'PYEOF'
import os
import sys

import rpc_py

where = os.path.realpath(rpc_py._C.__file__)
print(f"   rpc_py {rpc_py.__version__} from {where}")
print(f"   backend_features: {sorted(rpc_py.backend_features)}")
if not where.startswith(os.path.realpath(sys.argv[1]) + os.sep):
    sys.exit("FAIL: rpc_py is not imported from the fresh environment's site-packages")
PYEOF

if [ "$#" -eq 0 ]; then set -- -q tests; fi
echo "== python -m pytest $* (in $SUITE, against the installed wheel)"
set +e
"$VPY" -m pytest "$@"
rc=$?
set -e
exit "$rc"
