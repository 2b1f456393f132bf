# Two commands set up everything on a fresh machine:
#   make run   -> the gateway with a transformer and a hybrid backend (built-in models)
#   make test  -> the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-fast bench-engine bench load clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from the local wheel; never a CUDA build on CPU machines.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q triton==3.6.0
	$(BIN)/pip install -q -e '.[dev,kernels,bench]'
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
