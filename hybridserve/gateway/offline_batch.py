"""`hybridserve batch INPUT.jsonl -o OUTPUT.jsonl`: the Batch API's line format, run from the command line.

Like `vllm run-batch`: each input line `{"custom_id", "method": "POST", "url", "body"}` is
sent to /v1/chat/completions or /v1/completions (per its `url`) of a gateway: the one at
`--url`, or a private `hybridserve up` started from `--config` (as `hybridserve eval` does,
see eval/stack.py) and stopped at the end. Bodies get the gateway's batch defaults (`model`
`auto:cheapest` when none is named, `"hybridserve_priority": "batch"`).

Input is checked first, as the gateway checks a batch (`batches.check_line`): any bad line
and nothing runs. Output lines are the Batch API's (`{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}`), successes and failures in one file, each
appended as soon as it ends. Resumable: custom_ids already in OUTPUT are skipped (a last line
cut short by a crash is dropped and run again). Overload (429 other than a spent budget),
503 and lost connections are retried after Retry-After (else 1, 2, 4, ... s), at most
MAX_ATTEMPTS times. A progress line goes to stderr; the last stdout line is a JSON summary
with the $ cost and tokens.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from hybridserve.gateway.batch_runner import Answer, MAX_ATTEMPTS, MAX_BACKOFF_S, line_body, transient
from hybridserve.gateway.batches import ENDPOINTS, Line, LineResult, check_line, line_request_id

CHAT = "/v1/chat/completions"


class BatchInputError(ValueError):
    """The input file has bad lines (the message lists them)."""


@dataclass
class Job:
    line: Line
    path: str


@dataclass
class Tally:
    total: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    usd: float = 0.0
    prompt: int = 0
    completion: int = 0
    gateway_tokens: int = 0
    t0: float = field(default_factory=time.monotonic)

    def add(self, out: LineResult) -> None:
        self.done += 1
        self.failed += not out.ok
        usd, prompt, completion, _, tokens, _ = out.counts()
        self.usd, self.prompt, self.completion = self.usd + usd, self.prompt + prompt, self.completion + completion
        self.gateway_tokens += tokens

    def progress(self) -> str:
        return (f"\r{self.done}/{self.total - self.skipped} lines ({self.failed} failed), "
                f"${self.usd:.6f}, {self.prompt + self.completion} tokens, {time.monotonic() - self.t0:.0f}s")

    def summary(self, output: Path) -> dict:
        return {"lines": self.total, "skipped": self.skipped, "ran": self.done, "failed": self.failed,
                "cost_usd": round(self.usd, 10), "prompt_tokens": self.prompt,
                "completion_tokens": self.completion,
                "gateway_total_tokens": self.gateway_tokens, "seconds": round(time.monotonic() - self.t0, 3),
                "output": str(output)}


def read_jobs(text: str) -> list[Job]:
    """Every request of an input file, each with its endpoint; BatchInputError naming bad lines."""
    jobs, errors, seen = [], [], set()
    for no, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            url = json.loads(raw).get("url")
        except (ValueError, AttributeError):
            url = None
        path = url if url in ENDPOINTS else CHAT
        line, err = check_line(no, raw, path)
        if line is not None and line.custom_id in seen:
            err = {"line": no, "message": f"custom_id '{line.custom_id[:64]}' is repeated"}
        if err is not None:
            errors.append(f"line {no}: {err['message']}")
            continue
        seen.add(line.custom_id)
        jobs.append(Job(line, path))
    if errors:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise BatchInputError("the input has bad lines, nothing was run:\n" + "\n".join(errors[:20]) + more)
    return jobs


def done_ids(output: Path) -> set[str]:
    """custom_ids already answered in OUTPUT; a torn last line is cut off the file."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        output.write_bytes(data[:keep])
    ids = set()
    for raw in data[:keep].decode("utf-8").splitlines():
        try:
            ids.add(json.loads(raw)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
    return ids


async def send(client: httpx.AsyncClient, job: Job) -> LineResult:
    raw = line_body(job.line)
    a = Answer(503, {"error": {"message": "not sent", "type": "service_unavailable"}})
    rid = ""
    for attempt in range(MAX_ATTEMPTS):
        try:
            r = await client.post(job.path, content=raw, headers={"content-type": "application/json"})
            rid = r.headers.get("x-hybridserve-request-id", "")
            try:
                body = r.json()
            except ValueError:
                body = {"error": {"message": r.text[:500], "type": "bad_gateway"}}
            after = r.headers.get("retry-after")
            a = Answer(r.status_code, body if isinstance(body, dict) else {"answer": body},
                       float(after) if after and after.replace(".", "", 1).isdigit() else None)
        except httpx.TransportError as err:
            a = Answer(503, {"error": {"message": f"{type(err).__name__}: {err}", "type": "service_unavailable"}})
        if not transient(a) or attempt + 1 == MAX_ATTEMPTS:
            break
        await asyncio.sleep(min(MAX_BACKOFF_S, a.retry_after_s if a.retry_after_s is not None else 2.0 ** attempt))
    return LineResult(a.status, rid, a.body)


def result_line(job: Job, out: LineResult) -> str:
    line = {"id": line_request_id("offline", job.line.no), "custom_id": job.line.custom_id,
            "response": {"status_code": out.status_code, "request_id": out.request_id, "body": out.body},
            "error": None}
    return json.dumps(line, separators=(",", ":")) + "\n"


async def run(base_url: str, api_key: str | None, jobs: list[Job], output: Path, concurrency: int,
              tally: Tally, say: Callable[[str], None], timeout_s: float) -> None:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s, limits=limits,
                                 trust_env=False) as client:
        with output.open("a", encoding="utf-8") as sink:
            async def one(job: Job) -> None:
                async with slots:
                    out = await send(client, job)
                sink.write(result_line(job, out))
                sink.flush()
                tally.add(out)
                say(tally.progress())
            await asyncio.gather(*(one(j) for j in jobs))


def origin(url: str) -> str:
    """The gateway's root from `http://host:port`, `.../v1` or `.../v1/`."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def run_batch(input_path: str, output_path: str, *, url: str | None, api_key: str | None, config: str,
              profile: str | None, concurrency: int, timeout_s: float, ready_timeout_s: float,
              progress: bool, engine_factory: str | None = None) -> dict:
    """Run an input file into OUTPUT (resuming it); the summary."""
    jobs = read_jobs(Path(input_path).read_text(encoding="utf-8"))
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(output)
    todo = [j for j in jobs if j.line.custom_id not in skip]
    tally = Tally(total=len(jobs), skipped=len(jobs) - len(todo))
    say = (lambda s: print(s, end="", file=sys.stderr, flush=True)) if progress else (lambda s: None)
    if not todo:
        return tally.summary(output)
    stack = None
    if url is None:
        from hybridserve.eval.stack import Stack

        stack = Stack(config, profile, output.with_suffix(".stack.log"), ready_timeout_s, engine_factory)
        url = stack.start()
    try:
        asyncio.run(run(origin(url), api_key, todo, output, concurrency, tally, say, timeout_s))
    finally:
        if progress:
            print(file=sys.stderr)
        if stack is not None:
            stack.stop()
    return tally.summary(output)
