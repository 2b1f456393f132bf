"""The Batch API's HTTP side: the /v1/files and /v1/batches routes, and the in-process request
a batch line is sent as.

Routes (registered by gateway.app, each behind the API key like every /v1 route; a file or
batch of another key is a 404, as if it did not exist):

  POST   /v1/files                  multipart: `file` (JSONL) and `purpose=batch`
  GET    /v1/files                  ?after, limit (1-10000), order (asc|desc), purpose
  GET    /v1/files/{file_id}        the File object
  GET    /v1/files/{file_id}/content   its bytes
  DELETE /v1/files/{file_id}
  POST   /v1/batches                {input_file_id, endpoint, completion_window, metadata}
  GET    /v1/batches                ?after, limit (1-100)
  GET    /v1/batches/{batch_id}
  POST   /v1/batches/{batch_id}/cancel

A line runs through `serve`, the same function the HTTP routes call, with a Starlette
request of its own (`line_request`): no headers, a request id, and a client that never
leaves, so the proxy neither watches a real socket nor sees a disconnect.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybridserve import openapi as O
from hybridserve import protocol as P
from hybridserve.config import GatewayConfig
from hybridserve.errors import HybridserveError, InvalidRequestError, PayloadTooLargeError
from hybridserve.gateway.auth import KeyChecker
from hybridserve.gateway.batch_db import BatchDb, batch_paths
from hybridserve.gateway.batch_redis import RedisBatchStore, RedisFileStore, redis_stores
from hybridserve.gateway.batch_runner import Answer, BatchRunner
from hybridserve.gateway.batches import BatchStore, parse_create
from hybridserve.gateway.files import MAX_FILE_BYTES, UPLOAD_SLACK_BYTES, FileStore, checked_upload, \
    parse_multipart, too_large
from hybridserve.gateway.shared_state import redact

logger = logging.getLogger(__name__)

MAX_CREATE_BYTES = 64 << 10
Serve = Callable[[Request, str, bytes, "str | None", str], Awaitable[Response]]


# ------------------------------------------------------------------ lines, in process

async def _never() -> dict:
    await asyncio.Event().wait()   # the client of a batch line never leaves
    return {"type": "http.disconnect"}


def line_request(path: str, request_id: str) -> Request:
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "headers": [],
             "query_string": b"", "scheme": "http", "server": ("batch", 0), "client": ("batch", 0),
             "state": {"request_id": request_id, "backend": "gateway", "t0": time.perf_counter()}}
    return Request(scope, _never)


def seconds(v) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def answer_of(resp: Response) -> Answer:
    body = getattr(resp, "body", None)
    if body is None:
        return Answer(500, {"error": {"message": "a batch request cannot stream", "type": "server_error",
                                      "param": None, "code": None}})
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {"error": {"message": f"the backend answered {resp.status_code} without JSON: "
                                     f"{body[:200].decode('utf-8', 'replace')}", "type": "bad_gateway",
                          "param": None, "code": None}}
    return Answer(resp.status_code, data, seconds(resp.headers.get("retry-after")))


def executor(serve: Serve) -> Callable[..., Awaitable[Answer]]:
    """The runner's `execute`: one line through the gateway's request path, as its batch's key."""
    async def execute(path: str, raw: bytes, key_id: str | None, owner: str, request_id: str) -> Answer:
        try:
            resp = await serve(line_request(path, request_id), path, raw, key_id, owner)
        except HybridserveError as err:
            after = getattr(err, "retry_after_s", None) or getattr(err, "retry_after", None)
            return Answer(err.status_code, err.to_openai(), seconds(after))
        return answer_of(resp)
    return execute


# ------------------------------------------------------------------ routes

def not_found(what: str, ident: str) -> StarletteHTTPException:
    return StarletteHTTPException(404, f"no {what} '{ident[:96]}' for this API key")


def stores(gw: GatewayConfig) -> tuple[FileStore | RedisFileStore, BatchStore | RedisBatchStore, Callable[[], None]]:
    """The files and batches stores of a gateway config, and what closes them: in Redis when the
    replicas share `state_url` (every replica then sees every batch), else the SQLite batch
    database beside the ledger."""
    if gw.state_url:
        files, batches, r = redis_stores(gw.state_url, gw.state_prefix, redact(gw.state_url))
        return files, batches, r.close
    db_path, files_dir = batch_paths(gw)
    db = BatchDb(db_path)
    return FileStore(db, files_dir), BatchStore(db), db.close


