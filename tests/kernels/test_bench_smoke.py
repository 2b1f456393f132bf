"""benchmarks/bench_kernels.py runs end to end on CPU (--cpu-smoke) and ends with one JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_kernels_cpu_smoke_ends_with_json():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--cpu-smoke", "--no-mamba"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["all_checks_ok"]
    assert {r["op"] for r in result["ops"]} >= {"ssd_scan", "state_update_bfloat16", "paged_attention_decode"}


def test_bench_cpu_attention_runs_and_reports_each_point():
    from hybridserve.kernels import cpu_attention

    if not cpu_attention.available():
        pytest.skip(f"C++ kernel not built here: {cpu_attention.why_unavailable()}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cpu_attention.py"), "--points", "1x64,2x32",
         "--repeat", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["batch"], r["context"], r["tables"]) for r in result["rows"]] == [
        (1, 64, "in order"), (1, 64, "shuffled"), (2, 32, "in order"), (2, 32, "shuffled")]
    assert all(r["kernel_ms"] > 0 and r["speedup_over_ref"] > 0 for r in result["rows"])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cpu_attention.py"), "--prefill", "--points", "64x64,16x80",
         "--repeat", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "cpu_prefill_attention"
    assert [(r["q_len"], r["context"]) for r in result["rows"]] == [(64, 64), (16, 80)]
    assert all(r["kernel_gflop_s"] > 0 and r["speedup"] > 0 for r in result["rows"])
