# The two commands of the README: `make serve` and `make test`. Both build .venv first on a
# fresh machine (python3 + pip only), installing the exact versions of constraints.txt.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 3000
SAMPLE := training/sample_data
# Longer than the 15 s that BentoML's internal client keeps idle connections (BentoML issue #4971).
KEEP_ALIVE_S ?= 30
export BENTOML_DO_NOT_TRACK := True

.PHONY: serve test install demo-zoo clean bench bench-peers perf-analyzer perf-analyzer-tool loadtest bento bento-gpu deploy-check serving-requirements fuzz soak audit gpu-wheels gpu-check-dry

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 resolves to the CPU build on this machine's disk (an unpinned torch pulls CUDA wheels).
$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Only when models/zoo holds no bundle: small demo models from the committed sample data.
demo-zoo: install
	@if ls models/zoo/*/manifest.json >/dev/null 2>&1; then :; else \
	  echo "models/zoo is empty: training demo models from $(SAMPLE) (a few minutes)"; \
	  $(BIN)/python -m training train --data $(SAMPLE)/trec.txt --format trec --epochs 5 --out checkpoints/demo-trec6.pt && \
	  $(BIN)/python -m training export --checkpoint checkpoints/demo-trec6.pt --data $(SAMPLE)/trec.txt --format trec --bundle models/zoo/kim-cnn-trec6 && \
	  $(BIN)/python -m training train --data $(SAMPLE)/mr --format mr --epochs 5 --out checkpoints/demo-mr.pt && \
	  $(BIN)/python -m training export --checkpoint checkpoints/demo-mr.pt --data $(SAMPLE)/mr --format mr --bundle models/zoo/kim-cnn-mr; \
	fi

GRPC_PORT ?= 8001
serve: demo-zoo
	$(BIN)/python -m services.backends.model_store
	@echo "textserve on http://$(HOST):$(PORT)  (API docs: http://$(HOST):$(PORT)/ , metrics: /metrics; OIP v2 gRPC on $(HOST):$(GRPC_PORT))"
	@if [ -z "$$TEXTSERVE_API_KEYS$$TEXTSERVE_ADMIN_KEYS" ]; then echo "unauthenticated: no TEXTSERVE_API_KEYS set, every route is open to anyone who can reach the port"; fi
	TEXTSERVE_GRPC_HOST=$(HOST) TEXTSERVE_GRPC_PORT=$${TEXTSERVE_GRPC_PORT:-$(GRPC_PORT)} \
	  $(BIN)/bentoml serve services.service:TextService --host $(HOST) --port $(PORT) --timeout-keep-alive $(KEEP_ALIVE_S)

# checkov (the Kubernetes policy scan of tests/test_deploy.py) lives in its own venv: its pins
# are not the service's. Debian's prometheus (promtool, the server) and wrk come from apt
# (.ci/run installs them); kubectl with kustomize is on this machine image.
TOOLS := .venv-tools
# perf_analyzer, for its test and make perf-analyzer (below)
PERF_ANALYZER := .perf-analyzer/installed.json
$(TOOLS)/.installed: deploy/tools-constraints.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet -c deploy/tools-constraints.txt checkov
	touch $@

test: install $(TOOLS)/.installed $(PERF_ANALYZER)
	$(BIN)/python -m pytest -q

# Triton's perf_analyzer, and where glibc is older than its 2.38 Debian 13's loader and
# libraries, unpacked into .perf-analyzer (loadtests/perf_analyzer.py; nothing system-wide).
$(PERF_ANALYZER): | $(VENV)/.installed
	$(BIN)/python -m loadtests.perf_analyzer --install
perf-analyzer-tool: $(PERF_ANALYZER)

# perf_analyzer against the service over HTTP and gRPC, beside wrk, for a text classifier, the
# language model's scoring and the image model. PERF_ANALYZER_ARGS=... passes options.
perf-analyzer: $(VENV)/.bench-installed $(PERF_ANALYZER)
	$(BIN)/python -m services.backends.model_store
	$(BIN)/python -m loadtests.perf_analyzer $(PERF_ANALYZER_ARGS)

# The bento: the service, the zoo's models as the store holds them and the pinned serving
# packages (deploy/bentofile.yaml), built offline. bentoml containerize turns it into an image
# (docs/deploy.md). BENTOML_HOME=... builds into another store.
bento: install
	$(BIN)/python -m services.backends.model_store
	$(BIN)/bentoml build -f deploy/bentofile.yaml .

bento-gpu: install
	$(BIN)/python -m services.backends.model_store
	$(BIN)/bentoml build -f deploy/bentofile-gpu.yaml .

# The lent GPU machine (docs/gpu.md). gpu-wheels: the serving stack for CPython 3.12 (onnxruntime-gpu,
# BentoML, wrk) from deploy/gpu/wheels.json into .gpu-wheels/parts, in parts that travel one per call,
# joined and checked here. gpu-check-dry: the prepared GPU check on this CPU (a tiny LM for a few
# steps, the serving check in short, the wheel lock checked and the parts built from it in small,
# each call's payload computed); make test runs it too.
gpu-wheels: install
	$(BIN)/python -m deploy.gpu.wheels build

gpu-check-dry: install
	$(BIN)/python -m deploy.gpu.wheels check
	$(BIN)/python -m deploy.gpu.payload plan
	$(BIN)/python -m pytest -q tests/test_gpu_check.py

# Only the deployment checks of make test: manifests, schemas, policy scan, rules, a real
# Prometheus, the bento and the SIGTERM drain.
deploy-check: install $(TOOLS)/.installed
	$(BIN)/python -m pytest -q tests/test_deploy.py tests/test_deploy_monitoring.py tests/test_bento.py tests/test_drain.py tests/test_training_job.py

# Schemathesis over the OpenAPI document with 100 examples per operation and phase (over a
# thousand requests; make test runs 20), against a fresh server: no 5xx, every error a message.
fuzz: install
	TEXTSERVE_FUZZ_EXAMPLES=100 $(BIN)/python -m pytest -q -s tests/test_fuzz.py

# The mixed Locust workload for SOAK_MINUTES (30) against a fresh service: fails if the server's
# RSS grows over 5 % after the warm-up, its open files keep growing, or any answer is a 5xx or
# missing. Writes loadtests/results/soak/ (soak.csv, summary.json, soak.png). SOAK_ARGS=... for options.
SOAK_MINUTES ?= 30
soak: $(VENV)/.bench-installed
	$(BIN)/python -m services.backends.model_store
	$(BIN)/python -m loadtests.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# Known vulnerabilities in the pinned dependencies (pip-audit over constraints.txt and the
# serving closure). Needs PyPI's vulnerability service (per-version JSON) or OSV (-s osv).
audit: install
	$(BIN)/pip-audit -r constraints.txt --no-deps --disable-pip --progress-spinner off
	$(BIN)/pip-audit -r deploy/requirements-serving.txt --no-deps --disable-pip --progress-spinner off

# deploy/requirements-serving.txt (and -gpu.txt, with CUDA 13's wheels), after a change to constraints.txt.
serving-requirements: install
	$(BIN)/python deploy/pin_serving_requirements.py > deploy/requirements-serving.txt
	$(BIN)/python deploy/pin_serving_requirements.py --gpu > deploy/requirements-serving-gpu.txt

# Side by side, one run: onnxruntime in process, torch eager, the service, a hand-rolled
# FastAPI server and the peers (mosec, LitServe, PyTriton) over HTTP under wrk, two rounds
# (docs/performance.md). BENCH_ARGS=... passes options, e.g. BENCH_ARGS="--systems service,mosec
# --seconds 3 --rounds 1". The load generator is Debian's wrk; plots need matplotlib.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	touch $@

# Each peer in a virtualenv of its own, from its pinned loadtests/peers/requirements-NAME.txt
# (its pins are not the service's: PyTriton needs numpy < 2); the project's code reaches it
# through PYTHONPATH, so nothing of the peers enters the service's dependencies.
BENCH_PEERS := mosec litserve pytriton
.venv-bench-%/.installed: loadtests/peers/requirements-%.txt
	$(PYTHON) -m venv .venv-bench-$*
	.venv-bench-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-bench-$*/bin/python -m pip install --quiet -r $<
	touch $@

bench-peers: $(foreach peer,$(BENCH_PEERS),.venv-bench-$(peer)/.installed)

# Then gRPC beside HTTP on the service (loadtests/bench_grpc.py; h2load from Debian's nghttp2-client).
bench: $(VENV)/.bench-installed bench-peers
	@command -v wrk >/dev/null && command -v h2load >/dev/null || { echo "installing wrk and h2load (Debian packages)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq wrk nghttp2-client || (apt-get update -qq && apt-get install -y -qq wrk nghttp2-client); \
	  else sudo apt-get install -y -qq wrk nghttp2-client; fi; }
	$(BIN)/python -m services.backends.model_store
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)
	$(BIN)/python -m loadtests.bench_grpc $(BENCH_GRPC_ARGS)

# Locust's mixed workload against a fresh service, headless, gated on the SLO (exit code).
# LOADTEST_ARGS=... passes options, e.g. LOADTEST_ARGS="--shape spike --users 128".
loadtest: $(VENV)/.bench-installed
	$(BIN)/python -m services.backends.model_store
	$(BIN)/python -m loadtests.run_loadtest $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) checkpoints .pytest_cache
