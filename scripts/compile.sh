#!/usr/bin/env bash
# Build a copy of the kernelport package with its request-path modules compiled by mypyc
# (the list: src/kernelport/native.py), in DIR (default build/compiled). Serve from it with
#   PYTHONPATH=DIR kernelport serve ...
# Needs mypy (it ships mypyc) and a C compiler; the source tree is left untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-build/compiled}
PY=$(command -v "${PYTHON:-.venv/bin/python}" || true)
PY=$(realpath -s "${PY:-.venv/bin/python}")
rm -rf "$DIR"
mkdir -p "$DIR"
cp -r src/kernelport "$DIR/kernelport"
find "$DIR" -name __pycache__ -prune -exec rm -rf {} +
mapfile -t FILES < <(PYTHONPATH=src "$PY" -c '
from kernelport.native import MODULES
for name in MODULES:
    print(name.replace(".", "/") + ".py")')
# mypyc writes the extensions next to the copies (and its shared runtime at the top).
(cd "$DIR" && "$PY" -m mypyc --ignore-missing-imports "${FILES[@]}" >build.log 2>&1) || {
    tail -40 "$DIR/build.log" >&2
    echo "compile.sh: mypyc failed (log: $DIR/build.log)" >&2
    exit 1
}
rm -rf "$DIR/build" "$DIR/build.log"
for f in "${FILES[@]}"; do
    ls "$DIR/${f%.py}".*.so >/dev/null
done
echo "compiled ${#FILES[@]} modules into $DIR (serve with PYTHONPATH=$DIR)"
