"""Without --url, `hybridserve eval` starts a private `hybridserve up`, evaluates, stops it."""
from __future__ import annotations

import json

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from hybridserve.cli import app
from hybridserve.eval.stack import eval_config
from tests.eval.mock_openai import MockServer


def test_eval_config_flattens_profile_and_moves_gateway(tmp_path):
    cfg = {"default_profile": "a", "profiles": {
        "a": {"gateway": {"host": "0.0.0.0", "port": 8000, "auth": "required", "policy": "economics"},
              "backends": [{"name": "x"}]},
        "b": {"backends": [{"name": "y"}]}}}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    a = eval_config(str(path), None, 4321)
    assert a["backends"] == [{"name": "x"}]
    assert a["gateway"] == {"host": "127.0.0.1", "port": 4321, "auth": "disabled", "policy": "economics"}
    assert eval_config(str(path), "b", 99)["backends"] == [{"name": "y"}]
    assert cfg["profiles"]["a"]["gateway"]["port"] == 8000      # the original is not changed


def test_private_stack_through_the_real_gateway(tmp_path):
    from hybridserve.eval.suites import build_suite

    items = build_suite("arith")[:12]
    with MockServer({it.question: it.reference for it in items}) as mock:
        cfg = {"gateway": {"host": "127.0.0.1", "port": 8000, "auth": "required"},
               "backends": [{"name": n, "arch": a, "engine": "remote", "url": mock.url, "max_context": 4096,
                             "price_per_hour": p} for n, a, p in (("good", "transformer", 1.0),
                                                                  ("half", "hybrid", 0.2))]}
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump(cfg))
        data = tmp_path / "d.jsonl"
        data.write_text("\n".join(json.dumps(it.to_json()) for it in items) + "\n")
        out = tmp_path / "out"
        result = CliRunner().invoke(app, ["eval", str(data), "--config", str(path), "--out", str(out),
                                          "--ready-timeout", "120", "--no-progress"])
        assert result.exit_code == 0, result.output + (out / "stack.log").read_text()
        assert set(mock.counts) == {"good", "half"} and sum(mock.counts.values()) == 24
    rows = {(r["target"], r["tag"]): r for r in json.loads(result.stdout.strip().splitlines()[-1])["results"]}
    assert rows[("good", "all")]["correct"] == 12 and rows[("half", "all")]["correct"] == 6
    recs = json.loads((out / "results.json").read_text())
    assert {r["backend"] for r in recs} == {"good", "half"}      # the gateway's x-hybridserve-backend
    log = (out / "stack.log").read_text()
    assert "all processes stopped" in log
    port = int(log.split("http://127.0.0.1:")[1].split("/")[0])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False)
