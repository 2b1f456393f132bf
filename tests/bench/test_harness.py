"""`hybridserve bench`: every output on the tiny pair, exact cache bytes, $/token formula, resume."""
import csv
import json
import subprocess
import sys

import pytest

from hybridserve.bench.harness import BenchOptions, run_bench
from hybridserve.bench.measure import RequestTrace, summarize
from hybridserve.config import parse_config
from hybridserve.models.builtin import builtin_config
from hybridserve.models.memory import cache_bytes_per_seq, max_concurrency
from hybridserve.models.registry import model_args
from hybridserve.router.economics import crossover_context, load_profile, usd_per_million

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"backends": [
    {"name": "tiny-t", "arch": "transformer", "checkpoint": "builtin:tiny-transformer", "price_per_hour": 0.5,
     "max_context": 1024, "native": {"cache_memory_gb": 0.05}},
    {"name": "tiny-h", "arch": "hybrid", "checkpoint": "builtin:tiny-hybrid", "price_per_hour": 0.5,
     "max_context": 1024, "native": {"cache_memory_gb": 0.05}}]}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = run_bench(parse_config(TINY), BenchOptions.quick(out=str(out)), say=lambda s: None)
    return out, summary


def test_quick_run_writes_every_output(quick_run):
    out, summary = quick_run
    for name in ["points.json", "points.csv", "points.jsonl", "report.md", "summary.json",
                 "economics_profile.json", "decode_tok_s.png", "cache_bytes_per_seq.png",
                 "usd_per_1m_output.png", "max_concurrency.png"]:
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 5000, png
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert len(rows) == 2 * 3 * 2 and {r["backend"] for r in rows} == {"tiny-t", "tiny-h"}
    assert all(float(r["decode_tok_s"]) > 0 and float(r["ttft_p50_s"]) > 0 for r in rows)
    profile = load_profile(out / "economics_profile.json")
    assert set(profile["backends"]) == {"tiny-t", "tiny-h"}
    assert len(profile["backends"]["tiny-h"]["points"]) == 6
    assert "tiny-h" in (out / "report.md").read_text()


def test_cache_bytes_match_the_config_formula(quick_run):
    out, _ = quick_run
    for r in json.loads((out / "points.json").read_text()):
        cfg = builtin_config("tiny-transformer" if r["arch"] == "transformer" else "tiny-hybrid")
        attn = cfg["layer_types"].count("attention")
        mamba = cfg["layer_types"].count("mamba")
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        tokens = r["context"] + r["new_tokens"]
        expected = attn * 2 * cfg["num_key_value_heads"] * head_dim * 4 * tokens
        conv_dim = cfg["mamba_n_heads"] * cfg["mamba_d_head"] + 2 * cfg["mamba_n_groups"] * cfg["mamba_d_state"]
        expected += mamba * (conv_dim * (cfg["mamba_d_conv"] - 1) + cfg["mamba_n_heads"] * cfg["mamba_d_head"]
                             * cfg["mamba_d_state"]) * 4
        assert r["cache_bytes_per_seq"] == expected
        assert r["max_concurrency"] == r["memory_budget_bytes"] // expected


def test_transformer_cache_is_linear_hybrid_grows_only_by_attention():
    t, h = model_args(builtin_config("small-transformer")), model_args(builtin_config("small-hybrid"))
    ctxs = [512, 2048, 8192, 32768]
    tb = [cache_bytes_per_seq(t, c) for c in ctxs]
    hb = [cache_bytes_per_seq(h, c) for c in ctxs]
    assert all(b / c == tb[0] / ctxs[0] for b, c in zip(tb, ctxs))  # exactly proportional
    slope = (hb[-1] - hb[0]) / (ctxs[-1] - ctxs[0])
    assert slope == 2 * 2 * 2 * 64 * 4  # 2 attention layers x K,V x 2 kv heads x 64 dims x 4 bytes
    assert hb[0] - slope * ctxs[0] > 0  # the fixed Mamba state
    # the design target at 8192: hybrid <= 30 % of the transformer's cache, >= 3x the concurrency
    assert hb[2] <= 0.30 * tb[2]
    budget = 2**30
    assert max_concurrency(budget, hb[2]) >= 3 * max_concurrency(budget, tb[2])


def test_dollars_per_million_formula():
    traces = [RequestTrace(100, 0.0, [1.0, 1.5, 2.0, 2.5]), RequestTrace(100, 0.0, [0.5, 1.25, 2.0, 2.75])]
    fig = summarize(traces, price_per_hour=3.6, cache_bytes_per_seq=10, budget_bytes=100, peak_rss_mb=None)
    assert fig["prefill_tok_s"] == 200 / 1.0  # prefill ends at the last first token
    assert fig["decode_tok_s"] == 6 / 1.75  # 6 tokens after t=1.0, until t=2.75
    assert fig["usd_per_1m_output"] == pytest.approx(3.6 / 3600 / fig["decode_tok_s"] * 1e6)
    assert fig["usd_per_1m_input"] == pytest.approx(3.6 / 3600 / 200 * 1e6)
    assert fig["max_concurrency"] == 10
    assert usd_per_million(1.0, 0) is None


