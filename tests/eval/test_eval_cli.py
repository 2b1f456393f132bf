"""`hybridserve eval` end to end against a mock OpenAI server: outputs, resume, profile."""
from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from hybridserve.cli import app
from tests.eval.mock_openai import MockServer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ITEMS = [  # (item, the right answer the oracle gives)
    ({"id": "f1", "messages": [{"role": "user", "content": "Capital of France?"}], "contains": "Paris",
      "tags": ["facts"]}, "The capital is Paris."),
    ({"id": "f2", "messages": [{"role": "user", "content": "Capital of Spain?"}], "answers": ["Madrid"],
      "tags": ["facts"]}, "Madrid"),
    ({"id": "a1", "prompt": "6 times 7 =", "number": 42, "tags": ["arith"]}, " 42"),
    ({"id": "a2", "prompt": "1000 + 234 =", "number": 1234, "tags": ["arith"]}, " 1,234"),
    ({"id": "j1", "messages": [{"role": "user", "content": "Sky colour?"}], "judge": "blue", "tags": ["judge"]},
     "It is blue."),
    ({"id": "j2", "messages": [{"role": "user", "content": "Grass colour?"}], "judge": "green", "tags": ["judge"]},
     "Green, mostly."),
    ({"id": "s1", "messages": [{"role": "user", "content": "JSON city Rome"}], "json_schema": SCHEMA,
      "tags": ["format"]}, '```json\n{"city": "Rome"}\n```'),
    ({"id": "r1", "prompt": "Say yes", "regex": "(?i)^\\s*yes", "tags": ["format"]}, "Yes."),
    ({"id": "c1", "messages": [{"role": "user", "content": "Pick: A) cat B) dog"}], "choices": ["cat", "dog"],
      "answer": "B", "tags": ["facts"]}, "B"),
    ({"id": "f3", "messages": [{"role": "user", "content": "Largest ocean?"}], "contains": ["Pacific"],
      "tags": ["facts"]}, "The Pacific Ocean."),
]
PROFILE_TAG_KEYS = {"n", "correct", "accuracy", "wilson_low", "wilson_high", "usd_per_request", "usd_per_correct"}
CASCADE_KEYS = {"rungs", "thresholds", "target_accuracy", "predicted_accuracy", "predicted_usd_per_request",
                "deep_accuracy", "deep_usd_per_request", "escalate_share"}


def question(item: dict) -> str:
    return item["messages"][-1]["content"] if "messages" in item else item["prompt"]


@pytest.fixture()
def mock():
    with MockServer({question(i): a for i, a in ITEMS}) as m:
        yield m


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "mini.jsonl"
    lines = [json.dumps(i) for i, _ in ITEMS]
    lines.insert(3, '{"id": "broken", "prompt": ')         # line 4: malformed, skipped
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args):
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def rows_by(summary):
    return {(r["target"], r["tag"]): r for r in summary["results"]}


