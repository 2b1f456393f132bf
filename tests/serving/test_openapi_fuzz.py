"""Schemathesis against a live gateway (auth required) and a live native worker, from their
own /openapi.json; and the documents themselves, which must list every route served.

For every operation of each document it sends CASES generated cases (half negative where
the operation has anything to violate: wrong types, missing required fields, values out of
range, random bytes for a JSON body, bad or absent Authorization; the rest positive), each
with a hypothesis-drawn variation the document does not describe: on the gateway the
API key (the valid one most of the time, else none, a wrong one, or schemathesis's own),
everywhere a few stray query parameters, so that an operation without parameters still
gets CASES distinct cases. All of a target's cases go over ONE kept-alive connection.
Asserted for every answer: status < 500, OpenAI error JSON on every 4xx, no dropped
connection (the client's local port never changes, no transport error); every
CHECK_EVERY cases and after each operation a good request on that connection answers 200.

Cost: the copy of the document handed to schemathesis narrows what drives generation
time (max_tokens required, 1 to 3, n at most 2, strings of at most 24 characters,
arrays of at most 3 items, token ids below 256, the served model names); negative cases
step outside those narrowed bounds too. The worker runs the real tiny model with a
128-token context.

The Batch API's operations are fuzzed with real ids in reach: before the fuzz the gateway
gets files and batches of its own (`batch_ids`), and the fuzz document offers each
operation's id parameter (and a batch's `input_file_id`) only those, so positive cases reach
200 (a file to read, one to delete, one to batch, a batch to read and a slow one to cancel)
while negative cases try every other id.

HYBRIDSERVE_OPENAPI_FUZZ_CASES sets the cases per operation (default 1000) and
HYBRIDSERVE_FUZZ_SEED their seed.
"""
from __future__ import annotations

import copy
import json
import os
import string
import time
import zlib
from dataclasses import dataclass, field

import httpx
import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tests.serving.conftest import API_KEY, native_and_mock_stack  # noqa: E402
from tests.serving.test_hostile_input import base_body, local_port, openai_error_problem  # noqa: E402

CASES = int(os.environ.get("HYBRIDSERVE_OPENAPI_FUZZ_CASES", "1000"))
SEED = int(os.environ.get("HYBRIDSERVE_FUZZ_SEED", "20261201"))
CHECK_EVERY = 100
NATIVE = "tiny-transformer"
MAX_CONTEXT = 128
MODELS = {"gateway": ["up1", NATIVE, "auto"], "worker": [NATIVE]}
GOOD_MODEL = {"gateway": "up1", "worker": NATIVE}
WRONG_KEY = "Bearer sk-not-a-key"
DROP_HEADERS = {"connection", "accept-encoding", "content-length", "host", "transfer-encoding"}

pytestmark = pytest.mark.timeout(900)


# ---------------------------------------------------------------- the document, narrowed for cost

def narrow(schema) -> None:
    """Bound strings, arrays and token ids of a JSON schema, in place (see the module docstring)."""
    if isinstance(schema, list):
        for v in schema:
            narrow(v)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind == "string" and "enum" not in schema and "pattern" not in schema:
        schema["maxLength"] = min(schema.get("maxLength", 24), 24)
    elif kind == "array":
        schema["maxItems"] = min(schema.get("maxItems", 3), 3)
    elif kind == "integer" and "token id" in schema.get("description", ""):
        schema["maximum"] = 255
    for v in schema.values():
        narrow(v)


def cap_integer(prop: dict, most: int) -> None:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            branch["maximum"] = most


def fuzz_document(doc: dict, models: list[str], ids: dict | None = None) -> dict:
    """A copy of a served document with generation kept cheap (the served one is unchanged);
    `ids` maps (method, path) to {parameter: [the ids positive cases may use]}."""
    doc = copy.deepcopy(doc)
    for (method, path), params in (ids or {}).items():
        op = doc["paths"][path][method]
        for p in op.get("parameters", []):
            if p["name"] in params:
                p["schema"] = {"type": "string", "enum": params[p["name"]]}
        if "input_file_id" in params:
            doc["components"]["schemas"]["BatchCreateRequest"]["properties"]["input_file_id"] = {
                "type": "string", "enum": params["input_file_id"]}
    for name, schema in doc["components"]["schemas"].items():
        if name in ("Message", "TextPart", "StreamOptions"):
            narrow(schema)
        if not name.endswith("Body"):
            continue
        props = schema["properties"]
        narrow(props)
        props["model"] = {"type": "string", "enum": models}
        for field_name, most in (("max_completion_tokens", 3), ("n", 2), ("best_of", 2)):
            if field_name in props:
                cap_integer(props[field_name], most)
        props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": 3}   # never absent or null
        schema["required"] = sorted({*schema.get("required", ()), "max_tokens"})
    return doc


