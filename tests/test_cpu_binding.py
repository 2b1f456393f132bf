"""`cpu_cores`: parsing, the split `up` plans, the refusals, and a pinned child process."""
import json
import os
import subprocess
import sys

import pytest

from hybridserve.config import ConfigError, parse_config
from hybridserve.cpu_binding import (binding_env, check_cores, compute_threads, default_threads, format_cores,
                                     parse_cores, plan_cores)
from hybridserve.supervisor import Child, check_startable


def cfg(*backends):
    entries = []
    for i, extra in enumerate(backends):
        b = {"name": f"b{i}", "arch": "transformer", "checkpoint": "builtin:tiny-transformer",
             "price_per_hour": 1.0, **extra}
        if b.get("engine") == "remote":
            b.pop("checkpoint")
            b.setdefault("url", "http://127.0.0.1:9")
        entries.append(b)
    return parse_config({"gateway": {"auth": "disabled"}, "backends": entries})


@pytest.mark.parametrize("spec, cores, text", [
    ("3", [3], "3"), ("0-3,8", [0, 1, 2, 3, 8], "0-3,8"), ("8, 0-1 ,2", [0, 1, 2, 8], "0-2,8"),
    ("5-5,1", [1, 5], "1,5"),
])
def test_parse_and_format_round_trip(spec, cores, text):
    assert parse_cores(spec) == cores
    assert format_cores(cores) == text
    assert parse_cores(text) == cores


@pytest.mark.parametrize("spec, hint", [("3-1", "backwards"), ("a-b", "not a CPU list"),
                                        ("1,,2", "not a CPU list"), ("", "not a CPU list")])
def test_bad_lists_are_refused_by_the_config(spec, hint):
    with pytest.raises(ValueError, match=hint):
        parse_cores(spec)
    with pytest.raises(ConfigError, match=r"backends\[0\]\.cpu_cores"):
        cfg({"cpu_cores": spec})


def test_config_normalises_lists_and_remote_backends_cannot_be_pinned():
    assert cfg({"cpu_cores": " 2,0-1 "}).backends[0].cpu_cores == "0-2"
    assert cfg({}).backends[0].cpu_cores == "auto"
    with pytest.raises(ConfigError, match="remote backend"):
        cfg({"engine": "remote", "cpu_cores": "0"})


def test_auto_splits_the_cores_evenly_and_contiguously():
    c = cfg({}, {"arch": "hybrid", "checkpoint": "builtin:tiny-hybrid"}, {})
    assert plan_cores(c.backends, range(8)) == {"b0": [0, 1, 2], "b1": [3, 4, 5], "b2": [6, 7]}
    assert plan_cores(c.backends, [4, 5, 6, 7]) == {"b0": [4, 5], "b1": [6], "b2": [7]}


def test_more_backends_than_cores_share_round_robin():
    c = cfg({}, {}, {})
    assert plan_cores(c.backends, [0, 1]) == {"b0": [0], "b1": [1], "b2": [0]}


def test_explicit_lists_are_kept_and_auto_takes_the_rest():
    c = cfg({"cpu_cores": "0-1"}, {}, {})
    assert plan_cores(c.backends, range(6)) == {"b0": [0, 1], "b1": [2, 3], "b2": [4, 5]}
    # explicit lists took every core: auto backends share all of them
    c = cfg({"cpu_cores": "0-3"}, {})
    assert plan_cores(c.backends, range(4)) == {"b0": [0, 1, 2, 3], "b1": [0, 1, 2, 3]}


def test_all_remote_and_cuda_auto_are_not_pinned():
    c = cfg({"cpu_cores": "all"}, {"engine": "remote"}, {"device": "cuda"},
            {"device": "cuda", "cpu_cores": "6-7"}, {})
    assert plan_cores(c.backends, range(8)) == {"b3": [6, 7], "b4": [0, 1, 2, 3, 4, 5]}


def test_unavailable_cores_are_refused_before_anything_starts():
    c = cfg({"cpu_cores": "0,64-65"})
    with pytest.raises(ValueError, match="core\\(s\\) 64-65, but only 0-3 are available"):
        check_cores(c.backends, range(4))
    check_cores(cfg({"cpu_cores": "0"}).backends, range(4))
    if 4096 not in os.sched_getaffinity(0):
        with pytest.raises(ConfigError, match="cpu_cores '4096'"):
            check_startable(cfg({"cpu_cores": "4096"}))


