"""A hostile client against a live gateway (auth required) and a live native worker.

Over ONE kept-alive connection per target it sends the bodies once seen to draw a 500 or
drop the connection (a deeply nested array, a lone surrogate, a list where a governor
control wants a scalar, the UTF-8 bytes of a surrogate; on the gateway a task tag ending in
a newline, which its receipt header echoed), then seeded-random mutations of valid chat and
completion bodies: wrong types, missing and unknown fields, deep nesting, surrogates,
NaN/Infinity/1e999/huge-integer literals, raw-byte damage, odd content types. After
every case the same connection must serve a good request. Asserted for every answer:
status < 500, OpenAI error JSON on every 4xx, and no dropped connection (a request that
had to open a new connection, or failed in transport, counts as one).

HYBRIDSERVE_FUZZ_CASES sets the random cases per endpoint and target (default 300) and
HYBRIDSERVE_FUZZ_SEED their seed.
"""
from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass, field

import httpx
import pytest

from tests.serving.conftest import native_and_mock_stack

pytestmark = pytest.mark.timeout(120)

CASES_PER_ENDPOINT = int(os.environ.get("HYBRIDSERVE_FUZZ_CASES", "300"))
NATIVE = "tiny-transformer"
PATHS = ("/v1/chat/completions", "/v1/completions")
SEED = int(os.environ.get("HYBRIDSERVE_FUZZ_SEED", "20261201"))


class Raw:
    """A value written into the JSON text verbatim (what json.dumps cannot produce)."""

    def __init__(self, text: str):
        self.text = text


def encode(obj, ascii_only: bool = True) -> bytes:
    """JSON bytes of `obj`, `Raw` values spliced in; lone surrogates become ED A0 80-style
    bytes when not `ascii_only` (surrogatepass), else `\\ud800` escapes."""
    raws: list[str] = []

    def mark(o):
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"@@RAW{len(raws) - 1}@@"
        raise TypeError(type(o).__name__)
    text = json.dumps(obj, default=mark, ensure_ascii=ascii_only)
    for i, t in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', t, 1)
    return text.encode("utf-8", "surrogatepass")


def nest(depth: int, kind: type):
    v: object = 1
    for _ in range(depth):
        v = [v] if kind is list else {"a": v}
    return v


DEEP = 3000
HOSTILE = [
    None, True, False, 0, -1, 3, 1.5, -0.0, 2 ** 63, -(2 ** 63) - 1, 10 ** 30, 1e308,
    "", "x", "fast", "deep", "high", "auto", "\ud800", "a\udfffz", "\udc80\ud800", "\x00", "é🙂",
    "x" * 100_000, [], [1], [[1, 2], [3]], ["a"] * 5, ["high"], {}, {"a": 1}, {"type": "text"},
    {"type": "image_url"}, [{"role": "user"}], [{"type": "text", "text": "\ud800"}],
    nest(40, list), nest(40, dict), list(range(5000)), ["s"] * 50,
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("1" + "0" * 5000),
    Raw("[" * DEEP + "]" * DEEP), Raw('{"a":' * 200 + "1" + "}" * 200),
]
# token counts are never made absent or large-and-valid: a worker would then generate for seconds
TOKEN_COUNT_VALUES = [0, -1, 1, 1.5, "2", True, 2 ** 63, 10 ** 30, 10 ** 6, [2], {"a": 1}, "\ud800",
                      Raw("NaN"), Raw("1e999"), Raw("[" * DEEP + "]" * DEEP)]
PROTECTED = ("max_tokens", "max_completion_tokens")
COMMON_FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
                 "stop_token_ids", "ignore_eos", "stream", "stream_options", "user", "max_thinking_tokens",
                 "mode", "reasoning_effort", "hybridserve_vote", "hybridserve_quality_floor",
                 "hybridserve_task", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "logit_bias", "response_format", "tools", "logprobs"]
FIELDS = {True: COMMON_FIELDS + ["messages", "max_completion_tokens", "top_logprobs"],
          False: COMMON_FIELDS + ["prompt", "echo", "best_of"]}
