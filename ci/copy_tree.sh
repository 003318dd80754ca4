#!/usr/bin/env bash
# ci/copy_tree.sh SRC DEST: copy a source tree for a throw-away build (sanitizer, valgrind jobs).
# In a git checkout: tracked files plus untracked, non-ignored ones (paths listed by git but deleted
# from the work tree are skipped), so local build products never leak into the copy. Elsewhere: the
# whole folder minus build products.
set -euo pipefail
SRC="$1"
DEST="$2"
mkdir -p "$DEST"
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard | \
        xargs -0 -I{} sh -c 'test -e "$1" && printf "%s\0" "$1"' _ {} | \
        tar --null -T - -cf -) | tar -C "$DEST" -xf -
else
    (cd "$SRC" && tar --exclude=build --exclude='*.so' --exclude='*.o' --exclude=__pycache__ -cf - .) | \
        tar -C "$DEST" -xf -
fi
