"""The `hybridserve` command line: up, gateway, worker, models, k8s, hash-key, bench, eval, batch, version."""
from __future__ import annotations

import logging
from typing import Optional

import typer

app = typer.Typer(help="hybridserve: serve a transformer and a Mamba-2 hybrid behind one "
                       "OpenAI-compatible endpoint.", no_args_is_help=True)

ConfigOpt = typer.Option("models.yaml", "--config", "-c", help="Path of models.yaml.")
ProfileOpt = typer.Option(None, "--profile", "-p",
                          help="Profile under `profiles:` in models.yaml (default: its default_profile).")
LogOpt = typer.Option("info", "--log-level", help="debug | info | warning | error")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per upstream call and health poll otherwise
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _load(config: str, profile: Optional[str]):
    from hybridserve.config import ConfigError, load_config

    try:
        return load_config(config, profile)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print the version."""
    from hybridserve import __version__
    typer.echo(__version__)


@app.command()
def up(config: str = ConfigOpt, profile: Optional[str] = ProfileOpt, log_level: str = LogOpt,
       ready_timeout: float = typer.Option(600.0, help="Seconds to wait for every process to be healthy."),
       engine_factory: Optional[str] = typer.Option(None, hidden=True)) -> None:
    """Start one worker per backend plus the gateway; Ctrl-C drains and stops them all.

    Workers listen on 127.0.0.1 at `backend.port` (default: gateway.port+1, +2, ...).

    `engine: remote` backends, and backends with a `host` (workers run elsewhere with
    `hybridserve worker`), are only routed to. A dead worker is restarted with back-off.

    Example:

        hybridserve up --config models.yaml --profile cpu
    """
    from hybridserve.config import ConfigError
    from hybridserve.supervisor import run_up

    cfg = _load(config, profile)
    try:
        code = run_up(cfg, config, profile, log_level=log_level, engine_factory=engine_factory,
                      ready_timeout_s=ready_timeout, say=lambda s: typer.echo(s, err=False))
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command()
def gateway(config: str = ConfigOpt, profile: Optional[str] = ProfileOpt, log_level: str = LogOpt,
            host: Optional[str] = typer.Option(None, help="Override gateway.host."),
            port: Optional[int] = typer.Option(None, help="Override gateway.port.")) -> None:
    """Run only the gateway (workers are expected at their ports, remotes at their urls).

    Clients send `Authorization: Bearer KEY` unless `gateway.auth: disabled`.

    Keys are stored as sha256 hashes (see `hybridserve hash-key`).

    `model` may be a backend, a tier, an alias, or `auto` (least-loaded healthy backend).
    """
    from hybridserve.config import ConfigError
    from hybridserve.gateway.app import serve_gateway

    _setup_logging(log_level)
    cfg = _load(config, profile)
    try:
        serve_gateway(cfg, host, port, log_level)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def worker(backend: str = typer.Option(..., "--backend", "-b", help="Backend name in models.yaml."),
           config: str = ConfigOpt, profile: Optional[str] = ProfileOpt, log_level: str = LogOpt,
           host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
           port: Optional[int] = typer.Option(None, help="Port (default: as `up` assigns it)."),
           restart: bool = typer.Option(True, "--restart/--no-restart",
                                        help="engine vllm: restart vLLM with back-off when it dies "
                                             "(`up` passes --no-restart and restarts the worker itself)."),
           engine_factory: Optional[str] = typer.Option(None, hidden=True)) -> None:
    """Run one worker: an OpenAI-compatible server over the backend's engine.

    engine native: hybridserve's engine in this process. engine vllm: vLLM's own OpenAI
    server, started from vLLM's venv (`vllm.python`; `make vllm-cpu` creates it), with its
    log lines prefixed by the backend name.
    """
    from hybridserve.gateway.registry import worker_port

    _setup_logging(log_level)
    cfg = _load(config, profile)
    try:
        b = cfg.backend(backend)
    except KeyError:
        typer.echo(f"error: no backend '{backend}'; known: "
                   + ", ".join(x.name for x in cfg.backends), err=True)
        raise typer.Exit(2) from None
    if b.engine == "vllm":
        from hybridserve.worker.vllm_launcher import run_vllm_worker

        raise typer.Exit(run_vllm_worker(b, port or worker_port(cfg, b), host, restart=restart))
    from hybridserve.worker.server import serve_worker

    serve_worker(cfg, backend, host, port or worker_port(cfg, b), log_level, engine_factory)


@app.command()
def models(config: str = ConfigOpt, profile: Optional[str] = ProfileOpt) -> None:
    """List the built-in checkpoints and the backends models.yaml declares."""
    from pathlib import Path

    try:
        from hybridserve.models.builtin import BUILTIN_NAMES, PACKAGED_BUILTINS
        typer.echo("built-in checkpoints (use as checkpoint: builtin:NAME):")
        for name in PACKAGED_BUILTINS:
            typer.echo(f"  builtin:{name:<24} real weights (converted once from the packaged GGUF)")
        for name in BUILTIN_NAMES:
            typer.echo(f"  builtin:{name:<24} random weights: serving measurements, gibberish text")
    except ImportError:
        typer.echo("built-in checkpoints: unavailable (hybridserve.models not installed)")
    if not Path(config).is_file():
        typer.echo(f"no {config} here; pass --config PATH to list its backends")
        return
    cfg = _load(config, profile)
    from hybridserve.gateway.registry import backend_url

    typer.echo(f"backends in {config}:")
    for b in cfg.backends:
        where = backend_url(cfg, b)
        what = b.url if b.engine == "remote" else b.checkpoint
        typer.echo(f"  {b.name:<22} {b.arch:<11} {b.engine:<7} tier={b.tier:<9} "
                   f"ctx={b.max_context:<6} ${b.price_per_hour}/h  {what}  -> {where}")
    groups = {**{t: n for t, n in cfg.tiers().items()}, **cfg.aliases, "auto": "all backends"}
    typer.echo("aliases: " + "; ".join(f"{k} -> {v}" for k, v in groups.items()))


@app.command()
def k8s(config: str = ConfigOpt, profile: Optional[str] = ProfileOpt,
        image: str = typer.Option(..., help="Container image with hybridserve (and vLLM at "
                                            "--vllm-python for vllm backends); see deploy/docker."),
        namespace: Optional[str] = typer.Option(None, help="metadata.namespace of every object."),
        gateway_replicas: int = typer.Option(2, help="Gateway pods; they share budgets and sessions "
                                                     "through Redis."),
        state_url: Optional[str] = typer.Option(None, help="An existing Redis for the shared state "
                                                           "(default: deploy one)."),
        vllm_python: str = typer.Option("/opt/vllm/bin/python", help="vLLM's interpreter in the image."),
        models_pvc: Optional[str] = typer.Option(None, help="PersistentVolumeClaim mounted read-only at "
                                                            "/models in every worker (checkpoint dirs)."),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="Write here, not stdout.")) -> None:
    """Render Kubernetes manifests for this config: a worker Deployment and Service per backend,
    the gateway (several replicas sharing state in Redis), Redis, and the ConfigMap they read.

    Example:

        hybridserve k8s --profile gpu --image registry.example.com/hybridserve:0.1 | kubectl apply -f -
    """
    from pathlib import Path

    from pydantic import ValidationError

    from hybridserve.config import GatewayConfig
    from hybridserve.k8s import dump, render

    cfg = _load(config, profile)
    try:
        if state_url is not None:
            try:
                GatewayConfig(state_url=state_url)   # the same check as gateway.state_url
            except ValidationError as e:
                raise ValueError("--state-url: " + e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        objects = render(cfg, image, namespace=namespace, gateway_replicas=gateway_replicas,
                         state_url=state_url, vllm_python=vllm_python, models_pvc=models_pvc,
                         config_dir=Path(config).resolve().parent)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    text = dump(objects)
    if output:
        Path(output).write_text(text)
        typer.echo(f"wrote {len(objects)} objects to {output}", err=True)
    else:
        typer.echo(text, nl=False)


@app.command("hash-key")
def hash_key(key: str = typer.Argument(..., help="The API key to hash.")) -> None:
    """Print the sha256 hex of KEY, for gateway.api_key_hashes or $HYBRIDSERVE_API_KEYS."""
    from hybridserve.gateway.auth import hash_key as _hash

    typer.echo(_hash(key))



@app.command()
def bench(config: str = ConfigOpt, profile: Optional[str] = ProfileOpt,
          backends: Optional[str] = typer.Option(None, help="Comma-separated backend names (default: all)."),
          contexts: Optional[str] = typer.Option(None, help="Comma-separated context lengths "
                                                 "(default: powers of two from --min-context to --max-context)."),
          min_context: int = typer.Option(512, help="Smallest context of the default sweep."),
          max_context: Optional[int] = typer.Option(8192, help="Cap of the default sweep (0 = backend max)."),
          concurrency: str = typer.Option("1,4", help="Comma-separated concurrency levels."),
          new_tokens: int = typer.Option(32, help="Tokens generated per request."),
          quick: bool = typer.Option(False, "--quick", help="Contexts 64/128/256, concurrency 1/2, 8 tokens (CI)."),
          out: str = typer.Option("results/bench", help="Output folder (points are resumed from it)."),
          fresh: bool = typer.Option(False, "--fresh", help="Ignore points already measured in --out."),
          url: Optional[str] = typer.Option(None, help="Measure this OpenAI endpoint (e.g. the gateway) "
                                            "instead of starting engines; backend names are sent as `model`."),
          memory_budget_gb: Optional[float] = typer.Option(None, help="Cache budget for the "
                                                           "sequences-that-fit figure (default: each backend's)."),
          repeat: int = typer.Option(1, min=1, help="Rounds over the grid, alternating the backends' order; "
                                     "each point reports its median and min-max spread."),
          log_level: str = LogOpt) -> None:
    """Measure tokens/s, latency, cache bytes and $/1M tokens vs context for every backend.

    Writes points.json/.csv, report.md, PNG plots and economics_profile.json (the
    router's starting table) into --out; rerunning resumes where it stopped.
    """
    import json

    from hybridserve.bench.harness import BenchOptions, run_bench

    _setup_logging(log_level)
    cfg = _load(config, profile)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]
    kw = dict(backends=backends.split(",") if backends else None, out=out, fresh=fresh, url=url,
              memory_budget_gb=memory_budget_gb, repeat=repeat)
    if quick:
        opts = BenchOptions.quick(**kw)
    else:
        opts = BenchOptions(contexts=ints(contexts) if contexts else None, min_context=min_context,
                            max_context=max_context or None, concurrency=ints(concurrency),
                            new_tokens=new_tokens, **kw)
    try:
        summary = run_bench(cfg, opts, say=typer.echo)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"report: {out}/report.md")
    typer.echo(json.dumps(summary))


@app.command("route-sim")
def route_sim(config: str = ConfigOpt, profile: Optional[str] = ProfileOpt,
              economics: str = typer.Option("results/bench/economics_profile.json",
                                            help="Economics profile written by `hybridserve bench`."),
              trace: Optional[str] = typer.Option(None, help="JSONL trace (prompt_tokens, output_tokens per line); "
                                                  "default: a generated mix of chats and long documents."),
              requests: int = typer.Option(2000, help="Requests in the generated workload."),
              long_share: float = typer.Option(0.25, help="Share of long documents in the generated workload."),
              policies: str = typer.Option("round_robin,least_loaded,economics,cascade",
                                           help="Comma-separated policies to compare."),
              slo_ttft: Optional[float] = typer.Option(None, help="TTFT SLO in seconds."),
              slo_e2e: Optional[float] = typer.Option(None, help="End-to-end SLO in seconds."),
              seed: int = typer.Option(0)) -> None:
    """Compare routing policies on a workload: $/1M tokens, SLO attainment, escalations (no models run)."""
    import json

    from hybridserve.router.economics import load_profile
    from hybridserve.router.policies import BackendView
    from hybridserve.router.sim import compare, format_table, load_trace, mixed_workload
    from hybridserve.router.table import EconomicsTable

    cfg = _load(config, profile)
    try:
        prof = load_profile(economics)
    except (OSError, ValueError) as err:
        typer.echo(f"error: {err}\n(run `hybridserve bench` first, or pass --economics PATH)", err=True)
        raise typer.Exit(2) from None
    table = EconomicsTable.from_profile(prof, {b.name: b.price_per_hour for b in cfg.backends})
    measured = [b for b in cfg.backends if b.name in prof["backends"]]
    views = [BackendView(b.name, b.arch, b.tier, b.price_per_hour, b.max_context) for b in measured]
    top = max(p["context"] for b in prof["backends"].values() for p in b["points"])
    reqs = load_trace(trace) if trace else mixed_workload(requests, long_share, seed, max_context=top)
    rows = compare(policies.split(","), reqs, views, table, slo_ttft, slo_e2e, seed=seed)
    typer.echo(format_table(rows))
    typer.echo(json.dumps({"route_sim": rows, "requests": len(reqs), "economics": economics}))


@app.command("eval")
def eval_cmd(dataset: Optional[str] = typer.Argument(None, help="A .jsonl dataset or builtin:facts|arith|"
                                                    "format|passkey|all (not needed with --report-only)."),
             url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. "
                                               "http://127.0.0.1:8000/v1 (default: start `up` privately)."),
             target: Optional[list[str]] = typer.Option(None, "--target", "-t", help="MODEL, LABEL=MODEL or "
                                                        "LABEL=MODEL+KEY=VALUE+...; repeatable (default: "
                                                        "every backend of /v1/models)."),
             config: str = ConfigOpt, profile: Optional[str] = ProfileOpt,
             out: str = typer.Option("results/eval", help="Output folder (results are resumed from it)."),
             concurrency: int = typer.Option(4, min=1, help="Requests in flight."),
             max_context: int = typer.Option(4096, help="Largest passkey context (powers of two from 512)."),
             strict: bool = typer.Option(False, "--strict", help="Refuse a dataset with any malformed line."),
             reference: Optional[str] = typer.Option(None, help="Target label win rates are against "
                                                     "(default: the first target)."),
             cascade: Optional[list[str]] = typer.Option(None, help="LABEL_A,LABEL_B: calibrate a cheap-then-"
                                                         "expensive cascade threshold; repeatable."),
             target_accuracy: Optional[float] = typer.Option(None, help="Accuracy a threshold must reach "
                                                             "(default for a cascade: B's accuracy - 0.02)."),
             profile_out: Optional[str] = typer.Option(None, help="Also copy quality_profile.json here."),
             report_only: bool = typer.Option(False, "--report-only", help="Rebuild the report from "
                                              "--out/results.jsonl; no requests."),
             api_key: Optional[str] = typer.Option(None, envvar="HYBRIDSERVE_KEY", help="Bearer key for --url."),
             timeout: float = typer.Option(300.0, help="Seconds per request."),
             retry_errors: bool = typer.Option(False, "--retry-errors", help="Redo results that ended in an error."),
             judge_model: Optional[str] = typer.Option(None, help="Model grading `judge` items "
                                                       "(default: the target's own model)."),
             ready_timeout: float = typer.Option(600.0, help="Seconds to wait for a private stack."),
             progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress line on stderr."),
             log_level: str = typer.Option("warning", "--log-level", help="debug | info | warning | error"),
             engine_factory: Optional[str] = typer.Option(None, hidden=True)) -> None:
    """Grade answers of one or more targets on a dataset; report accuracy, cost, calibration.

    Writes results.jsonl (resumable), results.json/.csv, report.md, PNG plots and
    quality_profile.json into --out; the last stdout line is a JSON summary.

    Examples:

        hybridserve eval builtin:facts --url http://127.0.0.1:8000/v1 -t small=smollm2-135m -t auto:economics

        hybridserve eval builtin:all --config models.yaml --profile cpu --cascade a,b -t a=small-a -t b=small-b
    """
    import json
    from pathlib import Path

    from hybridserve.eval.main import EvalArgs, UsageError, evaluate, report_only as rebuild

    _setup_logging(log_level)
    args = EvalArgs(dataset=dataset, out=Path(out), url=url, targets=list(target or []), config=config,
                    profile=profile, concurrency=concurrency, max_context=max_context, strict=strict,
                    reference=reference, cascades=list(cascade or []), target_accuracy=target_accuracy,
                    profile_out=Path(profile_out) if profile_out else None, api_key=api_key, timeout_s=timeout,
                    retry_errors=retry_errors, judge_model=judge_model, ready_timeout_s=ready_timeout,
                    progress=progress, engine_factory=engine_factory)
    try:
        summary = rebuild(args) if report_only else evaluate(args)
    except UsageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"report: {Path(out) / 'report.md'}")
    typer.echo(json.dumps(summary))


@app.command("batch")
def batch_cmd(input: str = typer.Argument(..., help="JSONL of Batch API requests: {custom_id, method, url, body}."),
              output: str = typer.Option(..., "--output", "-o", help="JSONL results (resumed: custom_ids "
                                         "already there are skipped)."),
              url: Optional[str] = typer.Option(None, help="A running gateway, e.g. http://127.0.0.1:8000/v1 "
                                                "(default: start `up` privately from --config)."),
              api_key: Optional[str] = typer.Option(None, envvar="HYBRIDSERVE_KEY", help="Bearer key for --url."),
              config: str = ConfigOpt, profile: Optional[str] = ProfileOpt,
              concurrency: int = typer.Option(8, min=1, help="Requests in flight."),
              timeout: float = typer.Option(600.0, help="Seconds per request."),
              ready_timeout: float = typer.Option(600.0, help="Seconds to wait for a private stack."),
              progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress line on stderr."),
              engine_factory: Optional[str] = typer.Option(None, hidden=True)) -> None:
    """Run a Batch API input file offline, like `vllm run-batch`; the last stdout line is a JSON summary.

    Example:

        hybridserve batch requests.jsonl -o results.jsonl --url http://127.0.0.1:8000/v1
    """
    import json

    from hybridserve.eval.stack import StackError
    from hybridserve.gateway.offline_batch import BatchInputError, run_batch

    try:
        summary = run_batch(input, output, url=url, api_key=api_key, config=config, profile=profile,
                            concurrency=concurrency, timeout_s=timeout, ready_timeout_s=ready_timeout,
                            progress=progress, engine_factory=engine_factory)
    except (BatchInputError, StackError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary))


if __name__ == "__main__":
    app()
