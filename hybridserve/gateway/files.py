"""Files of the Batch API: uploads (multipart), their metadata in SQLite, their bytes on disk.

A file belongs to the tenant that uploaded it (`KeyChecker.tenant`); every lookup names the
tenant, and another tenant's file answers as if it did not exist (the routes make it a 404).
Uploads take `purpose=batch` only and are checked when they arrive: at most MAX_FILE_BYTES,
UTF-8 text, at least one and at most MAX_FILE_LINES non-blank lines; each refusal is a 400 in
OpenAI's error shape naming `file` or `purpose`. What the lines say is checked when a batch is
created from the file (`batches.validate_lines`). Batch results are files too, purpose
`batch_output`, written by the runner under ids derived from the batch's.

Objects are OpenAI's `File` (`id`, `object: "file"`, `bytes`, `created_at`, `filename`,
`purpose`, `status: "processed"`), so the `openai` client's `files.*` calls work unchanged.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hybridserve.errors import InvalidRequestError
from hybridserve.gateway.batch_db import BatchDb

MAX_FILE_BYTES = 64 << 20          # OpenAI takes 200 MB; the whole file is read into memory here
MAX_FILE_LINES = 50_000            # OpenAI's limit of requests per batch
UPLOAD_SLACK_BYTES = 64 << 10      # multipart framing and form fields beyond the file itself
MAX_PARTS = 16
MAX_FIELD_BYTES = 1024
UPLOAD_PURPOSES = ("batch",)
_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')
_NOT_PRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_ID_OK = re.compile(r"^[A-Za-z0-9_-]{1,96}$")
CONTENT_CHUNK = 1 << 20            # a download is sent this many bytes at a time


def too_large() -> InvalidRequestError:
    return InvalidRequestError(f"the file is larger than {MAX_FILE_BYTES >> 20} MiB, the most this gateway "
                               "takes; split it into several batches", param="file", code="file_too_large")


@dataclass
class StoredFile:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    lines: int
    created_at: float

    def as_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


# ------------------------------------------------------------------ multipart/form-data

@dataclass
class Part:
    name: str
    filename: str | None
    data: bytes


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="file"; filename="a.jsonl"` -> ("form-data", {"name": ..., "filename": ...})."""
    head, _, _ = value.partition(";")
    params = {}
    for m in _PARAM.finditer(value[len(head):]):
        params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    return head.strip().lower(), params


def parse_multipart(content_type: str | None, body: bytes) -> dict[str, Part]:
    """The parts of a multipart/form-data body by name (the first of a repeated name wins);
    a 400 for anything else."""
    kind, params = header_params(content_type or "")
    boundary = params.get("boundary")
    if kind != "multipart/form-data" or not boundary or len(boundary) > 200:
        raise InvalidRequestError("POST /v1/files takes a multipart/form-data body with the fields "
                                  "`file` and `purpose`")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    sections = body.split(delimiter)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise InvalidRequestError("the multipart body is malformed: its closing boundary is missing")
    if len(sections) - 2 > MAX_PARTS:
        raise InvalidRequestError(f"the multipart body has more than {MAX_PARTS} parts")
    parts: dict[str, Part] = {}
    for section in sections[1:-1]:
        part = _part(section)
        if part is not None:
            parts.setdefault(part.name, part)
    return parts


def _part(section: bytes) -> Part | None:
    if not section.startswith(b"\r\n") or not section.endswith(b"\r\n"):
        raise InvalidRequestError("the multipart body is malformed: a part is not framed by CRLF")
    head, sep, data = section[2:-2].partition(b"\r\n\r\n")
    if not sep:
        head, data = section[2:-2], b""
        if head.endswith(b"\r\n"):
            head = head[:-2]
    disposition = None
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-disposition":
            disposition = value
    if disposition is None:
        raise InvalidRequestError("the multipart body is malformed: a part has no Content-Disposition")
    kind, params = header_params(disposition)
    if kind != "form-data" or "name" not in params:
        return None
    return Part(params["name"], params.get("filename"), data)


def field_text(parts: dict[str, Part], name: str) -> str | None:
    part = parts.get(name)
    if part is None:
        return None
    if len(part.data) > MAX_FIELD_BYTES:
        raise InvalidRequestError(f"the form field `{name}` is longer than {MAX_FIELD_BYTES} bytes", param=name)
    try:
        return part.data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidRequestError(f"the form field `{name}` is not UTF-8 text", param=name) from None


