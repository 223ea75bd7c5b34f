#!/usr/bin/env bash
# Every check that waits for a GPU, in one run on the GPU machine (the device tool), from the
# repository root, with the wheels scripts/gpu_wheels.sh fetched carried along:
#
#   run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=540)
#
# With test paths as arguments it runs the gpu-marked tests of those files alone, no benchmarks
# (a rerun of what failed).
# The image's python3 holds torch with CUDA, JAX, Triton and CuPy; the rest comes from .whl.
# Logs go to $OUT (they come back): the gpu-marked tests, then the GPU benchmarks, each under
# its own time limit so one that hangs cannot take the others' time. Warnings are not errors
# here (the image's library versions are not the ones CI pins), and Helion tunes with its
# "quick" effort so that tuning fits the run.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
install() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$@"
}
install .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
# Helion follows torch's private APIs closely: where the carried release does not import
# against the image's torch, try the older ones gpu_wheels.sh put in .whl/helion/.
for older in $(ls -r .whl/helion/*.whl 2>/dev/null); do
    python3 -c 'import helion.autotuner.logger' 2>/dev/null && break
    echo "helion does not import here; trying $(basename "$older")"
    install "$older" >/dev/null
done
export HELION_AUTOTUNE_EFFORT=quick
stamp() { echo "== $(date +%T) $*"; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
        torch.version.cuda, torch.cuda.is_available())'
    python3 -m pip list 2>/dev/null | grep -Ei '^(jax|jaxlib|triton|cupy|cuda-bindings|onnxruntime|nvidia-ml-py|numpy) '
} 2>&1 | tee "$OUT/machine.txt"

TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
    TESTS=(tests/backends/test_gpu_path.py tests/backends/test_torch_backend.py
        tests/backends/test_torch_host_gpu.py tests/backends/test_kernel.py
        tests/backends/test_jax.py tests/backends/test_tensorrt.py tests/backends/test_tensorflow.py
        tests/e2e/test_shared_memory.py tests/e2e/test_shm_frontends_e2e.py)
fi
stamp "pytest -m gpu" | tee "$OUT/pytest_gpu.log"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rA -n 4 --dist loadfile \
    -W default --timeout 200 "${TESTS[@]}" 2>&1 | tee -a "$OUT/pytest_gpu.log"
[ $# -gt 0 ] && exit 0

# ResNet-50 fp16: bare PyTorch, then the server with the instances in its process and in a
# worker process (what decides the GPU default of execution mode `auto`)
stamp "bench_resnet50_gpu" | tee "$OUT/bench_resnet50_gpu.log"
timeout 200 python3 bench/bench_resnet50_gpu.py --execution in_process,worker --duration 4 \
    --batch-sizes 1,8,64,256 --client-batch-sizes 1,64 --concurrency 1,32 \
    2>&1 | tee -a "$OUT/bench_resnet50_gpu.log"

stamp "bench_residency_gpu" | tee "$OUT/bench_residency_gpu.log"
timeout 60 python3 bench/bench_residency_gpu.py --rounds 5 2>&1 | tee -a "$OUT/bench_residency_gpu.log"
cp bench/out/resnet50-*.json "$OUT/" 2>/dev/null
stamp "done"