# ---------------------------------------------------------------- sending one case

@dataclass
class Tally:
    cases: int = 0
    negative: int = 0
    server_errors: int = 0
    dropped: int = 0
    unsendable_headers: int = 0
    by_status: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


TOKEN_CHARS = set(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


def sendable(name: str, value) -> bool:
    """Whether h11 lets this header onto the wire: a token for a name; a latin-1 value without
    CR, LF, NUL or surrounding whitespace. (What it refuses never reaches a server.)"""
    if not name or not set(name) <= TOKEN_CHARS or not isinstance(value, str):
        return False
    return (all(ord(c) < 256 for c in value) and not any(c in value for c in "\r\n\x00")
            and value == value.strip(" \t"))


class Target:
    """One live server, one kept-alive connection, a tally per operation."""

    def __init__(self, name: str, base: str):
        self.name = name
        self.base = base
        self.client = httpx.Client(trust_env=False, timeout=60, limits=httpx.Limits(
            max_connections=1, max_keepalive_connections=1, keepalive_expiry=300))
        self.port: int | None = None
        self.auth = {"authorization": f"Bearer {API_KEY}"} if name == "gateway" else {}

    def send(self, tally: Tally, method: str, path: str, **kw) -> httpx.Response | None:
        try:
            r = self.client.request(method, self.base + path, **kw)
        except httpx.TransportError as err:
            tally.dropped += 1
            tally.problems.append(f"transport error {type(err).__name__} on {method} {path}: {err}")
            self.port = None
            return None
        port = local_port(r)
        if port is None or (self.port is not None and port != self.port):
            tally.dropped += 1
            tally.problems.append(f"connection changed or closed after {method} {path} ({r.status_code})")
        self.port = port
        return r

    def case(self, tally: Tally, case, auth: str, query: dict) -> None:
        kw = case.as_transport_kwargs(base_url=self.base)
        headers = {}
        for k, v in (kw.get("headers") or {}).items():
            if k.lower() in DROP_HEADERS:
                continue
            if sendable(k, v):
                headers[k] = v
            else:
                tally.unsendable_headers += 1
        if self.name == "gateway" and auth != "generated":
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers.update({"good": self.auth, "wrong": {"authorization": WRONG_KEY}, "none": {}}[auth])
        content = None
        if "json" in kw:
            content = json.dumps(kw["json"]).encode()
        elif kw.get("files") or isinstance(kw.get("data"), dict):   # multipart, as requests encodes it
            prepared = requests.PreparedRequest()
            prepared.prepare_headers(None)
            prepared.prepare_body(kw.get("data"), kw.get("files"))
            content = prepared.body if isinstance(prepared.body, bytes) else (prepared.body or "").encode()
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            headers["content-type"] = prepared.headers.get("Content-Type", "multipart/form-data")
        elif kw.get("data") is not None:
            content = kw["data"] if isinstance(kw["data"], bytes) else str(kw["data"]).encode()
        params = {**query, **(kw.get("params") or {})}
        r = self.send(tally, kw["method"], kw["url"].removeprefix(self.base), headers=headers,
                      params=params, content=content)
        tally.cases += 1
        if r is None:
            return
        tally.by_status[r.status_code] = tally.by_status.get(r.status_code, 0) + 1
        what = f"{kw['method']} {case.formatted_path} [{describe(case)}] body={content!r:.160}"
        if r.status_code >= 500:
            tally.server_errors += 1
            tally.problems.append(f"{r.status_code} for {what}: {r.text[:200]!r}")
        elif r.status_code >= 400 and (why := openai_error_problem(r)):
            tally.problems.append(f"{r.status_code} for {what}: {why}")

    def good(self, tally: Tally) -> None:
        body = base_body(True, GOOD_MODEL[self.name])
        r = self.send(tally, "POST", "/v1/chat/completions", json=body, headers=self.auth)
        if r is not None and r.status_code != 200:
            tally.problems.append(f"good request after {tally.cases} cases got {r.status_code}: {r.text[:160]!r}")

    def close(self) -> None:
        self.client.close()


def describe(case) -> str:
    meta = case.meta
    data = getattr(getattr(meta, "phase", None), "data", None)
    return (getattr(data, "description", None) or "positive").replace("\n", "; ")[:160]


def variations(gateway: bool):
    """What the document does not describe: the API key, and stray query parameters."""
    keys = (st.sampled_from(["good"] * 7 + ["none", "wrong", "generated"]) if gateway
            else st.just("generated"))
    name = st.text(string.ascii_letters + "_", min_size=1, max_size=8)
    return st.tuples(keys, st.dictionaries(name, st.text(max_size=8), max_size=2))


def fuzz_operation(target: Target, op, mode: GenerationMode, n: int, tally: Tally, label: str) -> int:
    """Send up to n cases of one mode; returns how many were generated (fewer when the
    operation has nothing to violate, or its whole space is smaller)."""
    before = tally.cases

    @seed(zlib.crc32(f"{SEED}-{label}-{mode.value}".encode()))
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(op.as_strategy(generation_mode=mode), variations(target.name == "gateway"))
    def run(case, extra):
        if tally.cases - before >= n:
            return
        target.case(tally, case, *extra)
        tally.negative += mode == GenerationMode.NEGATIVE
        if tally.cases % CHECK_EVERY == 0:
            target.good(tally)

    try:
        run()
    except Unsatisfiable:
        pass
    return tally.cases - before


def toothless(target: str, label: str, tally: Tally) -> list[str]:
    """What the cases of one operation failed to reach: an answer (200; for a session, one that
    does not exist: 404; for a file or batch id, both), a refused body (400) on every POST
    with a body, a refused key (401) on the gateway's /v1 routes, and negative cases wherever
    the operation has something to violate. Not judged below 100 cases."""
    post, keyed = label.startswith("POST"), target == "gateway" and " /v1/" in label
    with_body = post and not label.endswith("/cancel")
    named = "{file_id}" in label or "{batch_id}" in label   # the fuzz document offers real ids
    want = (({404} if "{session_id}" in label else {200}) | ({404} if named else set())
            | ({400} if with_body else set()) | ({401} if keyed else set()))
    missing = want - set(tally.by_status)
    out = [f"no answer of {sorted(missing)} in {tally.cases} cases"] if missing else []
    if (post or keyed) and tally.negative < CASES // 4:
        out.append(f"only {tally.negative} negative cases")
    return out if CASES >= 100 else []


# ---------------------------------------------------------------- live tests

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openapi-fuzz")
    yield from native_and_mock_stack(tmp, NATIVE, MAX_CONTEXT,
                                     {"ledger_path": str(tmp / "ledger.sqlite"), "batch_concurrency": 8,
                                      "request_timeout_s": 3600})


def batch_ids(stack) -> dict:
    """Files and batches of the gateway's own for the fuzz to find (see the module docstring)."""
    h = {"authorization": f"Bearer {API_KEY}"}

    def upload(line: dict) -> str:
        text = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": line})
        r = httpx.post(stack.url + "/v1/files", headers=h, data={"purpose": "batch"}, trust_env=False,
                       files={"file": ("in.jsonl", text.encode())}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["id"]

    def batch(file_id: str) -> str:
        r = httpx.post(stack.url + "/v1/batches", headers=h, trust_env=False, timeout=30, json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    quick = {**base_body(True, GOOD_MODEL["gateway"]), "max_tokens": 1}
    read, gone, source = (upload(quick) for _ in range(3))
    done, slow = batch(source), batch(upload({**quick, "delay_s": 3000}))   # runs until cancelled
    one = {"file_id": [read]}
    return {("get", "/v1/files/{file_id}"): one, ("get", "/v1/files/{file_id}/content"): one,
            ("delete", "/v1/files/{file_id}"): {"file_id": [gone]},
            ("post", "/v1/batches"): {"input_file_id": [source]},
            ("get", "/v1/batches/{batch_id}"): {"batch_id": [done]},
            ("post", "/v1/batches/{batch_id}/cancel"): {"batch_id": [slow]}}


def base_of(stack, target: str) -> str:
    return stack.url if target == "gateway" else stack.workers[NATIVE]


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_docs_are_served_without_a_key(stack, target):
    base = base_of(stack, target)
    doc = httpx.get(base + "/openapi.json", trust_env=False, timeout=10)
    assert doc.status_code == 200 and doc.json()["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions"} <= set(doc.json()["paths"])
    page = httpx.get(base + "/docs", trust_env=False, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in page.text and "/openapi.json" in page.text
    if target == "gateway":   # the docs are open; the API behind them is not
        assert httpx.get(base + "/v1/models", trust_env=False, timeout=10).status_code == 401


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_fuzz_every_operation_from_the_served_document(stack, target):
    base = base_of(stack, target)
    served = httpx.get(base + "/openapi.json", trust_env=False, timeout=10).json()
    ids = batch_ids(stack) if target == "gateway" else None
    schema = schemathesis.openapi.from_dict(fuzz_document(served, MODELS[target], ids))
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) == sum(len(item) for item in served["paths"].values()) >= 5
    conn = Target(target, base)
    failed = []
    try:
        for op in ops:
            label = f"{op.method.upper()} {op.path}"
            tally, t0 = Tally(), time.perf_counter()
            got = fuzz_operation(conn, op, GenerationMode.NEGATIVE, CASES // 2, tally, label)
            fuzz_operation(conn, op, GenerationMode.POSITIVE, CASES - got, tally, label)
            conn.good(tally)
            print(f"\nopenapi fuzz, {target} {label}: {tally.cases} cases ({tally.negative} negative), "
                  f"5xx: {tally.server_errors}, dropped connections: {tally.dropped}, "
                  f"statuses: {dict(sorted(tally.by_status.items()))}, headers h11 refused: "
                  f"{tally.unsendable_headers}, {time.perf_counter() - t0:.1f} s", end="")
            tally.problems += toothless(target, label, tally)
            if tally.cases < CASES or tally.problems or tally.server_errors or tally.dropped:
                failed.append((label, tally))
    finally:
        conn.close()
    print()
    assert not failed, "\n".join(f"{label}: {t.cases} cases\n  " + "\n  ".join(t.problems[:15])
                                 for label, t in failed)


# ---------------------------------------------------------------- the documents, in process

def gateway_app(**gateway):
    from hybridserve.config import HybridserveConfig
    from hybridserve.gateway.app import create_app

    cfg = HybridserveConfig.model_validate({
        "gateway": gateway or {"auth": "required", "api_key_hashes": ["0" * 64]},
        "backends": [{"name": "up1", "arch": "transformer", "engine": "remote", "max_context": 256,
                      "url": "http://127.0.0.1:9", "price_per_hour": 0.1}]})
    return create_app(cfg).app


def worker_app():
    from hybridserve.worker.app import create_app
    from tests.serving.fake_engine import FakeEngine, SamplingParams

    return create_app(FakeEngine(), SamplingParams)


DOC_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def test_an_open_gateway_documents_no_key():
    doc = gateway_app(auth="disabled", thinking_budgets={}).openapi()
    assert "securitySchemes" not in doc["components"]
    assert not any("security" in op or "401" in op["responses"] for item in doc["paths"].values()
                   for op in item.values())
    effort = doc["components"]["schemas"]["GatewayCompletionBody"]["properties"]["reasoning_effort"]
    assert effort["type"] == "null"   # no budget configured: every named effort is a 400


@pytest.mark.parametrize("make", [gateway_app, worker_app], ids=["gateway", "worker"])
def test_the_document_lists_every_route_served(make):
    """A route added without documentation (include_in_schema=False, a raw Starlette route,
    a POST whose body is not described) fails here."""
    app = make()
    doc = app.openapi()
    served = {(r.path, m.lower()) for r in app.routes if r.path not in DOC_ROUTES
              for m in (getattr(r, "methods", None) or {"*"}) if m != "HEAD"}
    documented = {(p, m) for p, item in doc["paths"].items() for m in item}
    assert served == documented
    schemas = doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            for status, resp in responses.items():
                if status.startswith(("4", "5")) and not (path == "/health" and status == "503"):
                    assert resp["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
            if method == "post" and path.endswith("/cancel"):
                assert "requestBody" not in op and "404" in responses, path
            elif method == "post" and path == "/v1/files":
                form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
                assert set(form["required"]) == {"file", "purpose"} and "400" in responses
            elif method == "post":
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                body = schemas[ref.rsplit("/", 1)[1]]
                if path == "/v1/batches":
                    assert set(body["required"]) == {"input_file_id", "endpoint", "completion_window"}
                    assert body["additionalProperties"] is False
                else:
                    assert {"model"} <= set(body["required"])
                    assert body["additionalProperties"] == {"$ref": "#/components/schemas/JsonValue"}
                assert "400" in responses
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}


def test_the_gateway_documents_its_key_and_its_own_fields():
    doc = gateway_app().openapi()
    assert doc["components"]["securitySchemes"]["bearer"] == {**doc["components"]["securitySchemes"]["bearer"],
                                                               "type": "http", "scheme": "bearer"}
    for path, item in doc["paths"].items():
        for op in item.values():
            assert ("security" in op) == path.startswith("/v1/"), path
            assert ("401" in op["responses"]) == path.startswith("/v1/"), path
    body = doc["components"]["schemas"]["GatewayChatCompletionBody"]["properties"]
    efforts = next(b for b in body["reasoning_effort"]["anyOf"] if "enum" in b)["enum"]
    assert efforts == ["low", "medium", "high"]
    for name in ("mode", "hybridserve_vote", "hybridserve_quality_floor", "hybridserve_task",
                 "max_thinking_tokens", "messages"):
        assert name in body
    headers = {p["name"] for p in doc["paths"]["/v1/chat/completions"]["post"]["parameters"]}
    assert {"x-session-id", "x-hybridserve-task", "x-hybridserve-quality-floor"} <= headers


def integer_literals(v):
    """6.0 written as 6: JSON Schema's integers include 6.0, protocol's strict ones do not, and
    the document's description says so (`openapi.STRICT_TYPES`)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 63:
        return int(v)
    if isinstance(v, list):
        return [integer_literals(x) for x in v]
    if isinstance(v, dict):
        return {k: integer_literals(x) for k, x in v.items()}
    return v


def positive_bodies(doc: dict, path: str, n: int) -> list:
    schema = schemathesis.openapi.from_dict(doc)
    bodies: list = []

    @seed(SEED)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(schema[path]["POST"].as_strategy(generation_mode=GenerationMode.POSITIVE))
    def collect(case):
        bodies.append(integer_literals(case.body))

    collect()
    return bodies


def described_only(b: dict) -> bool:
    """The cross-field rules the document states in words, not in schema."""
    names = [(t.get("function") or {}).get("name") for t in b.get("tools") or [] if isinstance(t, dict)]
    choice = b.get("tool_choice")
    return ((b.get("top_logprobs") is not None and not b.get("logprobs"))     # needs logprobs: true
            or b.get("best_of") not in (None, 1, b.get("n", 1))                # only 1 or n
            or (b.get("hybridserve_vote") and (b.get("n", 1) < 2 or b.get("stream")))
            or len(names) != len(set(names))                                   # tool names unique
            or (isinstance(choice, dict) and (choice.get("function") or {}).get("name") not in names))


@pytest.mark.parametrize("target", ["gateway", "worker"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_what_the_document_admits_is_served(target, path):
    """The documented bodies are honest: schemathesis's positive cases pass protocol's
    validation and, on the gateway, the governor's and the router's (the rules the document
    states in words aside); and protocol's bounds are in the document."""
    from hybridserve import protocol as P
    from hybridserve.config import GatewayConfig
    from hybridserve.gateway.governor import parse_controls
    from hybridserve.gateway.routing import request_quality

    doc = (gateway_app if target == "gateway" else worker_app)().openapi()
    model = P.ChatCompletionRequest if "chat" in path else P.CompletionRequest
    bodies = positive_bodies(doc, path, 300)
    refused = []
    for b in bodies:
        if described_only(b):
            continue
        try:
            data = P.parse_body(json.dumps(b).encode())
            P.validate_request(model, data)
            if target == "gateway":
                parse_controls(data, GatewayConfig(auth="disabled"), bool(data.get("stream")))
                request_quality(data, {})
        except Exception as err:  # noqa: BLE001 - any refusal is the finding
            refused.append((b, getattr(err, "message", repr(err))))
    assert len(bodies) >= 250
    assert not refused, refused[:5]
    ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    props = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert props["n"]["maximum"] == P.MAX_N and props["stop"]["anyOf"][1]["maxItems"] == 4
    assert "6.0" in doc["info"]["description"]
