#!/usr/bin/env bash
# ci/valgrind.sh: valgrind memcheck over tests/valgrind_smoke.py, failing on errors in rpc_py._C.
#
# A CPU-only build with debug info (-g) is made in a throw-away copy of the repository so the
# normal in-place build is untouched. Python runs with PYTHONMALLOC=malloc so every object
# allocation is visible to memcheck. CPython itself produces reports that are not ours (its own
# arena tricks, one-time allocations kept until exit), so rather than maintaining suppressions the
# script keeps only error records with a stack frame inside our shared object (rpc_py/_C*.so or a
# function from a csrc/ file): invalid reads/writes, uninitialised values, bad frees, and "definitely lost" leaks.
#
# Usage: ci/valgrind.sh            (about a minute on 2 cores)
#   RPC_PY_VALGRIND_SRC=dir  build from this tree instead of the repository (used to self-test the job)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SRC="${RPC_PY_VALGRIND_SRC:-$REPO}"
PY="${PYTHON:-python}"
command -v valgrind >/dev/null || { echo "valgrind not installed: skipping (apt-get install valgrind)"; exit 0; }
SCRATCH="$(mktemp -d /tmp/rpc_py_valgrind.XXXXXX)"
trap '[ "${RPC_PY_VALGRIND_KEEP:-0}" = 1 ] && echo "kept $SCRATCH" || rm -rf "$SCRATCH"' EXIT

mkdir -p "$SCRATCH/repo"
bash "$REPO/ci/copy_tree.sh" "$SRC" "$SCRATCH/repo"
cd "$SCRATCH/repo"
echo "== CPU-only debug build in $SCRATCH/repo"
CFLAGS="-g" RPC_PY_CUDA=0 "$PY" setup.py -q build_ext --inplace >"$SCRATCH/build.log" 2>&1 || {
    cat "$SCRATCH/build.log"; echo "build failed" >&2; exit 1; }

# Import the scratch build, not an installed (editable) rpc_py, and prove it.
export PYTHONPATH="$SCRATCH/repo${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import sys, rpc_py._C as c; f = c.__file__; print("   using", f); sys.exit(not f.startswith(sys.argv[1]))' "$SCRATCH/repo" || {
    echo "FAIL: python imports rpc_py from outside the scratch build" >&2; exit 1; }
# The real interpreter, not a wrapper (pyenv shims are shell scripts; valgrind would watch the shell).
PYBIN="$("$PY" -c 'import sys; print(sys.executable)')"
echo "== valgrind memcheck: $PYBIN tests/valgrind_smoke.py"
t0=$(date +%s)
set +e
PYTHONMALLOC=malloc OMP_NUM_THREADS=2 valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite \
    --errors-for-leak-kinds=definite --track-origins=yes --num-callers=40 --error-exitcode=0 \
    --log-file="$SCRATCH/memcheck.log" "$PYBIN" tests/valgrind_smoke.py
rc=$?
set -e
echo "   ran in $(( $(date +%s) - t0 ))s, exit status $rc"
[ "$rc" -eq 0 ] || { tail -50 "$SCRATCH/memcheck.log"; echo "FAIL: smoke script failed under valgrind" >&2; exit 1; }

"$PY" - "$SCRATCH/memcheck.log" csrc/*/*.c csrc/*/*.cu <<'PYEOF'
import os
import re
import sys

# Frames of our code: "fn (kvcache.c:705)" with debug info, "in .../rpc_py/_C....so" without.
ours_re = re.compile(r"rpc_py/_C[.]|\((%s):\d+\)" % "|".join(re.escape(os.path.basename(f)) for f in sys.argv[2:]))

text = open(sys.argv[1]).read()
# One record = consecutive "==PID== " lines between blank "==PID==" lines.
records, cur = [], []
for line in text.splitlines():
    body = re.sub(r"^==\d+== ?", "", line)
    if body.strip():
        cur.append(body)
    elif cur:
        records.append(cur)
        cur = []
if cur:
    records.append(cur)
kinds = ("Invalid read", "Invalid write", "Conditional jump", "Use of uninitialised", "Syscall param",
         "Invalid free", "Mismatched free", "definitely lost", "Source and destination overlap",
         "Argument 'size'", "uninitialised byte")
ours = [r for r in records if any(k in r[0] for k in kinds)
        and any(ours_re.search(l) for l in r)]
total = sum(1 for r in records if any(k in r[0] for k in kinds))
summary = [l for l in text.splitlines() if "ERROR SUMMARY" in l]
print(f"memcheck: {total} error records in the process, {len(ours)} with a frame in rpc_py._C")
if not summary:
    sys.exit("memcheck log has no ERROR SUMMARY: valgrind did not watch the interpreter")
print(summary[-1])
for r in ours[:20]:
    print("----")
    print("\n".join(r[:25]))
sys.exit(1 if ours else 0)
PYEOF
echo "OK: no memcheck errors in rpc_py._C"
