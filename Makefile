# Two commands on a fresh machine with Python >= 3.11 and make:
#   make serve   - install into .venv and serve the bundled demo models (HTTP 8000, gRPC 8001)
#   make test    - install the test dependencies (and perf_analyzer), run the whole suite and
#                  report coverage (failing under the floor in pyproject.toml)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
SERVE_ARGS ?=
# pytest-xdist workers for `make test` (one per core; each test file stays on one worker)
TEST_WORKERS ?= auto
# Installed on its own line, exactly pinned: this version has a local CPU wheel on our machines.
TORCH_PIN ?= torch==2.13.0

.PHONY: serve test fuzz install install-test perf-analyzer browser kserve lint bench demo-models clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[onnx]'
	$(PIP) $(TORCH_PIN)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[onnx,test]' mypy
	$(PIP) $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# COMPILED=1: serve the request path compiled by mypyc (scripts/compile.sh; needs a C compiler)
COMPILED ?= 0
serve: install
ifeq ($(COMPILED),1)
	$(PIP) mypy
	PYTHON=$(BIN)/python scripts/compile.sh build/compiled
	PYTHONPATH=build/compiled $(BIN)/kernelport serve $(SERVE_ARGS)
else
	$(BIN)/kernelport serve $(SERVE_ARGS)
endif

perf-analyzer:
	PYTHON=$(PYTHON) scripts/setup_perf_analyzer.sh

# KServe's own generated models, to check the ServingRuntime against (tests/deploy): a venv of
# its own, since kserve pins an older psutil than Ray needs.
KSERVE_VENV ?= .venv-kserve
kserve: $(KSERVE_VENV)/.installed

$(KSERVE_VENV)/.installed:
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q --disable-pip-version-check kserve==0.21.0
	touch $@

# Headless Chromium for the check that `kernelport bench`'s page renders: the system's package
# (Debian's chromium), installed when it is missing and apt is there to do it.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ command -v apt-get >/dev/null && \
	  { apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update >/dev/null 2>&1 && \
	      apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	echo "browser: could not install chromium (the headless page check will skip)"

# Reports line coverage of src/kernelport; fails under [tool.coverage.report] fail_under.
# The tests that reach a real server's gRPC port run again on the other gRPC transports
# (--grpc-transport; the first pass uses the default, auto: the HTTP/2 server on the event
# loop): all of them inside Envoy, whose process hosts the framework runtimes too; the
# protocol-facing ones on grpcio.
GRPC_TRANSPORT_TESTS ?= tests/e2e tests/batching/test_batching_e2e.py \
	tests/protocols/test_stream_errors.py tests/security/test_limits.py tests/security/test_tls.py \
	tests/security/test_auth.py tests/security/test_shutdown.py \
	tests/observability/test_health_and_drain.py tests/lifecycle/test_model_control.py \
	tests/backends/test_openvino.py tests/backends/test_tensorflow.py tests/backends/test_jax.py \
	tests/backends/test_pipeline_backend.py tests/backends/test_kernel.py \
	tests/backends/test_stablehlo.py \
	tests/cluster/test_ray_cluster_e2e.py tests/cluster/test_ray_netns_e2e.py
GRPCIO_TESTS ?= tests/e2e tests/protocols/test_stream_errors.py tests/security/test_limits.py \
	tests/security/test_tls.py tests/security/test_auth.py tests/security/test_shutdown.py \
	tests/observability/test_health_and_drain.py

test: install-test perf-analyzer browser kserve
	KERNELPORT_REQUIRE_PERF_ANALYZER=1 KSERVE_PYTHON=$(KSERVE_VENV)/bin/python $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--cov=kernelport --cov-report=term
	KERNELPORT_GRPC_TRANSPORT=envoy KERNELPORT_REQUIRE_PERF_ANALYZER=1 \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -p no:cacheprovider \
		$(GRPC_TRANSPORT_TESTS)
	KERNELPORT_GRPC_TRANSPORT=grpcio KERNELPORT_REQUIRE_PERF_ANALYZER=1 \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -p no:cacheprovider \
		$(GRPCIO_TESTS)
	@if command -v cc >/dev/null || command -v gcc >/dev/null; then \
		PYTHON=$(BIN)/python scripts/compile.sh build/compiled && \
		KERNELPORT_EXPECT_COMPILED=1 KERNELPORT_REQUIRE_PERF_ANALYZER=1 PYTHONPATH=build/compiled \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -p no:cacheprovider \
		$(COMPILED_TESTS); \
	else echo "make test: no C compiler, so the compiled request path is not tested"; fi

# The request path compiled by mypyc (scripts/compile.sh, kernelport/native.py): the tests of
# those modules and of the front ends, run a third time from the compiled copy.
COMPILED_TESTS ?= tests/test_native.py tests/core tests/protocols tests/batching \
	tests/e2e/test_conformance.py tests/e2e/test_errors.py tests/e2e/test_perf_analyzer.py \
	tests/e2e/test_datatypes.py tests/e2e/test_triton_requests_e2e.py tests/e2e/test_shared_memory.py

# The fuzz suite with a large, random budget (make test runs it small and derandomized).
FUZZ_EXAMPLES ?= 2000
fuzz: install-test
	KERNELPORT_FUZZ_PROFILE=deep KERNELPORT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(BIN)/python -m pytest -q tests/fuzz

lint: install-test
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/python -m mypy

bench: install-test perf-analyzer
	$(BIN)/python bench/bench_server.py

demo-models: install-test
	$(BIN)/python scripts/make_demo_models.py

clean:
	rm -rf $(VENV) .venv-pa $(KSERVE_VENV) build dist src/*.egg-info .pytest_cache