UNKNOWN_KEYS = ["zzz", "", "\ud800", "k" * 300, "model ", "__proto__"]
RAW_INSERTS = [b"\xed\xa0\x80", b"\xff\xfe", b"\xc0\xaf", b"\x00", b"\\u12", b'"', b",", b"{", b"]",
               b"\xf4\x90\x80\x80"]
CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz",
                 "application/json; charset=utf-16", "application/octet-stream", "application/json", ""]
HEADER_JUNK = {"x-session-id": ["s" * 500, "a:held", "../../x", "%ff"],
               "x-hybridserve-quality-floor": ["nan", "2", "abc", "-0", "1e999"],
               "x-hybridserve-task": ["!!", "a" * 100, ""], "x-request-id": ["a b", "x" * 200],
               "x-step-kind": ["plan", ""]}


def base_body(chat: bool, model: str) -> dict:
    if chat:
        return {"model": model, "messages": [{"role": "system", "content": "Be terse."},
                                             {"role": "user", "content": "Say hi."}],
                "max_tokens": 2, "temperature": 0.7, "seed": 1}
    return {"model": model, "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0.7, "seed": 1}


@dataclass
class Case:
    what: str
    path: str
    content: bytes
    headers: dict = field(default_factory=dict)
    seen: bool = False
    want_400: bool = False            # a seen case that must be a 400 ...
    param: str | None = None          # ... naming this field


def seen_cases(model: str, gateway: bool) -> list[Case]:
    """The bodies that drew a 500 or a dropped connection before (issue 15), on both endpoints."""
    out = []
    for path in PATHS:
        chat = path == PATHS[0]
        text_field = "messages" if chat else "prompt"
        deep = base_body(chat, model) | {"user": Raw("[" * DEEP + "]" * DEEP)}
        lone = base_body(chat, model)
        if chat:
            lone["messages"][1]["content"] = "hi \ud800 there"
        else:
            lone["prompt"] = "hi \ud800 there"
        listy = base_body(chat, model) | {"reasoning_effort": ["high"], "mode": "fast"}
        raw = encode(base_body(chat, model)).replace(b"Say hi." if chat else b"Once upon", b"\xed\xa0\x80")
        out += [Case("deeply nested array", path, encode(deep), seen=True, want_400=True, param="user"),
                Case("lone surrogate", path, encode(lone), seen=True, want_400=True, param=text_field),
                # the worker has no governor: the field is an unknown one there, and may be served
                Case("list for a scalar control", path, encode(listy), seen=True, want_400=gateway,
                     param="reasoning_effort" if gateway else None),
                Case("surrogate bytes ED A0 80", path, raw, seen=True, want_400=True)]
        if gateway:   # the task tag is echoed in a receipt header: a newline there dropped the connection
            tagged = base_body(chat, "auto") | {"hybridserve_quality_floor": 0.5, "hybridserve_task": "arith\n"}
            out.append(Case("task tag ending in a newline", path, encode(tagged), seen=True, want_400=True,
                            param="hybridserve_task"))
    return out


def _set_nested(rng: random.Random, body: dict, chat: bool) -> str:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[0], dict):
            body["messages"] = rng.choice(HOSTILE)
            return "messages=hostile"
        m = rng.choice(msgs)
        key = rng.choice(["role", "content", "name", "extra", "content-part"])
        if key == "content-part":
            m["content"] = [{"type": "text", "text": rng.choice(HOSTILE)}]
        else:
            m[key] = rng.choice(HOSTILE)
        return f"messages[].{key}"
    body["prompt"] = rng.choice([rng.choice(HOSTILE), [rng.choice(HOSTILE)], [[1, rng.choice(HOSTILE)]]])
    return "prompt=hostile"


