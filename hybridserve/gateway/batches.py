"""Batch jobs of the Batch API: the create request, input validation, the durable store, objects.

A batch moves `validating → in_progress → finalizing → completed`, or ends `failed` (its
input did not validate), `expired` (the completion window closed first) or `cancelling →
cancelled`. Its row and one row per input line live in the batch database
(`batch_db.BatchDb`); a line is `pending` until the runner records its result (`record`),
which is the only way a line stops being pending, so a restarted gateway runs exactly the
lines without one (`batch_runner`). Output lines are OpenAI's:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`; a 2xx
answer goes to the output file, anything else (a refused or failed request, or a line the
window or a cancel left unrun: `response: null`, `error.code` batch_expired / batch_cancelled)
to the error file, so every custom_id gets exactly one line.

Validation (`validate_lines`) refuses the whole batch, naming each bad line in OpenAI's
`errors` object: a line that is not a JSON object, a missing, empty or repeated custom_id,
a method other than POST, a url other than the batch's endpoint, a body that is not a valid
request for it (streaming included). Whatever only shows at run time (an unknown model, a
spent budget, a backend down) becomes that line's error line.

`completion_window` is OpenAI's "24h", or any `<N>s`, `<N>m`, `<N>h` up to 168h (short
windows are for tests and small jobs). The object's `usage` is OpenAI's token totals;
`hybridserve_totals` adds the $ cost, the gateway's token count and device-seconds.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from hybridserve import protocol as P
from hybridserve.errors import InvalidRequestError
from hybridserve.gateway.batch_db import BatchDb

ENDPOINTS = {"/v1/chat/completions": True, "/v1/completions": False}   # path -> is chat
DEFAULT_MODEL = "auto:cheapest"
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])$")
WINDOW_UNIT_S = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 168 * 3600
MAX_CUSTOM_ID_CHARS = 512
MAX_LISTED_ERRORS = 100
CREATE_FIELDS = ("input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after")
_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at")
_TOTALS = ("SELECT state, COUNT(*), SUM(usd), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
           "SUM(gateway_tokens), SUM(device_s) FROM batch_lines WHERE batch_id=? GROUP BY state")


# ------------------------------------------------------------------ the create request

@dataclass(frozen=True)
class BatchRequest:
    input_file_id: str
    endpoint: str
    completion_window: str
    window_s: int
    metadata: dict[str, str] | None


def window_seconds(window: Any) -> int:
    m = WINDOW.match(window) if isinstance(window, str) else None
    seconds = int(m.group(1)) * WINDOW_UNIT_S[m.group(2)] if m else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequestError("completion_window must be '24h' (or '<N>s', '<N>m', '<N>h', at most "
                                  "168h)", param="completion_window")
    return seconds


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata rule: at most 16 pairs, keys up to 64 and values up to 512 characters."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise InvalidRequestError("metadata must be an object of at most 16 string pairs", param="metadata")
    for k, v in metadata.items():
        if not 0 < len(k) <= 64 or not isinstance(v, str) or len(v) > 512:
            raise InvalidRequestError("metadata keys are strings of 1-64 characters and its values strings "
                                      "of at most 512", param="metadata")
    return dict(metadata)


def parse_create(raw: bytes) -> BatchRequest:
    """The body of POST /v1/batches, or a 400 naming the field."""
    data = P.parse_body(raw)
    for k in data:
        if k not in CREATE_FIELDS:
            raise InvalidRequestError(f"unrecognized request argument: {k[:64]}", param=k[:64])
    file_id, endpoint = data.get("input_file_id"), data.get("endpoint")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequestError("input_file_id: required, the id of a file uploaded with purpose "
                                  "`batch`", param="input_file_id")
    if endpoint not in ENDPOINTS:
        raise InvalidRequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
    if not isinstance(data.get("output_expires_after"), (dict, type(None))):
        raise InvalidRequestError("output_expires_after must be an object (it is accepted and ignored: "
                                  "result files are kept)", param="output_expires_after")
    window = data.get("completion_window")
    return BatchRequest(file_id, endpoint, window, window_seconds(window), check_metadata(data.get("metadata")))


# ------------------------------------------------------------------ input validation

@dataclass(frozen=True)
class Line:
    no: int            # 1-based line number in the input file
    custom_id: str
    body: str          # the request body, JSON text


def line_error(no: int, code: str, message: str, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": no}


def request_model(endpoint: str) -> type:
    return P.ChatCompletionRequest if ENDPOINTS[endpoint] else P.CompletionRequest


def check_line(no: int, text: str, endpoint: str) -> tuple[Line | None, dict | None]:
    """One non-blank input line: (the line, None) or (None, its error)."""
    try:
        obj = P.parse_body(text.encode("utf-8", "surrogatepass"))
    except InvalidRequestError as err:
        return None, line_error(no, "invalid_json_line", f"this line is not a JSON object ({err.message})")
    cid = obj.get("custom_id")
    if cid is None:
        return None, line_error(no, "missing_custom_id", "custom_id is required", "custom_id")
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CUSTOM_ID_CHARS:
        return None, line_error(no, "invalid_custom_id", f"custom_id must be a string of 1-{MAX_CUSTOM_ID_CHARS} "
                                "characters", "custom_id")
    if obj.get("method") != "POST":
        return None, line_error(no, "invalid_method", "method must be POST", "method")
    if obj.get("url") != endpoint:
        return None, line_error(no, "invalid_url", f"url must be the batch's endpoint, {endpoint}", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return None, line_error(no, "invalid_body", "body must be a JSON object: the request", "body")
    try:
        P.validate_request(request_model(endpoint), {"model": DEFAULT_MODEL, **body})
    except InvalidRequestError as err:
        return None, line_error(no, "invalid_body", f"body.{err.message}", f"body.{err.param or ''}".rstrip("."))
    if body.get("stream"):
        return None, line_error(no, "invalid_body", "body.stream: a batch request cannot stream", "body.stream")
    return Line(no, cid, json.dumps(body, separators=(",", ":"))), None


def validate_lines(text: str, endpoint: str) -> tuple[list[Line], list[dict]]:
    """Every request of an input file, or the errors that fail the batch (at most
    MAX_LISTED_ERRORS listed, then one that counts the rest)."""
    lines, errors, seen = [], [], {}
    for no, raw in enumerate(text.split("\n"), start=1):   # not splitlines: U+2028 may sit in a string
        if not raw.strip():
            continue
        line, err = check_line(no, raw, endpoint)
        if line is not None and line.custom_id in seen:
            line, err = None, line_error(no, "duplicate_custom_id", f"custom_id '{line.custom_id[:64]}' is "
                                         f"already used on line {seen[line.custom_id]}", "custom_id")
        if err is not None:
            errors.append(err)
        else:
            seen[line.custom_id] = no
            lines.append(line)
    if not lines and not errors:
        errors.append(line_error(None, "empty_file", "the input file holds no requests"))
    if len(errors) > MAX_LISTED_ERRORS:
        more = len(errors) - MAX_LISTED_ERRORS
        errors = errors[:MAX_LISTED_ERRORS] + [line_error(None, "too_many_errors",
                                                          f"{more} more lines have errors")]
    return lines, errors


# ------------------------------------------------------------------ results

def line_request_id(batch_id: str, no: int) -> str:
    return "batch_req_" + hashlib.blake2b(f"{batch_id}:{no}".encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class LineResult:
    """What one line ended with: an HTTP answer (status and body), or an error without one."""

    status_code: int | None
    request_id: str | None
    body: dict | None
    error: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def counts(self) -> tuple[float, int, int, int, int, float]:
        """($, prompt, completion, cached, gateway tokens, device-s) of a 2xx answer's usage."""
        u = (self.body or {}).get("usage") if self.ok else None
        if not isinstance(u, dict):
            return 0.0, 0, 0, 0, 0, 0.0
        details = u.get("prompt_tokens_details")
        cached = _number(details, "cached_tokens") if isinstance(details, dict) else 0
        return (float(_number(u, "cost_usd")), int(_number(u, "prompt_tokens")),
                int(_number(u, "completion_tokens")), int(cached),
                int(_number(u, "gateway_total_tokens") or _number(u, "total_tokens")),
                float(_number(u, "gateway_device_seconds")))