def test_end_to_end_report_resume_and_profile(mock, dataset, tmp_path):
    out, copy = tmp_path / "out", tmp_path / "prof" / "q.json"
    copy.parent.mkdir()
    args = [dataset, "--url", mock.url + "/v1", "-t", "deep=good", "-t", "cheap=half+foo=1+bar=baz",
            "-t", "flaky", "--cascade", "cheap,deep", "--judge-model", "judge", "--out", out,
            "--profile-out", copy, "--no-progress"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    summary = last_json(first)
    assert summary["eval"] == "mini"
    rows = rows_by(summary)
    n = len(ITEMS)
    deep, cheap, flaky = rows[("deep", "all")], rows[("cheap", "all")], rows[("flaky", "all")]
    assert (deep["n"], deep["correct"]) == (n, n)
    assert cheap["correct"] == (n + 1) // 2 and flaky["correct"] == 0
    assert deep["usd_per_request"] == pytest.approx(0.004) and deep["usd_per_correct"] == pytest.approx(0.004)
    assert flaky["usd_per_correct"] is None and flaky["errors"] == n // 2
    assert (cheap["wins"], cheap["losses"], cheap["win_rate"]) == (0, n // 2, 0.0)
    assert deep["win_rate"] is None and deep["ties"] == n
    assert {t for (_, t) in rows} == {"all", "facts", "arith", "judge", "format"}
    assert rows[("deep", "judge")]["correct"] == 2          # judged PASS by the judge model
    low, high = deep["wilson_low"], deep["wilson_high"]
    assert low < 1.0 == high and low == pytest.approx(n / (n + 1.959963984540054 ** 2))

    for name in ("report.md", "results.json", "results.csv", "results.jsonl", "cost_vs_accuracy.png",
                 "quality_profile.json", "run.json"):
        assert (out / name).is_file(), name
    assert not (out / "passkey_vs_context.png").exists()
    assert "deep" in (out / "report.md").read_text() and "1 malformed" in (out / "report.md").read_text()

    bodies = [b for b in mock.bodies if b["model"] == "half"]
    assert all(b["foo"] == 1 and b["bar"] == "baz" and b["temperature"] == 0.0 for b in bodies)
    assert {json.dumps(b["logprobs"]) for b in bodies} == {"true", "1"}   # chat and completion items
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 3 * n
    err = [r for r in records if r["target"] == "flaky" and r["status"] == 500]
    assert len(err) == n // 2 and all(not r["correct"] and r["error"] for r in err)
    good = [r for r in records if r["target"] == "deep"]
    assert all(r["mean_logprob"] == pytest.approx(-0.05) and r["backend"] == "good" for r in good)
    assert all(r["mean_logprob"] is None for r in records if r["target"] == "flaky")

    # resumable: nothing is asked again, and the summary is the same
    asked = sum(mock.counts.values())
    lines = (out / "results.jsonl").read_text().count("\n")
    second = run(*args)
    assert second.exit_code == 0, second.output
    assert sum(mock.counts.values()) == asked
    assert (out / "results.jsonl").read_text().count("\n") == lines
    assert last_json(second)["results"] == summary["results"]

    (out / "report.md").unlink()
    rebuilt = run("--report-only", "--out", out, "--cascade", "cheap,deep")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (out / "report.md").is_file() and last_json(rebuilt)["results"] == summary["results"]
    assert sum(mock.counts.values()) == asked

    check_profile(json.loads(copy.read_text()), n)
    assert json.loads(copy.read_text())["targets"] == json.loads((out / "quality_profile.json").read_text())["targets"]


def check_profile(prof: dict, n: int) -> None:
    assert set(prof) == {"object", "version", "created", "eval", "targets", "cascades"}
    assert (prof["object"], prof["version"], prof["eval"]) == ("quality_profile", 1, "mini")
    assert isinstance(prof["created"], int)
    assert list(prof["targets"]) == ["deep", "cheap", "flaky"]
    cheap = prof["targets"]["cheap"]
    assert set(cheap) == {"model", "params", "tags", "calibration"}
    assert cheap["model"] == "half" and cheap["params"] == {"foo": 1, "bar": "baz"}
    for entry in cheap["tags"].values():
        assert set(entry) == PROFILE_TAG_KEYS
    assert cheap["tags"]["all"]["n"] == n
    c = cheap["calibration"]
    assert set(c) == {"bins", "threshold", "target_accuracy"}
    assert sum(b["n"] for b in c["bins"]) == n and c["bins"][0]["low"] is None and c["bins"][-1]["high"] is None
    assert c["threshold"] == pytest.approx(-0.1) and c["target_accuracy"] == pytest.approx(0.98)
    assert prof["targets"]["flaky"]["calibration"] == {"bins": [], "threshold": None, "target_accuracy": None}
    (cas,) = prof["cascades"]
    assert set(cas) == CASCADE_KEYS and cas["rungs"] == ["cheap", "deep"]
    assert cas["thresholds"] == [pytest.approx(-0.1)] and all(math.isfinite(t) for t in cas["thresholds"])
    assert cas["predicted_accuracy"] == 1.0 and cas["deep_accuracy"] == 1.0
    assert cas["escalate_share"] == pytest.approx((n // 2) / n)
    assert cas["predicted_usd_per_request"] == pytest.approx(0.001 + 0.5 * 0.004)


def test_discovered_targets_and_passkey_plot(tmp_path):
    from hybridserve.eval.suites import build_suite

    items = build_suite("passkey", max_context=1024)
    with MockServer({it.question: f"The pass key is {it.reference}." for it in items}) as mock:
        result = run("builtin:passkey", "--max-context", 1024, "--url", mock.url + "/v1",
                     "--out", tmp_path / "pk", "--concurrency", 8)
        assert result.exit_code == 0, result.output
        assert set(mock.counts) == {"good", "half"}            # backends only, not the `auto` alias
    summary = last_json(result)
    rows = rows_by(summary)
    assert rows[("good", "passkey")]["accuracy"] == 1.0 and rows[("good", "all")]["n"] == len(items)
    assert (tmp_path / "pk" / "passkey_vs_context.png").stat().st_size > 1000
    recs = json.loads((tmp_path / "pk" / "results.json").read_text())
    assert {r["context_tokens"] for r in recs} == {512, 1024} and {r["depth"] for r in recs} == {0.1, 0.5, 0.9}
    assert "\r[" in result.stderr                              # the progress line


def test_refusals_exit_2_without_requests(mock, dataset, tmp_path):
    strict = run(dataset, "--url", mock.url + "/v1", "-t", "good", "--strict", "--out", tmp_path / "s")
    assert strict.exit_code == 2 and "line 4" in strict.stderr
    bad_ref = run(dataset, "--url", mock.url + "/v1", "-t", "good", "--reference", "nope", "--out", tmp_path / "r")
    assert bad_ref.exit_code == 2 and "nope" in bad_ref.stderr
    bad_cascade = run(dataset, "--url", mock.url + "/v1", "-t", "good", "--cascade", "good", "--out", tmp_path / "c")
    assert bad_cascade.exit_code == 2
    nothing = run("--report-only", "--out", tmp_path / "empty")
    assert nothing.exit_code == 2
    assert sum(mock.counts.values()) == 0


def test_unreachable_url_is_recorded_not_raised(dataset, tmp_path):
    result = run(dataset, "--url", "http://127.0.0.1:9/v1", "-t", "x", "--out", tmp_path / "u", "--no-progress")
    assert result.exit_code == 0, result.output
    (row,) = [r for r in last_json(result)["results"] if r["tag"] == "all"]
    assert row["correct"] == 0 and row["errors"] == len(ITEMS)


def test_retry_errors_redoes_only_failed(mock, dataset, tmp_path):
    args = [dataset, "--url", mock.url + "/v1", "-t", "flaky", "-t", "good", "--out", tmp_path / "o", "--no-progress"]
    assert run(*args).exit_code == 0
    before = dict(mock.counts)
    again = run(*args, "--retry-errors")
    assert again.exit_code == 0
    assert mock.counts["flaky"] - before["flaky"] == len(ITEMS) // 2     # the HTTP 500s only
    assert mock.counts["good"] == before["good"]
    (row,) = [r for r in last_json(again)["results"] if r["target"] == "flaky" and r["tag"] == "all"]
    assert row["n"] == len(ITEMS) and row["errors"] == len(ITEMS) // 2