def mutate_body(rng: random.Random, body: dict, chat: bool) -> tuple[object, list[str]]:
    """One to three structural mutations of a valid body."""
    what: list[str] = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choices(["set", "drop", "unknown", "nested", "replace"], [6, 2, 2, 3, 0.5])[0]
        if not isinstance(body, dict):
            break
        if op == "set":
            name = rng.choice(FIELDS[chat])
            body[name] = rng.choice(TOKEN_COUNT_VALUES if name in PROTECTED else HOSTILE)
            what.append(f"set {name}")
        elif op == "drop":
            names = [k for k in body if k not in PROTECTED]
            if names:
                name = rng.choice(names)
                del body[name]
                what.append(f"drop {name}")
        elif op == "unknown":
            body[rng.choice(UNKNOWN_KEYS)] = rng.choice(HOSTILE)
            what.append("unknown field")
        elif op == "nested":
            what.append(_set_nested(rng, body, chat))
        else:
            body = rng.choice(HOSTILE)
            what.append("whole body replaced")
    return body, what


def damage_bytes(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    op = rng.choice(["truncate", "flip", "insert", "bom", "utf16", "empty", "duplicate"])
    pos = rng.randrange(len(raw) + 1)
    if op == "truncate":
        return raw[:pos], op
    if op == "flip" and raw:
        pos = min(pos, len(raw) - 1)
        return raw[:pos] + bytes([rng.randrange(256)]) + raw[pos + 1:], op
    if op == "insert":
        return raw[:pos] + rng.choice(RAW_INSERTS) + raw[pos:], op
    if op == "bom":
        return b"\xef\xbb\xbf" + raw, op
    if op == "utf16":
        return raw.decode("utf-8", "replace").encode("utf-16"), op
    if op == "duplicate" and raw.startswith(b"{"):
        return b'{"max_tokens":-5,' + raw[1:], op
    return b"", "empty"


def random_cases(rng: random.Random, models: list[str], n: int) -> list[Case]:
    out = []
    for path in PATHS:
        chat = path == PATHS[0]
        for _ in range(n):
            body, what = mutate_body(rng, copy.deepcopy(base_body(chat, rng.choice(models))), chat)
            raw = encode(body, ascii_only=rng.random() < 0.7)
            if rng.random() < 0.2:
                raw, how = damage_bytes(rng, raw)
                what.append(f"bytes {how}")
            headers = {}
            if rng.random() < 0.2:
                headers["content-type"] = rng.choice(CONTENT_TYPES)
                what.append(f"content-type {headers['content-type']!r}")
            if rng.random() < 0.15:
                name = rng.choice(sorted(HEADER_JUNK))
                headers[name] = rng.choice(HEADER_JUNK[name])
                what.append(f"header {name}")
            out.append(Case(", ".join(what) or "unchanged", path, raw, headers))
    return out


def openai_error_problem(r: httpx.Response) -> str | None:
    """None when the body is OpenAI's error JSON, else what is wrong with it."""
    try:
        body = r.json()
    except ValueError:
        return f"not JSON: {r.text[:120]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return f"no error object: {r.text[:120]!r}"
    if not isinstance(err.get("message"), str) or not err["message"] or not isinstance(err.get("type"), str):
        return f"error lacks message or type: {err!r:.120}"
    if "param" not in err or "code" not in err:
        return f"error lacks param or code: {err!r:.120}"
    return None


def local_port(r: httpx.Response) -> int | None:
    """The client-side port of the connection that carried `r` (None: it is closed now)."""
    stream = r.extensions.get("network_stream")
    try:
        return stream.get_extra_info("socket").getsockname()[1]
    except (AttributeError, OSError):
        return None


@dataclass
class Tally:
    cases: int = 0
    server_errors: int = 0
    dropped: int = 0
    by_status: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


class Prober:
    """Sends cases over one kept-alive connection, each followed by a good request."""

    def __init__(self, base: str, headers: dict, good_model: str):
        self.base = base
        self.auth = headers
        self.good_model = good_model
        self.client = httpx.Client(trust_env=False, timeout=30, limits=httpx.Limits(
            max_connections=1, max_keepalive_connections=1, keepalive_expiry=120))
        self.port: int | None = None
        self.tally = Tally()

    def send(self, path: str, content: bytes, headers: dict) -> httpx.Response | None:
        try:
            r = self.client.post(self.base + path, content=content, headers={**self.auth, **headers})
        except httpx.TransportError as err:
            self.tally.dropped += 1
            self.tally.problems.append(f"transport error {type(err).__name__} on {path}")
            self.port = None
            return None
        port = local_port(r)
        if port is None or (self.port is not None and port != self.port):
            self.tally.dropped += 1
            self.tally.problems.append(f"connection changed or closed after {path} ({r.status_code})")
        self.port = port
        return r

    def probe(self, case: Case) -> None:
        t = self.tally
        t.cases += 1
        r = self.send(case.path, case.content, case.headers)
        if r is not None:
            t.by_status[r.status_code] = t.by_status.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                t.server_errors += 1
                t.problems.append(f"{r.status_code} for [{case.what}]: {r.text[:160]!r}")
            elif r.status_code >= 400 and (why := openai_error_problem(r)):
                t.problems.append(f"{r.status_code} for [{case.what}]: {why}")
            if case.seen:
                self.check_seen(case, r)
        good = self.send(case.path, encode(base_body(case.path == PATHS[0], self.good_model)),
                         {"content-type": "application/json"})
        if good is not None and good.status_code != 200:
            t.problems.append(f"good request after [{case.what}] got {good.status_code}: {good.text[:160]!r}")

    def check_seen(self, case: Case, r: httpx.Response) -> None:
        """A seen case must be a 400 of type invalid_request_error naming its field."""
        if not case.want_400:
            return
        err = (r.json().get("error") or {}) if r.status_code == 400 else {}
        if r.status_code != 400 or err.get("type") != "invalid_request_error":
            self.tally.problems.append(f"seen case [{case.what}] on {case.path}: {r.status_code} {r.text[:160]!r}")
        elif err.get("param") != case.param:
            self.tally.problems.append(f"seen case [{case.what}] on {case.path}: param {err.get('param')!r}, "
                                       f"wanted {case.param!r} ({err.get('message')!r})")

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from native_and_mock_stack(tmp_path_factory.mktemp("hostile"), NATIVE)


TARGETS = {"gateway": (["up1", "up1", "up1", NATIVE], "up1"), "worker": ([NATIVE], NATIVE)}


@pytest.mark.parametrize("target", list(TARGETS))
def test_no_body_yields_a_5xx_or_a_dropped_connection(stack, target):
    models, good = TARGETS[target]
    base, headers = (stack.url, stack.headers()) if target == "gateway" else (stack.workers[NATIVE], {})
    cases = seen_cases(models[0], target == "gateway")
    cases += random_cases(random.Random(f"{SEED}-{target}"), models, CASES_PER_ENDPOINT)
    prober = Prober(base, headers, good)
    try:
        for case in cases:
            prober.probe(case)
    finally:
        prober.close()
    t = prober.tally
    print(f"\nhostile input, {target}: {t.cases} cases ({sum(c.seen for c in cases)} seen, "
          f"{CASES_PER_ENDPOINT} random per endpoint), 5xx: {t.server_errors}, dropped connections: "
          f"{t.dropped}, statuses: {dict(sorted(t.by_status.items()))}")
    assert t.cases == len(cases) >= 2 * CASES_PER_ENDPOINT
    assert not t.problems, "\n".join(t.problems[:30])
    assert (t.server_errors, t.dropped) == (0, 0)
    assert sum(n for s, n in t.by_status.items() if 400 <= s < 500) > t.cases // 3   # the cases bite


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(tmp_path):
    """ContainErrors under a real uvicorn: a handler that crashes answers 500 JSON, and the
    same kept-alive connection serves the next request (uvicorn closes it when an exception
    reaches it). The gateway installs the same middleware (gateway.app)."""
    import threading

    import uvicorn
    from fastapi import FastAPI

    from hybridserve.worker.app import install_error_handlers
    from tests.serving.conftest import free_port, wait_until

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/boom")
    async def boom() -> dict:
        raise RecursionError("deep")

    @app.get("/ok")
    async def ok() -> dict:
        return {"ok": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "uvicorn up")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=5,
                          limits=httpx.Limits(max_connections=1)) as c:
            first = c.get("/ok")
            r = c.post("/boom")
            assert r.status_code == 500
            assert r.json()["error"] == {"message": "internal error: RecursionError", "type": "server_error",
                                         "param": None, "code": None}
            after = c.get("/ok")
            assert after.json() == {"ok": True}
            assert local_port(first) == local_port(r) == local_port(after) is not None
    finally:
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------- the limits, without processes

