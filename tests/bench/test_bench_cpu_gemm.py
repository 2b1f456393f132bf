"""benchmarks/bench_cpu_gemm.py runs on tiny shapes and prints a figure per product and row count."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridserve.kernels import cpu_gemm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not cpu_gemm.available(), reason="the C++ panel kernel cannot be built here")
def test_bench_cpu_gemm_prints_both_products_per_row_count():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_gemm.py"), "--shapes", "40x24,16x8",
                          "--rows", "1,3", "--repeat", "2"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["shape"] for r in res["rows"]] == ["40x24", "16x8"]
    for r in res["rows"]:
        assert set(r) == {"shape", "mb", "sum_gbs", "rows1", "rows3"}
        assert all(r[k]["onednn_gbs"] > 0 and r[k]["panel_gbs"] > 0 for k in ("rows1", "rows3"))
