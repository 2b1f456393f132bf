"""`hybridserve bench --url`: the same figures measured over HTTP from a live native worker."""
import sys

import yaml

from hybridserve.bench.harness import BenchOptions, run_bench
from hybridserve.config import parse_config
from tests.serving.conftest import free_port, http_ok, log_tail, spawn, stop_process, wait_until


def test_bench_over_http_against_a_live_worker(tmp_path):
    port = free_port()
    cfg = {"gateway": {"auth": "disabled"}, "backends": [
        {"name": "tiny-h", "arch": "hybrid", "checkpoint": "builtin:tiny-hybrid", "price_per_hour": 0.5,
         "max_context": 1024, "port": port, "native": {"cache_memory_gb": 0.05}}]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "worker.log"
    proc = spawn([sys.executable, "-m", "hybridserve.cli", "worker", "--config", str(path), "--backend", "tiny-h",
                  "--port", str(port)], log)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 120, "worker health")
        opts = BenchOptions(contexts=[32, 96], concurrency=[1, 3], new_tokens=6, out=str(tmp_path / "out"),
                            url=f"http://127.0.0.1:{port}")
        summary = run_bench(parse_config(cfg), opts, say=lambda s: None)
    except Exception:
        print(log_tail(log))
        raise
    finally:
        stop_process(proc)
    assert summary["points"] == 4
    import json

    points = json.loads((tmp_path / "out" / "points.json").read_text())
    for p in points:
        assert p["decode_tok_s"] > 0 and p["ttft_p50_s"] > 0 and p["tpot_p50_s"] > 0
        assert p["cache_bytes_per_seq"] > 0 and p["usd_per_1m_output"] > 0
        assert p["mean_generated_per_seq"] == 6  # every token counted, none lost in the stream