def install(app: FastAPI, keys: KeyChecker, files: FileStore, batches: BatchStore, runner: BatchRunner,
            v1_errors: dict) -> None:
    """Register the /v1/files and /v1/batches routes on the gateway app."""

    def tenant(request: Request) -> tuple[str | None, str]:
        key_id = keys.check(request.headers.get("authorization"))
        return key_id, keys.tenant(key_id)

    def owned_file(request: Request, file_id: str):
        _, owner = tenant(request)
        f = files.get(file_id, owner)
        if f is None:
            raise not_found("file", file_id)
        return f

    def owned_batch(request: Request, batch_id: str) -> dict:
        _, owner = tenant(request)
        row = batches.get(batch_id, owner)
        if row is None:
            raise not_found("batch", batch_id)
        return row

    file_404 = {**v1_errors, **O.errors(404)}

    @app.post("/v1/files", responses={200: {"model": O.FileObject, "description": "the stored file"},
                                      **v1_errors, **O.errors(400)}, openapi_extra=O.FILE_UPLOAD)
    async def upload_file(request: Request) -> dict:
        """Upload a JSONL file of batch requests (multipart: `file`, `purpose=batch`)."""
        _, owner = tenant(request)
        try:
            raw = await P.read_body(request, MAX_FILE_BYTES + UPLOAD_SLACK_BYTES)
        except PayloadTooLargeError:
            raise too_large() from None
        name, purpose, content, lines = checked_upload(parse_multipart(request.headers.get("content-type"), raw))
        f = await asyncio.to_thread(files.add, owner, name, purpose, content, lines)
        logger.info("%s file %s uploaded: %d bytes, %d lines", request.state.request_id, f.id, f.bytes, lines)
        return f.as_openai()

    @app.get("/v1/files", responses={200: {"model": O.FileList, "description": "the caller's files"},
                                     **v1_errors, **O.errors(400)})
    async def list_files(request: Request, after: str | None = Query(None, max_length=96),
                         limit: int = Query(10000, ge=1, le=10000),
                         order: Literal["asc", "desc"] = Query("desc"),
                         purpose: str | None = Query(None, max_length=64)) -> dict:
        """The caller's files, newest first (`order=asc`: oldest first), a page after `after`."""
        _, owner = tenant(request)
        page, more = files.list(owner, after, limit, order, purpose)
        return page_of([f.as_openai() for f in page], more)

    @app.get("/v1/files/{file_id}", responses={200: {"model": O.FileObject, "description": "the file"},
                                               **file_404})
    async def get_file(request: Request, file_id: str) -> dict:
        """A file of the caller's (another key's file is a 404)."""
        return owned_file(request, file_id).as_openai()

    @app.get("/v1/files/{file_id}/content", response_class=Response, responses={
        200: {"description": "the file's bytes", "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}, **file_404})
    async def file_content(request: Request, file_id: str) -> Response:
        """The bytes of a file of the caller's: an upload, or a batch's output or error file."""
        f = owned_file(request, file_id)
        chunks = files.content(f)
        if chunks is None:
            raise not_found("file content", file_id)
        return StreamingResponse(chunks, media_type="application/octet-stream",
                                 headers={"content-length": str(f.bytes)})

    @app.delete("/v1/files/{file_id}", responses={200: {"model": O.FileDeleted, "description": "deleted"},
                                                  **file_404})
    async def delete_file(request: Request, file_id: str) -> dict:
        """Delete a file of the caller's (a batch already running from it keeps its lines)."""
        _, owner = tenant(request)
        if not files.delete(file_id, owner):
            raise not_found("file", file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches", responses={200: {"model": O.BatchObject, "description": "the new batch"},
                                        **v1_errors, **O.errors(400, 404, 413)},
              openapi_extra=O.request_body(O.BatchCreateRequest))
    async def create_batch(request: Request) -> dict:
        """Run every request of an uploaded file within the completion window."""
        key_id, owner = tenant(request)
        req = parse_create(await P.read_body(request, MAX_CREATE_BYTES))
        f = files.get(req.input_file_id, owner)
        if f is None:
            raise not_found("file", req.input_file_id)
        if f.purpose != "batch":
            raise InvalidRequestError(f"file {f.id} has purpose '{f.purpose}'; a batch reads a file uploaded "
                                      "with purpose `batch`", param="input_file_id")
        batch_id = batches.create(owner, key_id, req)
        runner.launch(batch_id)
        logger.info("%s batch %s created from %s (%s, window %s)", request.state.request_id, batch_id, f.id,
                    req.endpoint, req.completion_window)
        return batches.as_openai(batches.get(batch_id))

    @app.get("/v1/batches", responses={200: {"model": O.BatchList, "description": "the caller's batches"},
                                       **v1_errors, **O.errors(400)})
    async def list_batches(request: Request, after: str | None = Query(None, max_length=96),
                           limit: int = Query(20, ge=1, le=100)) -> dict:
        """The caller's batches, newest first, a page after `after`."""
        _, owner = tenant(request)
        page, more = batches.list(owner, after, limit)
        return page_of([batches.as_openai(r) for r in page], more)

    @app.get("/v1/batches/{batch_id}", responses={200: {"model": O.BatchObject, "description": "the batch"},
                                                  **v1_errors, **O.errors(404)})
    async def get_batch(request: Request, batch_id: str) -> dict:
        """A batch of the caller's: status, request counts, totals, result files."""
        return batches.as_openai(owned_batch(request, batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", responses={
        200: {"model": O.BatchObject, "description": "the batch, cancelling"}, **v1_errors, **O.errors(400, 404)})
    async def cancel_batch(request: Request, batch_id: str) -> dict:
        """Stop starting the batch's requests; those in flight finish, the rest get error lines."""
        _, owner = tenant(request)
        row = batches.cancel(batch_id, owner)
        if row is None:
            raise not_found("batch", batch_id)
        runner.cancel(batch_id)
        return batches.as_openai(row)


def page_of(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}