def _param_of(raw: bytes) -> str | None:
    from hybridserve import protocol as P
    from hybridserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        P.parse_body(raw)
    assert err.value.status_code == 400
    return err.value.param


def test_parse_body_bounds_depth_and_names_the_field():
    from hybridserve import protocol as P

    ok = {"model": "m", "user": nest(P.MAX_DEPTH - 1, list)}          # the body itself is level 1
    assert P.parse_body(encode(ok))["user"] == ok["user"]
    assert _param_of(encode({"model": "m", "user": nest(P.MAX_DEPTH, list)})) == "user"
    assert _param_of(encode({"model": "m", "tools": nest(P.MAX_DEPTH, dict)})) == "tools"
    # far too deep for json's own recursion: still a 400 naming the field
    assert _param_of(b'{"model": "m", "a\\"b": 1, "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") == "stop"
    assert _param_of(b"[" * 100_000 + b"]" * 100_000) is None


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "a\\ud800b"}', "prompt"),                       # lone high surrogate
    (b'{"messages": [{"content": "\\udc00"}]}', "messages"),       # lone low surrogate
    (b'{"prompt": "\xed\xa0\x80"}', None),                         # its UTF-8 bytes: not UTF-8
    (b'{"prompt": "\xff"}', None),
    (b'{"\\ud800": 1}', None),                                      # in a key
    (b'{"temperature": NaN}', None), (b'{"temperature": -Infinity}', None),
    (b'{"temperature": 1e999}', "temperature"),
    (b'{"seed": 9223372036854775808}', "seed"), (b'{"seed": -9223372036854775809}', "seed"),
    (b'{"seed": 1' + b"0" * 5000 + b"}", None),
    (b'\xef\xbb\xbf{"prompt": "x"}', None), ("{}".encode("utf-16"), None), (b"", None), (b"[1]", None),
])
def test_parse_body_refuses_what_is_not_json_text(raw, param):
    assert _param_of(raw) == param