def _number(d: dict, k: str) -> float:
    v = d.get(k)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def unrun(code: str, message: str) -> LineResult:
    return LineResult(None, None, None, {"code": code, "message": message})


def output_line(batch_id: str, row: dict) -> dict:
    response = None
    if row["status_code"] is not None:
        response = {"status_code": row["status_code"], "request_id": row["request_id"],
                    "body": json.loads(row["response"]) if row["response"] else None}
    return {"id": line_request_id(batch_id, row["line"]), "custom_id": row["custom_id"], "response": response,
            "error": json.loads(row["error"]) if row["error"] else None}


# ------------------------------------------------------------------ the store

class BatchNotCancellable(InvalidRequestError):
    pass


class BatchStore:
    """Batch rows and their lines in the batch database."""

    def __init__(self, db: BatchDb, clock=time.time):
        self.db = db
        self.clock = clock

    def create(self, owner: str, key_id: str | None, req: BatchRequest) -> str:
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = self.clock()
        self.db.write("INSERT INTO batches (id, owner, key_id, endpoint, input_file_id, completion_window, "
                      "status, created_at, expires_at, metadata) VALUES (?, ?, ?, ?, ?, ?, 'validating', ?, ?, ?)",
                      (batch_id, owner, key_id, req.endpoint, req.input_file_id, req.completion_window, now,
                       now + req.window_s, json.dumps(req.metadata) if req.metadata is not None else None))
        return batch_id

    def get(self, batch_id: str, owner: str | None = None) -> dict | None:
        """A batch row; with `owner`, only that tenant's (others see nothing)."""
        sql, args = "SELECT * FROM batches WHERE id=?", [batch_id]
        if owner is not None:
            sql += " AND owner=?"
            args.append(owner)
        rows = self.db.read_dicts(sql, tuple(args))
        return rows[0] if rows else None

    def list(self, owner: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        sql, args = "SELECT * FROM batches WHERE owner=?", [owner]
        if after is not None:
            sql += " AND seq < COALESCE((SELECT seq FROM batches WHERE id=? AND owner=?), -1)"
            args += [after, owner]
        rows = self.db.read_dicts(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def claimable(self, holder: str) -> list[str]:
        """Unfinished batches that `holder` may run: no other replica holds a live lease on them
        (`holder`'s own count: a gateway restarted in place takes them back), oldest first."""
        marks = ",".join("?" * len(ACTIVE))
        rows = self.db.read(f"SELECT id FROM batches WHERE status IN ({marks}) AND (lease_holder IS NULL "
                            "OR lease_holder=? OR lease_until < ?) ORDER BY seq", (*ACTIVE, holder, self.clock()))
        return [r[0] for r in rows]

    def lease(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the right to run a batch for `ttl_s` seconds: True when `holder` has it
        now (nobody held it, `holder` already did, or the last holder let it run out)."""
        now = self.clock()
        return self.db.write("UPDATE batches SET lease_holder=?, lease_until=? WHERE id=? AND (lease_holder IS "
                             "NULL OR lease_holder=? OR lease_until < ?)",
                             (holder, now + ttl_s, batch_id, holder, now)) == 1

    def release(self, batch_id: str, holder: str) -> None:
        """Give a lease up (at shutdown, or once the batch is final), so another replica may run it."""
        self.db.write("UPDATE batches SET lease_holder=NULL, lease_until=NULL WHERE id=? AND lease_holder=?",
                      (batch_id, holder))

    def status(self, batch_id: str) -> str | None:
        rows = self.db.read("SELECT status FROM batches WHERE id=?", (batch_id,))
        return rows[0][0] if rows else None

    def advance(self, batch_id: str, before: str, status: str, stamp: str) -> bool:
        """Move from `before` to `status` unless the batch has moved on meanwhile (a cancel)."""
        return self.db.write(f"UPDATE batches SET status=?, {stamp}=? WHERE id=? AND status=?",
                             (status, self.clock(), batch_id, before)) == 1

    def set_status(self, batch_id: str, status: str, stamp: str | None = None, **fields: Any) -> None:
        sets = {"status": status, **fields, **({stamp: self.clock()} if stamp else {})}
        cols = ", ".join(f"{k}=?" for k in sets)
        self.db.write(f"UPDATE batches SET {cols} WHERE id=?", (*sets.values(), batch_id))

    def fail(self, batch_id: str, errors: list[dict]) -> None:
        self.set_status(batch_id, "failed", "failed_at", errors=json.dumps({"object": "list", "data": errors}))

    def start(self, batch_id: str, lines: list[Line]) -> None:
        """Store the validated lines and move to in_progress (unless cancelling), together: a
        validation cut short by a crash leaves no lines and is done again."""
        with self.db.transaction() as db:
            db.execute("DELETE FROM batch_lines WHERE batch_id=?", (batch_id,))
            db.executemany("INSERT INTO batch_lines (batch_id, line, custom_id, body) VALUES (?, ?, ?, ?)",
                           [(batch_id, x.no, x.custom_id, x.body) for x in lines])
            db.execute("UPDATE batches SET status=CASE status WHEN 'cancelling' THEN status ELSE 'in_progress' "
                       "END, in_progress_at=?, total=? WHERE id=?",
                       (self.clock(), len(lines), batch_id))

    def cancel(self, batch_id: str, owner: str) -> dict | None:
        """Ask a batch to stop (None: no such batch for this tenant). A batch already cancelling
        or cancelled answers as it is; a finished one cannot be cancelled (400)."""
        with self.db.transaction() as db:
            row = db.execute("SELECT status FROM batches WHERE id=? AND owner=?", (batch_id, owner)).fetchone()
            if row is None:
                return None
            if row[0] in ("completed", "failed", "expired", "finalizing"):
                raise BatchNotCancellable(f"batch {batch_id} is {row[0]}: only a validating or in-progress "
                                          "batch can be cancelled")
            if row[0] not in ("cancelling", "cancelled"):
                db.execute("UPDATE batches SET status='cancelling', cancelling_at=? WHERE id=?",
                           (self.clock(), batch_id))
        return self.get(batch_id, owner)

    def pending(self, batch_id: str, after: int, limit: int) -> list[Line]:
        rows = self.db.read("SELECT line, custom_id, body FROM batch_lines WHERE batch_id=? AND state='pending' "
                            "AND line > ? ORDER BY line LIMIT ?", (batch_id, after, limit))
        return [Line(*r) for r in rows]

    def record(self, batch_id: str, no: int, out: LineResult) -> bool:
        """Record a line's result, once: False when it already had one."""
        usd, prompt, completion, cached, tokens, device_s = out.counts()
        return self.db.write(
            "UPDATE batch_lines SET state=?, status_code=?, request_id=?, response=?, error=?, usd=?, "
            "prompt_tokens=?, completion_tokens=?, cached_tokens=?, gateway_tokens=?, device_s=? "
            "WHERE batch_id=? AND line=? AND state='pending'",
            ("ok" if out.ok else "failed", out.status_code, out.request_id,
             json.dumps(out.body, separators=(",", ":")) if out.body is not None else None,
             json.dumps(out.error) if out.error is not None else None, usd, prompt, completion, cached,
             tokens, device_s, batch_id, no)) == 1

    def close_pending(self, batch_id: str, out: LineResult) -> int:
        """Give every line still without a result this one (expired or cancelled lines)."""
        return self.db.write("UPDATE batch_lines SET state='failed', error=? WHERE batch_id=? AND state='pending'",
                             (json.dumps(out.error), batch_id))

    def results(self, batch_id: str, ok: bool) -> list[dict]:
        return self.db.read_dicts("SELECT line, custom_id, status_code, request_id, response, error FROM "
                                  "batch_lines WHERE batch_id=? AND state=? ORDER BY line",
                                  (batch_id, "ok" if ok else "failed"))

    def as_openai(self, row: dict) -> dict:
        """OpenAI's Batch object, with request_counts, usage and hybridserve_totals."""
        return batch_object(row, {r[0]: r[1:] for r in self.db.read(_TOTALS, (row["id"],))})


def batch_object(row: dict, by_state: dict[str, tuple]) -> dict:
    """OpenAI's Batch object from a batch row and its lines' totals per state ("ok", "failed",
    "pending": count, $, prompt, completion and cached tokens, gateway tokens, device-seconds)."""
    zero = (0, 0.0, 0, 0, 0, 0, 0.0)
    ok, failed, pending = (by_state.get(s, zero) for s in ("ok", "failed", "pending"))
    sums = [sum((x or 0) for x in col) for col in zip(ok, failed, pending)]
    _, usd, prompt, completion, cached, tokens, device_s = sums
    return {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
            "errors": json.loads(row["errors"]) if row["errors"] else None,
            "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
            "status": row["status"], "output_file_id": row["output_file_id"],
            "error_file_id": row["error_file_id"],
            **{k: int(row[k]) if row[k] is not None else None for k in _TIMES},
            "request_counts": {"total": row["total"], "completed": ok[0], "failed": failed[0]},
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                      "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt + completion},
            "hybridserve_totals": {"cost_usd": round(usd, 10), "gateway_total_tokens": tokens,
                                   "device_seconds": round(device_s, 6), "prompt_tokens": prompt,
                                   "completion_tokens": completion}}

