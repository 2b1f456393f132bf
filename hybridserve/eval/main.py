"""`hybridserve eval` end to end: dataset -> targets -> (private stack) -> run -> report.

`evaluate(args)` runs an eval and `report_only(args)` rebuilds the outputs from
`OUT/results.jsonl`; both return the summary (the CLI prints it as its last line) and
raise `UsageError` for anything the user must fix (bad dataset, target, label).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hybridserve.eval import report, runner
from hybridserve.eval.dataset import DatasetError, load_dataset
from hybridserve.eval.targets import Target, discover, parse_targets

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Something on the command line or in the dataset that the user must fix."""


@dataclass
class EvalArgs:
    dataset: str | None
    out: Path
    url: str | None = None
    targets: list[str] = field(default_factory=list)
    config: str = "models.yaml"
    profile: str | None = None
    concurrency: int = 4
    max_context: int = 4096
    strict: bool = False
    reference: str | None = None
    cascades: list[str] = field(default_factory=list)
    target_accuracy: float | None = None
    profile_out: Path | None = None
    api_key: str | None = None
    timeout_s: float = 300.0
    retry_errors: bool = False
    judge_model: str | None = None
    ready_timeout_s: float = 600.0
    progress: bool = True
    engine_factory: str | None = None


def _cascade_pairs(specs: list[str], labels: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) != 2 or not all(parts):
            raise UsageError(f"--cascade {spec!r}: give two target labels, cheap first: A,B")
        for p in parts:
            if p not in labels:
                raise UsageError(f"--cascade: no target labelled {p!r}; targets: {', '.join(labels)}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _check_reference(reference: str | None, labels: list[str]) -> None:
    if reference is not None and reference not in labels:
        raise UsageError(f"--reference: no target labelled {reference!r}; targets: {', '.join(labels)}")


def _targets(args: EvalArgs, url: str) -> list[Target]:
    if args.targets:
        return parse_targets(args.targets)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        return discover(url, headers)
    except Exception as err:  # noqa: BLE001 - any failure to list is a usage problem here
        raise UsageError(f"cannot list targets from {url}/models ({err}); pass --target MODEL") from None


def _finish(args: EvalArgs, name: str, targets: list[dict], records: list[dict], problems: int) -> dict:
    labels = [t["label"] for t in targets]
    _check_reference(args.reference, labels)
    pairs = _cascade_pairs(args.cascades, labels)
    return report.write_all(name, targets, records, args.out, reference=args.reference, cascades=pairs,
                            target_accuracy=args.target_accuracy, profile_out=args.profile_out,
                            problems=problems)


def _run(args: EvalArgs, url: str, name: str, items, problems: int) -> dict:
    try:
        targets = _targets(args, url)
    except ValueError as err:
        raise UsageError(str(err)) from None
    labels = [t.label for t in targets]
    _check_reference(args.reference, labels)
    _cascade_pairs(args.cascades, labels)   # refuse bad labels before any request
    opts = runner.EvalOptions(url=url, targets=targets, out=args.out, concurrency=args.concurrency,
                              api_key=args.api_key, timeout_s=args.timeout_s, retry_errors=args.retry_errors,
                              judge_model=args.judge_model, progress=args.progress)
    records = runner.run_eval(opts, name, items)
    return _finish(args, name, [t.to_json() for t in targets], records, problems)


def evaluate(args: EvalArgs) -> dict:
    if not args.dataset:
        raise UsageError("give a DATASET (a .jsonl file or builtin:facts|arith|format|passkey|all)")
    try:
        name, items, problems = load_dataset(args.dataset, strict=args.strict, max_context=args.max_context)
    except DatasetError as err:
        raise UsageError(str(err)) from None
    if args.url:
        return _run(args, args.url.rstrip("/"), name, items, len(problems))
    from hybridserve.eval.stack import Stack, StackError

    stack = Stack(args.config, args.profile, args.out / "stack.log", args.ready_timeout_s, args.engine_factory)
    try:
        url = stack.start()
    except (StackError, OSError) as err:
        raise UsageError(f"could not start the stack: {err}") from None
    try:
        return _run(args, url, name, items, len(problems))
    finally:
        stack.stop()


def report_only(args: EvalArgs) -> dict:
    """Rebuild every output in args.out from its results.jsonl (and run.json)."""
    records = runner.load_results(args.out)
    if not records:
        raise UsageError(f"{args.out / runner.RESULTS}: no results to report")
    run = runner.load_run(args.out)
    targets = list(run.get("targets") or [])
    known = {t["label"] for t in targets}
    for r in records:
        if r["target"] not in known:
            known.add(r["target"])
            targets.append({"label": r["target"], "model": r.get("model", r["target"]),
                            "params": r.get("params") or {}})
    latest: dict[tuple[str, str], dict] = {}   # a label re-run with another spec: its newest answer
    for r in sorted(records, key=lambda r: r.get("finished") or 0):
        latest[(r["target"], r["id"])] = r
    records = list(latest.values())
    return _finish(args, run.get("eval") or args.dataset or args.out.name, targets, records, 0)