def test_from_four_cores_one_is_left_to_the_server_thread():
    assert [compute_threads(n) for n in (1, 2, 3, 4, 16)] == [1, 2, 3, 3, 15]
    assert default_threads({}, [0, 1, 2, 3]) == 3
    assert default_threads({}, [0, 1]) == 2
    assert default_threads({"OMP_NUM_THREADS": "4"}, [0, 1, 2, 3]) is None
    assert default_threads({"OMP_NUM_THREADS": ""}, [0]) == 1


def test_binding_env_keeps_what_the_user_set():
    assert binding_env([2, 3, 4, 5], "native", {}) == {"HYBRIDSERVE_CPU_CORES": "2-5", "OMP_NUM_THREADS": "3"}
    assert binding_env([2, 3], "native", {})["OMP_NUM_THREADS"] == "2"
    env = binding_env([2, 3, 4, 5], "vllm", {"OMP_NUM_THREADS": "1"})
    assert env == {"HYBRIDSERVE_CPU_CORES": "2-5", "VLLM_CPU_OMP_THREADS_BIND": "2-4"}
    assert binding_env([5, 6], "vllm", {})["VLLM_CPU_OMP_THREADS_BIND"] == "5-6"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in binding_env([0], "vllm", {"VLLM_CPU_OMP_THREADS_BIND": "nobind"})


def test_a_pinned_child_runs_on_its_cores_with_that_many_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    core = sorted(os.sched_getaffinity(0))[-1]
    out = tmp_path / "seen.json"
    code = ("import json, os, sys, torch; json.dump({'cores': sorted(os.sched_getaffinity(0)), "
            "'threads': torch.get_num_threads(), 'env': os.environ.get('HYBRIDSERVE_CPU_CORES')}, "
            "open(sys.argv[1], 'w'))")
    child = Child("probe", [sys.executable, "-c", code, str(out)], "http://unused", cores=[core])
    child.start()
    assert child.proc.wait(timeout=60) == 0
    seen = json.loads(out.read_text())
    assert seen == {"cores": [core], "threads": 1, "env": str(core)}
    # unpinned children are left alone
    free = Child("free", [sys.executable, "-c", code, str(out)], "http://unused")
    free.start()
    assert free.proc.wait(timeout=60) == 0
    assert json.loads(out.read_text())["cores"] == sorted(os.sched_getaffinity(0))


def test_a_standalone_native_worker_sizes_its_threads_by_its_cores(tmp_path, monkeypatch):
    import httpx
    import yaml

    from hybridserve.cpu_binding import available_cores
    from tests.serving.conftest import free_port, spawn, stop_process, wait_until

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"auth": "disabled"}, "backends": [
        {"name": "t", "arch": "transformer", "checkpoint": "builtin:tiny-transformer", "price_per_hour": 1}]}))
    port = free_port()
    proc = spawn([sys.executable, "-m", "hybridserve.cli", "worker", "--config", str(path), "--backend", "t",
                  "--port", str(port), "--no-restart"], tmp_path / "w.log", dict(os.environ))
    try:
        def health():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).json()
            except httpx.HTTPError:
                return None

        wait_until(lambda: (health() or {}).get("status") == "ok", 120, "worker up")
        h = health()
        assert h["cpu_threads"] == compute_threads(len(available_cores()))
        assert h["cpu_cores"] == format_cores(available_cores())
    finally:
        stop_process(proc)


def test_worker_thread_sizing_sets_torch_threads():
    import torch

    from hybridserve.worker.server import size_compute_threads

    before = torch.get_num_threads()
    try:
        assert size_compute_threads({}, list(range(8))) == 7 and torch.get_num_threads() == 7
        assert size_compute_threads({}, [0, 1]) == 2 and torch.get_num_threads() == 2
        assert size_compute_threads({"OMP_NUM_THREADS": "3"}, list(range(8))) is None
        assert torch.get_num_threads() == 2  # left as it was
    finally:
        torch.set_num_threads(before)