def test_parse_body_keeps_good_unicode_and_bounds_sizes():
    from hybridserve import protocol as P

    good = P.parse_body('{"prompt": "é🙂 \\ud83d\\ude00", "seed": 9223372036854775807}'.encode())
    assert good["prompt"] == "é🙂 😀" and good["seed"] == 2 ** 63 - 1
    assert _param_of(encode({"prompt": "x" * (P.MAX_STRING_CHARS + 1)})) == "prompt"
    assert _param_of(encode({"prompt": [1] * (P.MAX_MEMBERS + 1)})) == "prompt"
    assert len(P.parse_body(encode({"prompt": [1] * 1000}))["prompt"]) == 1000


CONFUSED = [["fast"], {"a": 1}, True, 1.5, 2 ** 62, float("nan"), "", None, 0]


@pytest.mark.parametrize("name", ["mode", "reasoning_effort", "max_thinking_tokens", "hybridserve_vote", "n",
                                  "hybridserve_quality_floor", "hybridserve_task"])
def test_every_gateway_control_refuses_type_confusion_with_a_400(name):
    """Lists, dicts, bools, floats, NaN and huge ints in each gateway-read field: accepted or a
    400 naming the field, never another exception."""
    from hybridserve.config import GatewayConfig
    from hybridserve.errors import InvalidRequestError
    from hybridserve.gateway import governor as G
    from hybridserve.gateway.routing import request_quality

    gw = GatewayConfig(auth="disabled")
    refused = 0
    for value in CONFUSED:
        data = ({"hybridserve_vote": True, "n": 3, name: value} if name in ("n", "hybridserve_vote")
                else {name: value})
        try:
            G.parse_controls(data, gw, stream=False)
            request_quality(data, {})
        except InvalidRequestError as err:
            assert err.param == name, (value, err.message)
            refused += 1
    assert refused >= 4
