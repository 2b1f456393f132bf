#!/usr/bin/env bash
# The kernels' whole GPU check in one command: CUDA tests, then the benchmark (< 5 min on an H200).
#
# Here (CPU side, once, needs PyPI): build the mamba-ssm wheel (Triton ops only, no CUDA
# build) into .whl/, which git ignores through .git/info/exclude:
#     bash benchmarks/gpu_kernels_check.sh --prepare
# On the GPU machine (device tool: carry [".whl"]):
#     bash benchmarks/gpu_kernels_check.sh
# Logs and the benchmark's JSON line go to $OUT (or ./gpu_out when OUT is unset). About 9 minutes
# at most (tests 240 s, benchmark 330 s): run it with the device tool's timeout_s=600.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    exclude="$(git rev-parse --git-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    PY=${PYTHON:-.venv/bin/python}
    MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip wheel --no-deps --no-build-isolation \
        mamba-ssm==2.3.2.post1 -w .whl
    "$PY" -m pip download --no-deps einops -d .whl
    ls -l .whl
    exit 0
fi

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import mamba_ssm" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# a kernel that never returns (the fused SSD waits on flags) must not eat the lease: hard time limits
echo "== kernel tests on CUDA, and the engine's greedy tokens with the kernels vs its reference path"
extra=()
"$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)  # compiling dominates: spread it over the cores
timeout 240 "$PY" -m pytest -q -p no:cacheprovider "${extra[@]}" tests/kernels tests/engine/test_cuda_kernels.py \
    2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark"
timeout 330 "$PY" benchmarks/bench_kernels.py "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
tail -n 1 "$OUT/bench.log" > "$OUT/bench.json"
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