def test_crossover_context():
    a = [{"context": c, "usd_per_1m_output": v} for c, v in [(512, 1.0), (1024, 2.0), (2048, 4.0), (4096, 8.0)]]
    b = [{"context": c, "usd_per_1m_output": v} for c, v in [(512, 1.5), (1024, 2.5), (2048, 3.0), (4096, 3.5)]]
    assert crossover_context(a, b) == 2048
    assert crossover_context(b, a) is None


def test_resume_skips_finished_points(quick_run, tmp_path):
    out, _ = quick_run
    before = (out / "points.jsonl").read_text()
    cmd = [sys.executable, "-c", "import sys, json; from hybridserve.bench.harness import *; "
           "from hybridserve.config import parse_config; "
           f"run_bench(parse_config({TINY!r}), BenchOptions.quick(out={str(out)!r}), say=lambda s: None); "
           "print('ok')"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "points.jsonl").read_text() == before  # nothing re-measured
    assert proc.stdout.strip().endswith("ok") and (out / "report.md").exists()


def test_repeat_alternates_rounds_and_reports_median_and_spread(tmp_path):
    said = []
    opts = BenchOptions(contexts=[64, 128], concurrency=[1], new_tokens=4, out=str(tmp_path), repeat=3)
    summary = run_bench(parse_config(TINY), opts, say=said.append)
    rounds = json.loads((tmp_path / "rounds.json").read_text())
    assert len(rounds) == 3 * 2 * 2 and len(said) == 12
    order = [[r["backend"] for r in rounds if r["round"] == i][0] for i in range(3)]
    assert order == ["tiny-t", "tiny-h", "tiny-t"], "each round starts with the other backend"
    points = json.loads((tmp_path / "points.json").read_text())
    assert len(points) == 4 and all(p["rounds"] == 3 for p in points)
    for p in points:
        runs = [r["decode_tok_s"] for r in rounds if r["backend"] == p["backend"] and r["context"] == p["context"]]
        assert p["decode_tok_s"] == sorted(runs)[1]
        assert (p["decode_tok_s_min"], p["decode_tok_s_max"]) == (min(runs), max(runs))
        assert p["decode_tok_s_spread"] == pytest.approx((max(runs) - min(runs)) / sorted(runs)[1])
    assert summary["rounds"] == 3 and set(summary["crossover_intervals"]) == {"1"}
    iv = summary["crossover_intervals"]["1"]
    assert len(iv["per_round"]) == 3
    assert "(±" in (tmp_path / "report.md").read_text()
    assert "decode_tok_s_spread" in (tmp_path / "points.csv").read_text().splitlines()[0]
    again = []
    run_bench(parse_config(TINY), opts, say=again.append)
    assert again == [], "a rerun resumes every round from points.jsonl"


def test_aggregate_takes_medians_and_the_crossover_interval_of_each_round():
    from hybridserve.bench.report import aggregate, crossover_intervals

    def rec(backend, arch, ctx, rnd, usd):
        key = f"{backend}|x|{ctx}|1|4" + (f"|r{rnd}" if rnd else "")
        return {"key": key, "backend": backend, "arch": arch, "context": ctx, "concurrency": 1, "round": rnd,
                "usd_per_1m_output": usd, "decode_tok_s": 100.0 / usd, "fits_budget": True}
    rounds = []
    for rnd, (t_usd, h_usd) in enumerate([((1.0, 2.0), (1.5, 1.5)), ((1.0, 2.0), (0.9, 1.5)), ((1.0, 2.0), (1.2, 1.9))]):
        for ctx, t, h in zip((512, 4096), t_usd, h_usd):
            rounds += [rec("t", "transformer", ctx, rnd, t), rec("h", "hybrid", ctx, rnd, h)]
    pts = {(p["backend"], p["context"]): p for p in aggregate(rounds)}
    assert pts[("h", 512)]["usd_per_1m_output"] == 1.2 and pts[("h", 512)]["rounds"] == 3
    assert pts[("h", 512)]["usd_per_1m_output_spread"] == pytest.approx(0.5)
    assert pts[("t", 512)]["usd_per_1m_output_spread"] == 0.0
    assert pts[("h", 512)]["fits_budget"] is True
    iv = crossover_intervals(rounds)["1"]
    assert iv["per_round"] == [crossover_context([r for r in rounds if r["round"] == i and r["backend"] == "t"],
                                                 [r for r in rounds if r["round"] == i and r["backend"] == "h"])
                               for i in range(3)]
    assert iv["low"] == min(x for x in iv["per_round"] if x) and iv["high"] == max(x for x in iv["per_round"] if x)
