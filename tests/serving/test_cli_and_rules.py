"""Fast checks without processes: CLI commands, auth setup, the gateway's prompt bound."""
from __future__ import annotations

import hashlib

import pytest
import yaml
from typer.testing import CliRunner

from hybridserve import protocol as P
from hybridserve.cli import app
from hybridserve.config import ConfigError, GatewayConfig, parse_config
from hybridserve.gateway.admission import MAX_BYTES_PER_TOKEN, admit, prompt_bounds
from hybridserve.gateway.auth import KeyChecker
from hybridserve.gateway.registry import Registry, parse_load, worker_port
from hybridserve.errors import AuthenticationError, ContextLengthExceededError, ModelNotFoundError

runner = CliRunner()


def remote_cfg(**gateway):
    return parse_config({"gateway": {"auth": "disabled", **gateway}, "backends": [
        {"name": "a", "arch": "transformer", "engine": "remote", "url": "http://127.0.0.1:9",
         "max_context": 100, "price_per_hour": 1},
        {"name": "b", "arch": "hybrid", "engine": "remote", "url": "http://127.0.0.1:10",
         "max_context": 1000, "price_per_hour": 1, "tier": "cheap"}]})


def test_hash_key_prints_sha256():
    r = runner.invoke(app, ["hash-key", "s3cret"])
    assert r.exit_code == 0
    assert r.stdout.strip() == hashlib.sha256(b"s3cret").hexdigest()


def test_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    for cmd in ("up", "gateway", "worker", "models", "hash-key", "version"):
        assert cmd in r.stdout


def test_up_refuses_vllm_backends_without_vllm_venv(tmp_path):
    cfg = {"gateway": {"auth": "disabled"}, "backends": [
        {"name": "v", "arch": "hybrid", "engine": "vllm", "checkpoint": "org/model",
         "price_per_hour": 1, "vllm": {"python": str(tmp_path / "no-venv/bin/python")}}]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["up", "--config", str(path)])
    assert r.exit_code == 2
    assert "make vllm-cpu" in r.output and "no-venv/bin/python" in r.output


def test_models_lists_backends(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"auth": "disabled"}, "backends": [
        {"name": "far", "arch": "hybrid", "engine": "remote", "url": "http://10.0.0.1:8000",
         "price_per_hour": 2}]}))
    r = runner.invoke(app, ["models", "--config", str(path)])
    assert r.exit_code == 0 and "far" in r.output and "http://10.0.0.1:8000" in r.output


def test_auth_required_without_keys_is_a_startup_error():
    with pytest.raises(ConfigError, match="auth: disabled"):
        KeyChecker(GatewayConfig(auth="required"), environ={})
    with pytest.raises(ConfigError, match="sha256"):
        KeyChecker(GatewayConfig(auth="required"), environ={"HYBRIDSERVE_API_KEYS": "plain-key"})


def test_auth_checks_hashes_from_config_and_env():
    h1, h2 = (hashlib.sha256(k.encode()).hexdigest() for k in ("k1", "k2"))
    kc = KeyChecker(GatewayConfig(auth="required", api_key_hashes=[h1]),
                    environ={"HYBRIDSERVE_API_KEYS": f" {h2} ,"})
    kc.check("Bearer k1")
    kc.check("Bearer k2")
    for bad in (None, "", "Bearer", "Bearer k3", "Token k1"):
        with pytest.raises(AuthenticationError):
            kc.check(bad)
    KeyChecker(GatewayConfig(auth="disabled"), environ={}).check(None)


