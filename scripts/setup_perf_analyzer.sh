#!/usr/bin/env bash
# Install Triton's perf_analyzer into its own virtualenv (idempotent).
#
#   scripts/setup_perf_analyzer.sh            # -> .venv-pa (override with PA_VENV=/path)
#   scripts/perf_analyzer --help              # wrapper that sets LD_LIBRARY_PATH
#
# Why this exact recipe:
#   * tritonclient[all]==2.51.0 is the newest wheel whose bundled perf_analyzer binary runs on
#     Debian 12's glibc 2.36 (2.52..2.60 need glibc 2.38; >= 2.61 no longer ship the binary; the
#     PyPI "perf-analyzer" package is a placeholder).
#   * The binary links libcudart.so.12 even without a GPU -> pip nvidia-cuda-runtime-cu12.
#   * It links libb64.so.0d -> Debian package libb64-0d.
#   * tritonclient 2.51 pins numpy<2 / protobuf<5, so it must not share the project's venv.
# Env: PA_VENV (venv path), PYTHON (interpreter used to create it; default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PA_VENV:-$ROOT/.venv-pa}
PYTHON=${PYTHON:-python3}
PIP_PKGS=('tritonclient[all]==2.51.0' 'nvidia-cuda-runtime-cu12')

log() { printf '[setup_perf_analyzer] %s\n' "$*"; }

# 1. Debian libb64 (needed by the perf_analyzer binary).
if ldconfig -p | grep -q 'libb64\.so'; then
  log "libb64 present"
elif [ "$(id -u)" = 0 ]; then
  log "installing libb64-0d via apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q libb64-0d >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q libb64-0d >/dev/null
  }
else
  log "libb64 missing and not running as root: run 'sudo apt-get install -y libb64-0d'" >&2
  log "(continuing; perf_analyzer will fail to start until it is installed)" >&2
fi

# 2. The virtualenv and its packages (pip skips what is already satisfied).
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip show -q tritonclient nvidia-cuda-runtime-cu12 >/dev/null 2>&1 \
   || [ "$("$VENV/bin/python" -m pip show tritonclient 2>/dev/null | sed -n 's/^Version: //p')" != 2.51.0 ]; then
  log "pip install ${PIP_PKGS[*]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PKGS[@]}"
else
  log "python packages already installed"
fi

# 3. Verify through the wrapper (it locates the binary and the cudart dir itself).
out=$(PA_VENV="$VENV" "$ROOT/scripts/perf_analyzer" --help 2>&1) && rc=0 || rc=$?
if printf '%s' "$out" | grep -q -- '--concurrency-range'; then
  log "OK: perf_analyzer runs (wrapper: $ROOT/scripts/perf_analyzer, --help rc=$rc)"
else
  log "FAILED: perf_analyzer --help (rc=$rc):" >&2
  printf '%s\n' "$out" | tail -20 >&2
  exit 1
fi