def count_lines(content: bytes) -> int:
    """Non-blank lines of an upload, checked as UTF-8 (a 400 naming `file` otherwise)."""
    if len(content) > MAX_FILE_BYTES:
        raise too_large()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRequestError(f"the file is not UTF-8 text (byte {err.start}: {err.reason}); a batch "
                                  "input file is JSONL, one request per line", param="file",
                                  code="invalid_file_format") from None
    lines = sum(1 for line in text.split("\n") if line.strip())
    if lines == 0:
        raise InvalidRequestError("the file is empty: a batch input file holds one JSON request per line",
                                  param="file", code="empty_file")
    if lines > MAX_FILE_LINES:
        raise InvalidRequestError(f"the file has {lines} lines; a batch takes at most {MAX_FILE_LINES} "
                                  "requests, split it", param="file", code="too_many_lines")
    return lines


def checked_upload(parts: dict[str, Part]) -> tuple[str, str, bytes, int]:
    """(filename, purpose, content, lines) of an upload, or the 400 that names what is wrong."""
    purpose = field_text(parts, "purpose")
    if purpose is None:
        raise InvalidRequestError("missing form field `purpose` (use `batch`)", param="purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(f"purpose '{purpose[:64]}' is not served here: this gateway keeps files "
                                  "for the Batch API only (purpose `batch`)", param="purpose")
    part = parts.get("file")
    if part is None or part.filename is None:
        raise InvalidRequestError("missing form field `file` (the JSONL file, sent as a file part)",
                                  param="file")
    lines = count_lines(part.data)
    name = _NOT_PRINTABLE.sub("", part.filename).strip()[:255] or "upload.jsonl"
    return name, purpose, part.data, lines


# ------------------------------------------------------------------ the store

class FileStore:
    """File rows in the batch database, contents as `<folder>/<id>`."""

    def __init__(self, db: BatchDb, folder: str | Path, clock=time.time):
        self.db = db
        self.folder = Path(folder)
        self.clock = clock

    def path(self, file_id: str) -> Path:
        return self.folder / f"{file_id}.jsonl"

    def add(self, owner: str, filename: str, purpose: str, content: bytes, lines: int,
            file_id: str | None = None) -> StoredFile:
        """Write the bytes, then the row (a replaced id keeps its place: batch output rewritten
        after a restart)."""
        f = StoredFile(file_id or f"file-{uuid.uuid4().hex[:24]}", owner, filename, purpose, len(content),
                       lines, self.clock())
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(f.id).with_suffix(".part")
        tmp.write_bytes(content)
        os.replace(tmp, self.path(f.id))
        self.db.write("INSERT INTO files (id, owner, filename, purpose, bytes, lines, created_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET bytes = excluded.bytes, "
                      "lines = excluded.lines", (f.id, owner, filename, purpose, f.bytes, lines, f.created_at))
        return f

    def get(self, file_id: str, owner: str) -> StoredFile | None:
        if not _ID_OK.match(file_id):
            return None
        rows = self.db.read("SELECT id, owner, filename, purpose, bytes, lines, created_at FROM files "
                            "WHERE id=? AND owner=?", (file_id, owner))
        return StoredFile(*rows[0]) if rows else None

    def list(self, owner: str, after: str | None, limit: int, order: str,
             purpose: str | None) -> tuple[list[StoredFile], bool]:
        """A page of the tenant's files, newest first (`order: asc`: oldest first), after the id
        `after`; and whether more follow."""
        desc = order != "asc"
        sql = "SELECT id, owner, filename, purpose, bytes, lines, created_at FROM files WHERE owner=?"
        args: list = [owner]
        if purpose is not None:
            sql += " AND purpose=?"
            args.append(purpose)
        if after is not None:
            sql += f" AND seq {'<' if desc else '>'} COALESCE((SELECT seq FROM files WHERE id=? AND owner=?), ?)"
            args += [after, owner, -1 if desc else 1 << 62]
        sql += f" ORDER BY seq {'DESC' if desc else 'ASC'} LIMIT ?"
        rows = self.db.read(sql, (*args, limit + 1))
        return [StoredFile(*r) for r in rows[:limit]], len(rows) > limit

    def read(self, f: StoredFile) -> bytes:
        return self.path(f.id).read_bytes()

    def content(self, f: StoredFile, chunk: int = CONTENT_CHUNK) -> Iterator[bytes] | None:
        """The file's bytes a chunk at a time (for a download), or None when they are gone."""
        try:
            fh = self.path(f.id).open("rb")
        except FileNotFoundError:
            return None

        def chunks() -> Iterator[bytes]:
            with fh:
                while block := fh.read(chunk):
                    yield block
        return chunks()

    def delete(self, file_id: str, owner: str) -> bool:
        f = self.get(file_id, owner)
        if f is None:
            return False
        self.db.write("DELETE FROM files WHERE id=? AND owner=?", (file_id, owner))
        self.path(file_id).unlink(missing_ok=True)
        return True