def test_prompt_bounds_are_a_lower_and_upper_bound():
    req = P.validate_request(P.CompletionRequest, {"model": "a", "prompt": "x" * 320})
    assert prompt_bounds(req, chat=False) == (320 // MAX_BYTES_PER_TOKEN, 322)
    req = P.validate_request(P.CompletionRequest, {"model": "a", "prompt": [[1, 2, 3], [4]]})
    assert prompt_bounds(req, chat=False) == (3, 3)


def test_admission_routes_by_fit_and_names_problems():
    reg = Registry.from_config(remote_cfg())
    adm = admit(b'{"model": "auto", "prompt": [' + b"1," * 150 + b'1]}', False, reg)
    assert [b.name for b in adm.candidates] == ["b"]  # 151 tokens only fit b
    with pytest.raises(ContextLengthExceededError):
        admit(b'{"model": "a", "prompt": [' + b"1," * 150 + b'1]}', False, reg)
    with pytest.raises(ModelNotFoundError):
        admit(b'{"model": "zzz", "prompt": "x"}', False, reg)
    assert admit(b'{"model": "cheap", "prompt": "x"}', False, reg).candidates[0].name == "b"


def test_least_loaded_order_and_load_parsing():
    reg = Registry.from_config(remote_cfg())
    a, b = reg.backends["a"], reg.backends["b"]
    a.healthy = b.healthy = True
    a.scraped_load = parse_load('vllm:num_requests_running{model_name="a"} 3.0\n'
                                'vllm:num_requests_waiting{model_name="a"} 2.0\n# HELP x\n')
    assert a.scraped_load == 5.0
    assert reg.order([a, b], pinned=False)[0] is b
    b.healthy = False
    assert reg.order([a, b], pinned=False) == [a]


def test_worker_ports_follow_the_gateway_port():
    cfg = parse_config({"gateway": {"port": 9000, "auth": "disabled"}, "backends": [
        {"name": "x", "arch": "hybrid", "engine": "remote", "url": "http://h:1", "price_per_hour": 0},
        {"name": "y", "arch": "hybrid", "checkpoint": "/tmp", "price_per_hour": 0},
        {"name": "z", "arch": "hybrid", "checkpoint": "/tmp", "price_per_hour": 0, "port": 7777}]})
    assert worker_port(cfg, cfg.backend("y")) == 9001
    assert worker_port(cfg, cfg.backend("z")) == 7777


def test_workers_on_other_hosts_are_routed_to_but_not_started():
    from hybridserve.gateway.registry import backend_url
    from hybridserve.supervisor import check_startable, plan_children

    cfg = parse_config({"gateway": {"port": 9000, "auth": "disabled"}, "backends": [
        {"name": "here", "arch": "hybrid", "checkpoint": "/tmp", "price_per_hour": 0},
        {"name": "there", "arch": "hybrid", "checkpoint": "/tmp", "price_per_hour": 0,
         "host": "gpu-node-7", "cpu_cores": "0"},
        {"name": "v", "arch": "hybrid", "engine": "vllm", "checkpoint": "org/m", "price_per_hour": 0,
         "host": "10.0.0.7", "vllm": {"python": "/no/such/python"}}]})
    assert [k.name for k in plan_children(cfg, "m.yaml", None)] == ["here", "gateway"]
    check_startable(cfg)     # neither the missing vLLM interpreter nor the core list is this machine's
    assert backend_url(cfg, cfg.backend("there")) == "http://gpu-node-7:9002"
    assert backend_url(cfg, cfg.backend("here")) == "http://127.0.0.1:9001"
    assert backend_url(cfg, cfg.backend("v")) == "http://10.0.0.7:9003"


def test_remote_urls_may_end_in_v1_and_use_https():
    from hybridserve.gateway.registry import backend_url
    from hybridserve.gateway.upstream import Pool

    cfg = parse_config({"gateway": {"auth": "disabled"}, "backends": [
        {"name": "r", "arch": "hybrid", "engine": "remote", "url": "https://llm.internal/v1/",
         "price_per_hour": 0}]})
    url = backend_url(cfg, cfg.backend("r"))
    assert url == "https://llm.internal"
    pool = Pool(url)
    assert (pool.port, pool.tls is not None, pool.host_header) == (443, True, "llm.internal")
