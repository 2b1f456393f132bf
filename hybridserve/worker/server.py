"""Run one worker process: load the backend's engine, then serve it with uvicorn."""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable

from hybridserve.config import BackendConfig, HybridserveConfig
from hybridserve.cpu_binding import available_cores, default_threads

logger = logging.getLogger(__name__)


def load_factory(spec: str) -> Callable[[BackendConfig], tuple[Any, Any]]:
    """'module:function' → a factory returning (engine, SamplingParams class)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "make")


def native_engine(backend: BackendConfig) -> tuple[Any, Any]:
    from hybridserve.engine import AsyncEngine, SamplingParams

    return AsyncEngine.from_backend(backend), SamplingParams


def size_compute_threads(environ, cores) -> int | None:
    """Set torch's thread count for a worker on `cores` (cpu_binding.compute_threads),
    unless OMP_NUM_THREADS already chose it; the count set, or None."""
    threads = default_threads(environ, cores)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return threads


def serve_worker(cfg: HybridserveConfig, backend_name: str, host: str, port: int,
                 log_level: str = "info", engine_factory: str | None = None) -> None:
    """Serve `backend_name` on host:port until SIGINT/SIGTERM (in-flight requests drain)."""
    import uvicorn

    from hybridserve.worker.app import create_app

    backend = cfg.backend(backend_name)
    if backend.engine != "native":
        raise SystemExit(f"backend '{backend_name}' has engine '{backend.engine}'; this server runs "
                         "only engine 'native'"
                         + (" (`hybridserve worker` launches vLLM for engine 'vllm')" if backend.engine == "vllm"
                            else " (a remote backend is already running elsewhere)"))
    factory = load_factory(engine_factory) if engine_factory else native_engine
    size_compute_threads(os.environ, available_cores())
    logger.info("loading %s (%s)", backend.name, backend.checkpoint)
    engine, params_cls = factory(backend)
    app = create_app(engine, params_cls)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                timeout_keep_alive=75, timeout_graceful_shutdown=30, lifespan="on")
