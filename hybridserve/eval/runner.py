"""Run an eval: every (target, item) over HTTP, concurrently, resumably.

Each finished result is appended to `OUT/results.jsonl` as soon as it completes,
keyed by target label, model, params and item id; a rerun with the same `out` skips
those keys (`retry_errors=True` redoes the ones that ended in an error). `OUT/run.json`
keeps the eval's name and its targets in order, for `--report-only`. A progress line on
stderr shows items done/total, per target, rate and ETA. Nothing here raises on a bad
answer: HTTP errors are recorded as wrong results with their status.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from hybridserve.eval import client as C
from hybridserve.eval.dataset import Item
from hybridserve.eval.graders import Grade, grade
from hybridserve.eval.judge import grade_with_judge, judge_model
from hybridserve.eval.targets import Target

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
RUN = "run.json"


@dataclass
class EvalOptions:
    url: str
    targets: list[Target]
    out: Path
    concurrency: int = 4
    api_key: str | None = None
    timeout_s: float = 300.0
    retry_errors: bool = False
    judge_model: str | None = None
    progress: bool = True
    extra_headers: dict[str, str] = field(default_factory=dict)


def result_key(target: Target, item_id: str) -> str:
    return f"{target.label}|{target.model}|{json.dumps(target.params, sort_keys=True)}|{item_id}"


def load_results(out: Path) -> list[dict]:
    """Every record of OUT/results.jsonl (a torn last line is ignored); the last per key wins."""
    path = Path(out) / RESULTS
    by_key: dict[str, dict] = {}
    if path.exists():
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                rec = json.loads(line)
                by_key[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                if line.strip():
                    logger.warning("%s line %d: unreadable result, ignored", path, n)
    return list(by_key.values())


def save_run(out: Path, eval_name: str, targets: list[Target]) -> None:
    (out / RUN).write_text(json.dumps({"eval": eval_name, "targets": [t.to_json() for t in targets]}, indent=2))


def load_run(out: Path) -> dict:
    path = Path(out) / RUN
    return json.loads(path.read_text()) if path.exists() else {}


class Progress:
    """A \\r-refreshed stderr line: done/total, per target, rate, ETA."""

    def __init__(self, totals: dict[str, int], enabled: bool = True):
        self.totals, self.done = totals, {k: 0 for k in totals}
        self.t0, self.enabled, self.last = time.monotonic(), enabled, 0.0

    def step(self, label: str) -> None:
        self.done[label] += 1
        self.show(force=sum(self.done.values()) == sum(self.totals.values()))

    def line(self) -> str:
        done, total = sum(self.done.values()), sum(self.totals.values())
        elapsed = max(1e-9, time.monotonic() - self.t0)
        rate = done / elapsed
        eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
        bar = "#" * int(20 * done / max(1, total))
        per = "  ".join(f"{k} {self.done[k]}/{v}" for k, v in self.totals.items())
        return f"[{bar:<20}] {done}/{total}  {per}  {rate:.2f} it/s  ETA {eta}"

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last > 0.2):
            self.last = now
            sys.stderr.write("\r" + self.line() + ("\n" if force else ""))
            sys.stderr.flush()


def make_record(target: Target, item: Item, ans: C.Answer, g, judge_cost: float = 0.0) -> dict:
    return {"key": result_key(target, item.id), "target": target.label, "model": target.model,
            "params": target.params, "id": item.id, "tags": item.tags, "grader": item.grader,
            "context_tokens": item.context_tokens, "depth": item.meta.get("depth"),
            "correct": bool(g.correct), "detail": g.detail, "answer": ans.text,
            "mean_logprob": ans.mean_logprob, "cost_usd": ans.cost_usd, "judge_cost_usd": judge_cost,
            "prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
            "latency_s": round(ans.latency_s, 6), "backend": ans.backend, "tiers": ans.tiers,
            "status": ans.status, "error": ans.error, "finished": time.time()}


async def evaluate_one(client: httpx.AsyncClient, opts: EvalOptions, target: Target, item: Item) -> dict:
    ans = await C.call(client, opts.url, target, item)
    judge_cost = 0.0
    if ans.error:
        g = Grade(False, f"error {ans.status}: {ans.error}")
    elif item.grader == "judge":
        model = judge_model(item, opts.judge_model or target.model)
        g, judge_cost = await grade_with_judge(client, opts.url, model, item, ans.text)
    else:
        g = grade(item, ans.text)
    return make_record(target, item, ans, g, judge_cost)


def pending(opts: EvalOptions, items: list[Item], done: list[dict]) -> list[tuple[Target, Item]]:
    finished = {r["key"] for r in done if not (opts.retry_errors and r.get("error"))}
    return [(t, it) for t in opts.targets for it in items if result_key(t, it.id) not in finished]


async def _run(opts: EvalOptions, todo: list[tuple[Target, Item]], on_done: Callable[[dict], None]) -> None:
    headers = {**opts.extra_headers, **({"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {})}
    sem = asyncio.Semaphore(max(1, opts.concurrency))
    limits = httpx.Limits(max_connections=opts.concurrency + 4)
    async with httpx.AsyncClient(timeout=opts.timeout_s, headers=headers, limits=limits, trust_env=False) as client:
        async def one(t: Target, it: Item) -> None:
            async with sem:
                on_done(await evaluate_one(client, opts, t, it))

        await asyncio.gather(*(one(t, it) for t, it in todo))


def run_eval(opts: EvalOptions, eval_name: str, items: list[Item]) -> list[dict]:
    """Evaluate what is not yet in opts.out; returns this run's records (old and new)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    save_run(opts.out, eval_name, opts.targets)
    done = load_results(opts.out)
    todo = pending(opts, items, done)
    wanted = {result_key(t, it.id) for t in opts.targets for it in items}
    logger.info("eval %s: %d requests to make, %d already in %s", eval_name, len(todo),
                len(wanted) - len(todo), opts.out / RESULTS)
    fresh: dict[str, dict] = {}
    progress = Progress({t.label: sum(1 for x, _ in todo if x is t) for t in opts.targets},
                        enabled=opts.progress and bool(todo))
    with (opts.out / RESULTS).open("a") as fh:
        def on_done(rec: dict) -> None:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            fresh[rec["key"]] = rec
            progress.step(rec["target"])

        if todo:
            asyncio.run(_run(opts, todo, on_done))
    merged = {r["key"]: r for r in done if r["key"] in wanted}
    merged.update(fresh)
    return list(merged.values())
