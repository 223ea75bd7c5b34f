#!/usr/bin/env bash
# Every check that waits for a GPU, in one run on the GPU machine (the device tool), from the
# repository root, with the wheels scripts/gpu_wheels.sh fetched carried along:
#
#   run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=540)
#
# The image's python3 holds torch with CUDA, JAX, Triton and CuPy; the rest comes from .whl.
# Logs go to $OUT (they come back): the gpu-marked tests, then the GPU benchmarks, each under
# its own time limit so one that hangs cannot take the others' time.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available())'
} 2>&1 | tee "$OUT/machine.txt"

timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/backends/test_gpu_path.py tests/backends/test_torch_backend.py \
    tests/backends/test_torch_host_gpu.py tests/backends/test_kernel.py \
    tests/backends/test_jax.py tests/backends/test_tensorrt.py \
    tests/e2e/test_shared_memory.py 2>&1 | tee "$OUT/pytest_gpu.log"

timeout 90 python3 bench/bench_residency_gpu.py --rounds 7 2>&1 | tee "$OUT/bench_residency_gpu.log"
timeout 150 python3 bench/bench_resnet50_gpu.py 2>&1 | tee "$OUT/bench_resnet50_gpu.log"
