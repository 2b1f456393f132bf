"""benchmarks/bench_vllm.py's own logic: contexts fitted to each model's limit, and the best
of alternating rounds. (Its end-to-end run needs vLLM's venv and minutes; these parts do not.)"""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vllm.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vllm_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_contexts_are_capped_at_the_models_own_limit(bench):
    fitted = bench.fit_contexts([512, 2048, 8192], limit=8192, new_tokens=32)
    assert fitted == {512: 512, 2048: 2048, 8192: 8192 - 32 - 16}
    assert bench.fit_contexts([512, 8192], limit=16384, new_tokens=32) == {512: 512, 8192: 8192}
    with pytest.raises(ValueError):
        bench.fit_contexts([512], limit=40, new_tokens=32)


def test_the_real_models_limit_is_read_from_its_config(bench):
    assert bench.model_limit("smollm2-135m-instruct") == 8192
    assert bench.model_limit("small-hybrid") == 16384


def test_best_of_takes_each_metric_from_its_best_round_and_survives_a_failed_round(bench):
    r1 = [{"context": 512, "requested_context": 512, "concurrency": 1, "decode_tok_s": 50.0, "ttft_p50_s": 0.30},
          {"context": 8144, "requested_context": 8192, "concurrency": 8, "decode_tok_s": None,
           "ttft_p50_s": None, "error": "HTTPStatusError: 400"}]
    r2 = [{"context": 512, "requested_context": 512, "concurrency": 1, "decode_tok_s": 47.0, "ttft_p50_s": 0.28},
          {"context": 8144, "requested_context": 8192, "concurrency": 8, "decode_tok_s": 40.0, "ttft_p50_s": 9.0}]
    best = bench.best_of([r1, r2])
    assert (best[0]["decode_tok_s"], best[0]["ttft_p50_s"]) == (50.0, 0.28)
    assert (best[1]["decode_tok_s"], best[1]["ttft_p50_s"]) == (40.0, 9.0)
    assert best[1]["requested_context"] == 8192 and best[1]["errors"] == ["HTTPStatusError: 400"]
    assert best[0]["rounds"] == [r1[0], r2[0]] and "errors" not in best[0]
    failed_both = bench.best_of([[r1[1]], [dict(r1[1])]])
    assert failed_both[0]["decode_tok_s"] is None and len(failed_both[0]["errors"]) == 2
