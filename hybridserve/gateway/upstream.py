"""A lean HTTP/1.1 client for the gateway → backend hop: a keep-alive pool per backend.

Why not httpx here: on this hop every microsecond is the gateway's own overhead, and
httpx/httpcore spend ~0.7 ms of CPU per request and scan the whole pool on every
request, which collapses under load (measured: see benchmarks/bench_gateway.py).
This client writes the request head and body in one go, reads the response head,
and then hands back the body either whole (`read`) or as it arrives (`iter_raw`:
chunked transfer decoded, bytes otherwise untouched). httpx remains the client
for health checks, which are rare.

A pooled connection the server has closed is detected before reuse (EOF already
seen) or, at worst, fails before any response byte: then the request is sent once
more on a fresh connection. Anything interrupted mid-response closes its connection.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

_NET_ERRORS = (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


class ConnectFailed(Exception):
    """No TCP connection could be made (backend down)."""


class ConnectionLost(Exception):
    """The connection died before the response head arrived."""


class BrokenResponse(Exception):
    """The connection died in the middle of a response body."""


class _Conn:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def reusable(self, now: float, expiry_s: float) -> bool:
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and now - self.idle_since < expiry_s)

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """Status and headers at once; the body is read with `read` or `iter_raw`, then released."""

    def __init__(self, pool: "Pool", conn: _Conn, status: int, headers: dict[bytes, bytes],
                 no_body: bool):
        self.pool = pool
        self.status = status
        self.headers = headers
        self._conn: _Conn | None = conn
        self._keep = headers.get(b"connection", b"").lower() != b"close"
        if no_body:
            self._mode, self._left = "length", 0
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._mode, self._left = "chunked", -1
        elif b"content-length" in headers:
            self._mode, self._left = "length", int(headers[b"content-length"])
        else:
            self._mode, self._left, self._keep = "eof", -1, False
        if self._mode == "length" and self._left == 0:
            self._finish()

    @property
    def content_type(self) -> str | None:
        v = self.headers.get(b"content-type")
        return v.decode("latin-1") if v is not None else None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_raw()])

    async def iter_raw(self, read_timeout_s: float | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked framing removed); BrokenResponse if cut off."""
        conn = self._conn
        if conn is None:
            return
        reader = conn.reader
        try:
            while True:
                async with asyncio.timeout(read_timeout_s):
                    data = await self._next(reader)
                if data is None:
                    break
                yield data
        except _NET_ERRORS as err:
            self.aclose_now()
            raise BrokenResponse(f"{type(err).__name__}: {err}") from None
        except BaseException:
            self.aclose_now()
            raise
        self._finish()

    async def _next(self, reader: asyncio.StreamReader) -> bytes | None:
        if self._mode == "length":
            if self._left <= 0:
                return None
            data = await reader.read(min(self._left, 1 << 16))
            if not data:
                raise asyncio.IncompleteReadError(b"", self._left)
            self._left -= len(data)
            return data
        if self._mode == "eof":
            data = await reader.read(1 << 16)
            return data or None
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return None
        data = await reader.readexactly(size + 2)
        return data[:-2]

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self.pool.release(conn, self._keep)

    def aclose_now(self) -> None:
        """Drop the response; an unread body means the connection cannot be reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def aclose(self) -> None:
        self.aclose_now()


class Pool:
    """Keep-alive connections to one backend (`http://host:port`)."""

    def __init__(self, base_url: str, *, max_idle: int = 256, idle_expiry_s: float = 4.0,
                 connect_timeout_s: float = 5.0):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https"):
            raise ValueError(f"{base_url}: the gateway's upstream client speaks http and https only")
        self.tls = ssl.create_default_context() if u.scheme == "https" else None
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.tls else 80)
        self.prefix = u.path.rstrip("/")
        self.host_header = u.netloc
        self.max_idle = max_idle
        self.idle_expiry_s = idle_expiry_s
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Conn] = []

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable(now, self.idle_expiry_s):
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
        except (OSError, TimeoutError) as err:
            raise ConnectFailed(f"{type(err).__name__}: {err}") from None
        return _Conn(reader, writer)

    def release(self, conn: _Conn, keep: bool) -> None:
        if keep and len(self._idle) < self.max_idle and not conn.writer.is_closing():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _head(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"host: {self.host_header}",
                 f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> UpstreamResponse:
        """Send a request; return once the response head is in (the body is still to read)."""
        data = self._head(method, path, body, headers or {}) + body
        for attempt in (0, 1):
            conn = self._take_idle()
            fresh = conn is None
            if fresh:
                conn = await self._connect()
            try:
                conn.writer.write(data)
                await conn.writer.drain()
                head = await conn.reader.readuntil(b"\r\n\r\n")
            except _NET_ERRORS as err:
                conn.close()
                if fresh or attempt:
                    raise ConnectionLost(f"{type(err).__name__}: {err}") from None
                self.close()  # the server went away: its other pooled connections are stale too
                continue  # once more, on a fresh connection
            except BaseException:
                conn.close()
                raise
            return self._response(conn, method, head)
        raise AssertionError("unreachable")

    def _response(self, conn: _Conn, method: str, head: bytes) -> UpstreamResponse:
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        no_body = method == "HEAD" or status in (204, 304) or status < 200
        return UpstreamResponse(self, conn, status, headers, no_body)
