"""The Batch API against a live `hybridserve up` (auth required, three keys, a mock upstream).

The `openai` client's files and batches calls round-trip unchanged; each malformed input
fails validation naming its line; runtime failures become error lines; cancel and a short
completion window leave every custom_id exactly one line; a key budget that runs out
mid-batch gives the rest 429 error lines; files and batches of one key are 404 to another;
upload limits answer 400; a line reaches a native worker with `hybridserve_priority: batch`.
A gateway killed mid-batch (SIGKILL; `up` restarts it) resumes the batch: one line per
custom_id, and no line recorded before the kill is sent again; one stopped gracefully (SIGTERM)
lets its lines in flight finish, so after the restart no line is sent twice at all.
`hybridserve batch` runs the same lines against the gateway (--url) or a private stack, and
resumes an output file. The stack's tests run twice: with the Batch API in SQLite, and in Redis
(`state_url`); two replicas sharing Redis share files and batches and run each line once.

Budget arithmetic (mock answers use 4 tokens): a completion of prompt "hi" with max_tokens
4 reserves 4 (prompt upper bound) + 4 = 8 tokens, and a key with a 20-token cap is admitted
while spent + reserved < 20, so at most 20 + 8 tokens are ever spent: at most 7 lines.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid

import httpx
import pytest

from hybridserve.gateway.auth import hash_key
from tests.serving.conftest import (API_KEY, log_tail, start_mock_upstream, start_stack, stop_process,
                                    wait_until)

pytestmark = pytest.mark.timeout(240)

KEY_B, KEY_C = "sk-batch-tenant-b", "sk-batch-budget-c"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TOKEN_CAP = 20
DONE = ("completed", "failed", "expired", "cancelled")


# ---------------------------------------------------------------- fixtures and helpers

def gateway_config(tmp, **extra) -> dict:
    return {"api_key_hashes": [hash_key(API_KEY), hash_key(KEY_B), hash_key(KEY_C)],
            "ledger_path": str(tmp / "ledger.sqlite"), "batch_concurrency": 4,
            "budgets": [{"name": "c-daily", "key": hash_key(KEY_C), "period": "day", "tokens": TOKEN_CAP}],
            **extra}


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    proc, backend = start_mock_upstream(tmp_path_factory.mktemp("batch-mock"), "up1")
    yield backend
    stop_process(proc, 5)


def as_native(mock: dict) -> dict:
    """The mock again, as a `native` worker running elsewhere (`host`): the gateway sends it the
    native-only fields (hybridserve_priority) that it strips for remote engines."""
    port = int(mock["url"].rsplit(":", 1)[1])
    return {"name": "up-native", "arch": "transformer", "engine": "native",
            "checkpoint": "builtin:tiny-transformer", "host": "127.0.0.1", "port": port, "max_context": 256,
            "price_per_hour": 0.1}


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def stack(request, tmp_path_factory, mock):
    """The gateway with its Batch API in the SQLite batch database, then in Redis (`state_url`):
    every test on it holds for both stores."""
    tmp = tmp_path_factory.mktemp("batches")
    shared = {}
    if request.param == "redis":
        shared = {"state_url": request.getfixturevalue("redis_url"), "state_prefix": f"b{uuid.uuid4().hex[:8]}"}
    s = start_stack(tmp, [mock, as_native(mock)], gateway=gateway_config(tmp, **shared))
    s.extra["tmp"] = tmp
    yield s
    stop_process(s.proc)
    assert s.proc.returncode == 0, log_tail(s.log)


class Api:
    """The Batch API over HTTP as one key."""

    def __init__(self, stack, key: str = API_KEY):
        self.url = stack.url
        self.h = {"authorization": f"Bearer {key}"}

    def upload(self, content: bytes | str, purpose: str = "batch", name: str = "in.jsonl") -> httpx.Response:
        data = content.encode() if isinstance(content, str) else content
        return httpx.post(self.url + "/v1/files", headers=self.h, data={"purpose": purpose},
                          files={"file": (name, data)}, trust_env=False, timeout=60)

    def file_id(self, lines: list[dict]) -> str:
        r = self.upload("".join(json.dumps(x) + "\n" for x in lines))
        assert r.status_code == 200, r.text
        return r.json()["id"]

    def create(self, file_id: str, endpoint: str = CHAT, window: str = "24h", **extra) -> httpx.Response:
        return httpx.post(self.url + "/v1/batches", headers=self.h, trust_env=False, timeout=30,
                          json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": window,
                                **extra})

    def batch(self, lines: list[dict], endpoint: str = CHAT, window: str = "24h") -> dict:
        r = self.create(self.file_id(lines), endpoint, window)
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.h, trust_env=False, timeout=30)

    def post(self, path: str) -> httpx.Response:
        return httpx.post(self.url + path, headers=self.h, trust_env=False, timeout=30)

    def wait(self, batch_id: str, until=DONE, timeout_s: float = 60) -> dict:
        return wait_until(lambda: (b := self.get(f"/v1/batches/{batch_id}").json())["status"] in until and b,
                          timeout_s, f"batch {batch_id} {until}", 0.2)

    def lines(self, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        r = self.get(f"/v1/files/{file_id}/content")
        assert r.status_code == 200, r.text
        return [json.loads(x) for x in r.text.splitlines()]

    def results(self, b: dict) -> tuple[list[dict], list[dict]]:
        return self.lines(b["output_file_id"]), self.lines(b["error_file_id"])


def chat_line(cid: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"messages": [{"role": "user", "content": f"hello {cid}"}], "max_tokens": 3, **body}}


def completion_line(cid: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": COMPLETIONS,
            "body": {"model": "up1", "prompt": "hi", "max_tokens": 4, **body}}


def one_line_each(out: list[dict], err: list[dict], ids: list[str]) -> None:
    got = [x["custom_id"] for x in out + err]
    assert sorted(got) == sorted(ids), f"{len(got)} lines for {len(ids)} custom_ids"


def mock_stats(mock) -> dict:
    return httpx.get(mock["url"] + "/stats", trust_env=False, timeout=5).json()


# ---------------------------------------------------------------- the openai client

def test_openai_client_round_trip(stack, mock):
    from openai import OpenAI

    client = OpenAI(base_url=stack.base_url, api_key=API_KEY, timeout=30, max_retries=0)
    ids = [f"req-{i}" for i in range(6)]
    lines = [chat_line(cid, mock_fill=True, **({"model": "up1"} if i % 2 else {})) for i, cid in enumerate(ids)]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    f = client.files.create(file=("requests.jsonl", text.encode()), purpose="batch")
    assert (f.object, f.purpose, f.bytes, f.filename) == ("file", "batch", len(text.encode()), "requests.jsonl")
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).text == text

    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                              metadata={"job": "nightly"})
    assert b.status in ("validating", "in_progress", "finalizing", "completed")
    assert b.metadata == {"job": "nightly"}
    deadline = time.monotonic() + 60
    while b.status not in DONE and time.monotonic() < deadline:
        time.sleep(0.2)
        b = client.batches.retrieve(b.id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (6, 6, 0)
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    assert b.error_file_id is None and b.output_file_id

    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ids
    for x in out:
        assert x["error"] is None and x["id"].startswith("batch_req_")
        assert x["response"]["status_code"] == 200 and x["response"]["request_id"]
        usage = x["response"]["body"]["usage"]
        assert usage["completion_tokens"] == 3 and usage["cost_usd"] > 0
    by_id = {x["custom_id"]: x["response"]["body"]["usage"] for x in out}
    assert by_id["req-0"]["route_policy"] == "economics"   # no model named: auto:cheapest (= economics)
    assert by_id["req-1"]["route_policy"] != "economics" and by_id["req-1"]["route_backend"] == "up1"

    assert b.usage.output_tokens == 18 and b.usage.total_tokens == b.usage.input_tokens + 18
    totals = b.model_extra["hybridserve_totals"]
    assert totals["cost_usd"] == pytest.approx(sum(u["cost_usd"] for u in by_id.values()), rel=1e-6)
    assert totals["completion_tokens"] == 18
    assert b.id in [x.id for x in client.batches.list(limit=100)]
    metrics = httpx.get(stack.url + "/metrics", trust_env=False).text
    ok = [l for l in metrics.splitlines() if l.startswith('hybridserve_gateway_batch_lines_total{outcome="ok"}')]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 6
    assert f.id in [x.id for x in client.files.list()]
    out_file = client.files.retrieve(b.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes > 0
    client.close()


def test_lines_go_upstream_at_batch_priority(stack, mock):
    api = Api(stack)
    done = api.wait(api.batch([chat_line("p", model="up-native", mock_tag="priority")])["id"])
    assert done["request_counts"]["completed"] == 1, done
    body = mock_stats(mock)["last_body"]
    assert body["mock_tag"] == "priority" and body["hybridserve_priority"] == "batch"


# ---------------------------------------------------------------- validation

BAD_LINES = {
    "invalid_json_line": ('{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {', None),
    "not_an_object": ("[1, 2, 3]", "invalid_json_line"),
    "missing_custom_id": (json.dumps({k: v for k, v in chat_line("x").items() if k != "custom_id"}), None),
    "invalid_custom_id": (json.dumps({**chat_line("x"), "custom_id": 7}), None),
    "duplicate_custom_id": (json.dumps(chat_line("good-1")), None),
    "invalid_url": (json.dumps({**chat_line("x"), "url": "/v1/embeddings"}), None),
    "invalid_method": (json.dumps({**chat_line("x"), "method": "GET"}), None),
    "invalid_body": (json.dumps({**chat_line("x"), "body": {"messages": "hi"}}), None),
    "body_not_object": (json.dumps({**chat_line("x"), "body": [1]}), "invalid_body"),
    "stream": (json.dumps(chat_line("x", stream=True)), "invalid_body"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_malformed_line_fails_the_batch_naming_it(stack, case):
    api = Api(stack)
    bad, code = BAD_LINES[case]
    good = [json.dumps(chat_line("good-1")), json.dumps(chat_line("good-2"))]
    r = api.upload("\n".join([good[0], "", good[1], bad]) + "\n")   # the blank line is skipped, still counted
    assert r.status_code == 200, r.text
    created = api.create(r.json()["id"])
    assert created.status_code == 200, created.text
    b = api.wait(created.json()["id"])
    assert b["status"] == "failed" and b["failed_at"] and b["output_file_id"] is None
    assert b["errors"]["object"] == "list"
    assert [(e["line"], e["code"]) for e in b["errors"]["data"]] == [(4, code or case)]
    assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


def test_every_bad_line_is_named(stack):
    api = Api(stack)
    lines = [json.dumps(chat_line("a")), "not json", json.dumps(chat_line("a")), json.dumps(chat_line("b")),
             json.dumps({**chat_line("c"), "url": COMPLETIONS})]
    b = api.wait(api.create(api.upload("\n".join(lines)).json()["id"]).json()["id"])
    errors = b["errors"]["data"]
    assert [(e["line"], e["code"]) for e in errors] == [(2, "invalid_json_line"), (3, "duplicate_custom_id"),
                                                        (5, "invalid_url")]
    assert errors[1]["param"] == "custom_id" and "line 1" in errors[1]["message"]


@pytest.mark.parametrize("body, param", [
    ({"endpoint": "/v1/embeddings"}, "endpoint"),
    ({"completion_window": "25x"}, "completion_window"),
    ({"completion_window": "169h"}, "completion_window"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"input_file_id": 5}, "input_file_id"),
    ({"surprise": True}, "surprise"),
])
def test_a_bad_create_request_is_a_400_naming_the_field(stack, body, param):
    api = Api(stack)
    fid = api.file_id([chat_line("a")])
    payload = {"input_file_id": fid, "endpoint": CHAT, "completion_window": "24h", **body}
    r = httpx.post(stack.url + "/v1/batches", headers=api.h, json=payload, trust_env=False, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_runtime_failures_become_error_lines(stack):
    api = Api(stack)
    lines = [chat_line("ok-1", model="up1"), chat_line("nope", model="no-such-model"),
             chat_line("bad-effort", model="up1", reasoning_effort="extreme"), chat_line("ok-2")]
    b = api.wait(api.batch(lines)["id"])
    assert b["status"] == "completed"
    assert b["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    out, err = api.results(b)
    one_line_each(out, err, ["ok-1", "nope", "bad-effort", "ok-2"])
    by_id = {x["custom_id"]: x for x in err}
    assert by_id["nope"]["response"]["status_code"] == 404
    assert by_id["nope"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert by_id["bad-effort"]["response"]["status_code"] == 400
    assert all(x["error"] is None for x in err)


# ---------------------------------------------------------------- cancel and expiry

def test_cancel_stops_new_lines_and_accounts_for_every_one(stack):
    api = Api(stack)
    ids = [f"c{i}" for i in range(24)]
    b = api.batch([chat_line(cid, model="up1", delay_s=0.5) for cid in ids])
    api.wait(b["id"], ("in_progress",), 30)
    wait_until(lambda: api.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"] >= 1, 30,
               "a line done")
    r = api.post(f"/v1/batches/{b['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled"), r.text
    assert r.json()["cancelling_at"] is not None
    done = api.wait(b["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] >= done["cancelling_at"]
    out, err = api.results(done)
    one_line_each(out, err, ids)
    cancelled = [x for x in err if x["error"] and x["error"]["code"] == "batch_cancelled"]
    assert out and cancelled and all(x["response"] is None for x in cancelled)
    counts = done["request_counts"]
    assert (counts["completed"], counts["failed"], counts["total"]) == (len(out), len(err), 24)
    again = api.post(f"/v1/batches/{b['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    finished = api.wait(api.batch([chat_line("x", model="up1")])["id"])
    refused = api.post(f"/v1/batches/{finished['id']}/cancel")
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    assert api.post("/v1/batches/batch_nope/cancel").status_code == 404


def test_a_short_window_expires_the_lines_not_run(stack):
    api = Api(stack)
    ids = [f"e{i}" for i in range(40)]            # 40 lines x 0.5 s at 4 in flight: 5 s of work
    b = api.batch([chat_line(cid, model="up1", delay_s=0.5) for cid in ids], window="2s")
    assert b["expires_at"] - b["created_at"] == 2
    done = api.wait(b["id"], timeout_s=30)
    assert done["status"] == "expired" and done["expired_at"] >= done["expires_at"]
    out, err = api.results(done)
    one_line_each(out, err, ids)
    expired = [x for x in err if x["error"] and x["error"]["code"] == "batch_expired"]
    assert out and expired and len(out) + len(expired) == 40
    assert done["request_counts"] == {"total": 40, "completed": len(out), "failed": len(err)}


# ---------------------------------------------------------------- budgets and ownership

def test_a_key_budget_spent_mid_batch_gives_the_rest_429_lines(stack):
    api = Api(stack, KEY_C)
    ids = [f"b{i}" for i in range(12)]
    b = api.wait(api.batch([completion_line(cid) for cid in ids], COMPLETIONS)["id"])
    assert b["status"] == "completed"
    out, err = api.results(b)
    one_line_each(out, err, ids)
    assert 1 <= len(out) <= 7 and len(err) >= 5
    for x in err:
        assert x["response"]["status_code"] == 429
        assert x["response"]["body"]["error"]["code"] == "budget_exceeded"
    spent = api.get("/v1/budgets").json()["data"][0]["spent_tokens"]
    assert spent == 4 * len(out) <= TOKEN_CAP + 8
    assert b["hybridserve_totals"]["gateway_total_tokens"] == spent


def test_files_and_batches_belong_to_their_key(stack):
    a, other = Api(stack), Api(stack, KEY_B)
    fid = a.file_id([chat_line("a", model="up1")])
    bid = a.batch([chat_line("a", model="up1")])["id"]
    for path in (f"/v1/files/{fid}", f"/v1/files/{fid}/content", f"/v1/batches/{bid}"):
        r = other.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
    assert other.post(f"/v1/batches/{bid}/cancel").status_code == 404
    assert httpx.delete(stack.url + f"/v1/files/{fid}", headers=other.h, trust_env=False).status_code == 404
    assert other.create(fid).status_code == 404
    assert fid not in [f["id"] for f in other.get("/v1/files").json()["data"]]
    assert bid not in [x["id"] for x in other.get("/v1/batches").json()["data"]]
    assert a.get(f"/v1/files/{fid}").status_code == 200            # B's delete did nothing
    output = a.wait(bid)["output_file_id"]
    assert other.get(f"/v1/files/{output}/content").status_code == 404
    assert a.get(f"/v1/files/{output}/content").status_code == 200
    assert httpx.get(stack.url + "/v1/batches", trust_env=False).status_code == 401


# ---------------------------------------------------------------- files

def test_upload_limits_and_refusals(stack):
    from hybridserve.gateway.files import MAX_FILE_BYTES, MAX_FILE_LINES

    api = Api(stack)

    def refused(r: httpx.Response, param: str, code: str | None = None) -> None:
        assert r.status_code == 400, r.text[:300]
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param
        if code:
            assert err["code"] == code

    refused(api.upload("{}\n", purpose="fine-tune"), "purpose")
    refused(api.upload(""), "file", "empty_file")
    refused(api.upload(b"\xff\xfe{}\n"), "file", "invalid_file_format")
    refused(api.upload("{}\n" * (MAX_FILE_LINES + 1)), "file", "too_many_lines")
    assert api.upload("{}\n" * MAX_FILE_LINES).status_code == 200
    refused(api.upload(b"x" * (MAX_FILE_BYTES + 1)), "file", "file_too_large")
    no_file = httpx.post(stack.url + "/v1/files", headers=api.h, data={"purpose": "batch"},
                         files={"other": ("x", b"{}")}, trust_env=False)
    refused(no_file, "file")
    as_json = httpx.post(stack.url + "/v1/files", headers=api.h, json={"purpose": "batch"}, trust_env=False)
    assert as_json.status_code == 400 and "multipart" in as_json.json()["error"]["message"]


def test_file_list_pages_and_delete(stack):
    api = Api(stack, KEY_B)
    made = [api.file_id([chat_line(f"p{i}")]) for i in range(3)]
    page = api.get("/v1/files?limit=2&purpose=batch").json()
    assert [f["id"] for f in page["data"]] == made[::-1][:2] and page["has_more"]
    rest = api.get(f"/v1/files?limit=2&purpose=batch&after={page['last_id']}").json()
    assert rest["data"][0]["id"] == made[0]
    oldest_first = api.get("/v1/files?order=asc&purpose=batch").json()["data"]
    assert [f["id"] for f in oldest_first][-3:] == made
    assert api.get("/v1/files?limit=0").status_code == 400
    r = httpx.delete(stack.url + f"/v1/files/{made[1]}", headers=api.h, trust_env=False)
    assert r.status_code == 200 and r.json() == {"id": made[1], "object": "file", "deleted": True}
    assert api.get(f"/v1/files/{made[1]}").status_code == 404
    assert api.get(f"/v1/files/{made[1]}/content").status_code == 404
    assert made[1] not in [f["id"] for f in api.get("/v1/files").json()["data"]]


def test_batch_list_pages(stack):
    api = Api(stack, KEY_B)
    ids = [api.batch([chat_line("l", model="up1")])["id"] for _ in range(3)]
    page = api.get("/v1/batches?limit=2").json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = api.get(f"/v1/batches?limit=100&after={page['last_id']}").json()
    assert rest["data"][0]["id"] == ids[0]
    assert api.get("/v1/batches?limit=101").status_code == 400


# ---------------------------------------------------------------- restart

def gateway_pid(log) -> int:
    pids = re.findall(r"(?:started|restarted) gateway \(pid (\d+)", log.read_text(errors="replace"))
    return int(pids[-1])


def restart_tags(mock, prefix: str) -> dict[str, int]:
    return {k: v for k, v in mock_stats(mock)["tags"].items() if k.startswith(prefix)}


def test_a_gateway_stopped_mid_batch_drains_and_resumes_running_nothing_twice(tmp_path, mock):
    n = 16
    s = start_stack(tmp_path, [mock], gateway=gateway_config(tmp_path, batch_concurrency=2))
    api = Api(s)
    ids = [f"g{i}" for i in range(n)]
    b = api.batch([chat_line(cid, model="up1", delay_s=0.4, mock_tag=f"graceful-{cid}") for cid in ids])
    try:
        wait_until(lambda: api.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"] >= 3, 60,
                   "three lines done")
    finally:
        stop_process(s.proc)                      # SIGTERM: lines in flight finish and are recorded
    assert s.proc.returncode == 0, log_tail(s.log)
    assert len(restart_tags(mock, "graceful-")) < n
    s = start_stack(tmp_path, [mock], gateway=gateway_config(tmp_path, batch_concurrency=2))
    try:
        api = Api(s)
        done = api.wait(b["id"], timeout_s=90)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == n
        one_line_each(*api.results(done), ids)
        tags = restart_tags(mock, "graceful-")
        assert sorted(tags) == sorted(f"graceful-{cid}" for cid in ids) and set(tags.values()) == {1}, tags
    finally:
        stop_process(s.proc)


def test_a_gateway_killed_mid_batch_resumes_it(tmp_path, mock):
    concurrency, n = 2, 16
    s = start_stack(tmp_path, [mock], gateway=gateway_config(tmp_path, batch_concurrency=concurrency))
    try:
        api = Api(s)
        ids = [f"r{i}" for i in range(n)]
        b = api.batch([chat_line(cid, model="up1", delay_s=0.4, mock_tag=f"restart-{cid}") for cid in ids])
        wait_until(lambda: api.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"] >= 5, 60,
                   "five lines done")
        before = api.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"]
        victim = gateway_pid(s.log)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: gateway_pid(s.log) != victim, 30, "gateway restarted")
        wait_until(lambda: httpx.get(s.url + "/health", trust_env=False, timeout=2).status_code == 200, 60,
                   "gateway back")
        done = api.wait(b["id"], timeout_s=90)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == n
        out, err = api.results(done)
        assert not err
        one_line_each(out, err, ids)
        tags = restart_tags(mock, "restart-")
        assert sorted(tags) == sorted(f"restart-{cid}" for cid in ids)
        again = [k for k, v in tags.items() if v > 1]
        # only lines in flight at the kill may run twice; a resume that redid recorded lines would
        # send at least the `before` ones again
        assert len(again) <= concurrency < before, (again, before)
        assert "resuming 1 unfinished batch" in log_tail(s.log, 400)
    finally:
        stop_process(s.proc)


def test_two_replicas_sharing_redis_share_files_and_batches_and_run_each_line_once(tmp_path, mock, redis_url):
    """Replicas with their own disks and one `state_url`: a file uploaded through one is batched
    through the other, both report the batch and serve its output, and every line runs once."""
    shared = {"state_url": redis_url, "state_prefix": f"two{uuid.uuid4().hex[:8]}", "batch_concurrency": 2}
    stacks = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        stacks.append(start_stack(tmp_path / name, [mock], gateway=gateway_config(tmp_path / name, **shared)))
    a, b = (Api(s) for s in stacks)
    try:
        ids = [f"x{i}" for i in range(12)]
        fid = a.file_id([chat_line(cid, model="up1", delay_s=0.1, mock_tag=f"two-{cid}") for cid in ids])
        assert b.get(f"/v1/files/{fid}").json()["id"] == fid
        r = b.create(fid)
        assert r.status_code == 200, r.text
        done = a.wait(r.json()["id"], timeout_s=60)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == len(ids)
        assert a.results(done) == b.results(done)
        one_line_each(*b.results(done), ids)
        tags = restart_tags(mock, "two-")
        assert sorted(tags) == sorted(f"two-{cid}" for cid in ids) and set(tags.values()) == {1}, tags
        assert [x["id"] for x in a.get("/v1/batches").json()["data"]] == [done["id"]]
        assert Api(stacks[1], KEY_B).get(f"/v1/batches/{done['id']}").status_code == 404
    finally:
        for s in stacks:
            stop_process(s.proc)
    for s in stacks:
        assert s.proc.returncode == 0, log_tail(s.log)


# ---------------------------------------------------------------- offline: hybridserve batch

def run_cli(*args: str) -> tuple[int, str, str]:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "hybridserve.cli", "batch", *args, "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_offline_batch_command_resumes_and_sums(stack, tmp_path):
    ids = [f"o{i}" for i in range(5)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(chat_line(cid, model="up1", mock_fill=True)) + "\n" for cid in ids))
    out = tmp_path / "out.jsonl"
    kept = [{"id": "x", "custom_id": cid, "response": {"status_code": 200, "request_id": "r", "body": {}},
             "error": None} for cid in ids[:2]]
    out.write_text("".join(json.dumps(x) + "\n" for x in kept) + '{"custom_id": "o2", "resp')   # torn last line
    code, stdout, stderr = run_cli(str(src), "-o", str(out), "--url", stack.base_url, "--api-key", API_KEY)
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["lines"], summary["skipped"], summary["ran"], summary["failed"]) == (5, 2, 3, 0)
    assert summary["cost_usd"] > 0 and summary["completion_tokens"] == 9
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ids and lines[:2] == kept
    assert all(x["response"]["status_code"] == 200 for x in lines[2:])
    code, stdout, _ = run_cli(str(src), "-o", str(out), "--url", stack.base_url, "--api-key", API_KEY)
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["ran"] == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_line("a")) + "\nnot json\n")
    code, _, stderr = run_cli(str(bad), "-o", str(tmp_path / "bad-out.jsonl"), "--url", stack.base_url)
    assert code == 2 and "line 2" in stderr and not (tmp_path / "bad-out.jsonl").exists()


def test_offline_batch_command_starts_a_private_stack(tmp_path, mock):
    import yaml

    cfg = tmp_path / "models.yaml"
    gateway = {"ledger_path": str(tmp_path / "ledger.sqlite")}
    cfg.write_text(yaml.safe_dump({"gateway": gateway, "backends": [mock]}))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(completion_line(f"s{i}")) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = run_cli(str(src), "-o", str(out), "--config", str(cfg), "--ready-timeout", "60")
    assert code == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["ran"] == 3
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["s0", "s1", "s2"]
    assert all(x["response"]["status_code"] == 200 for x in lines)
