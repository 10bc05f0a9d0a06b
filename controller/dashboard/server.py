"""The dashboard's HTTP server: one static page, a JSON snapshot, and Server-Sent Events.

Plain asyncio streams (HTTP/1.1, one request per connection), so kvmctl needs no web framework.
Everything is read-only: GET and HEAD only, no route writes to etcd.

- `/`, `/dashboard.js`, `/dashboard.css`: the page, shipped in the package (controller/dashboard/
  static/), no build step and nothing fetched from elsewhere (the Content-Security-Policy says
  so to the browser too);
- `/api/snapshot`: the latest snapshot (controller/dashboard/view.py) as JSON;
- `/api/stream`: `text/event-stream`, one `snapshot` event on connecting and another after every
  change `LiveView` sees (changes arriving together are coalesced into one);
- `/healthz`: `ok` while every informer runs.

`LiveView` (controller/dashboard/live.py) follows etcd's watch and makes the snapshots; the
browser never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from importlib import resources
from typing import Any

from controller.dashboard.live import LiveView

log = logging.getLogger(__name__)

KEEPALIVE = 15.0
"""Seconds between SSE comments on a quiet stream, so proxies and browsers keep it open."""
MAX_REQUEST = 16384
REQUEST_TIMEOUT = 30.0
"""Seconds a connection has to send its request before it is answered 408 and closed."""
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str


class HttpError(Exception):
    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status


async def read_request(reader: asyncio.StreamReader) -> Request:
    """The request line and headers (which nothing here needs: read and dropped)."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError("431 Request Header Fields Too Large", "request too large") from None
    except TimeoutError:
        raise HttpError("408 Request Timeout", "no request received") from None
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        raise HttpError("400 Bad Request", "not an HTTP/1 request")
    method, target, _ = words
    if method not in ("GET", "HEAD"):
        raise HttpError("405 Method Not Allowed", "the dashboard is read-only: GET only")
    return Request(method, target.split("?", 1)[0])


def _head(status: str, content_type: str, length: int | None = None) -> bytes:
    headers = {"Content-Type": content_type, **SECURITY_HEADERS}
    if length is not None:
        headers["Content-Length"] = str(length)
        headers["Connection"] = "close"
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def static_file(name: str) -> bytes:
    return (resources.files("controller.dashboard") / "static" / name).read_bytes()


class DashboardServer:
    """Serves a `LiveView` on `host`:`port` (0: any free port), over TLS with `tls`."""

    def __init__(
        self, view: LiveView, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self.view = view
        self.host = host
        self.port = port
        self.tls = tls
        self._server: asyncio.Server | None = None
        self._streams: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.tls, limit=MAX_REQUEST
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._streams):
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await self._respond(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the browser went away
        finally:
            self._streams.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            request = await read_request(reader)
            head_only = request.method == "HEAD"
            if request.path == "/api/stream" and not head_only:
                await self._stream(writer)
                return
            status, content_type, body = self._route(request.path)
        except HttpError as error:
            status, content_type, body = error.status, "text/plain", f"{error}\n".encode()
        writer.write(_head(status, content_type, len(body)))
        if not head_only:
            writer.write(body)
        await writer.drain()

    def _route(self, path: str) -> tuple[str, str, bytes]:
        if path in STATIC:
            name, content_type = STATIC[path]
            return "200 OK", content_type, static_file(name)
        if path == "/api/snapshot":
            return "200 OK", "application/json", self.view.latest.encode()
        if path == "/healthz":
            alive = self.view.alive()
            return (
                ("200 OK" if alive else "503 Service Unavailable"),
                "text/plain",
                (b"ok\n" if alive else b"informers stopped\n"),
            )
        raise HttpError("404 Not Found", f"no such page: {path}")

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        """One `snapshot` event now and after every change; a comment when quiet."""
        writer.write(_head("200 OK", "text/event-stream; charset=utf-8"))
        writer.write(b"retry: 2000\n\n")
        seen = 0
        while True:
            try:
                seen, document = await asyncio.wait_for(self.view.next(seen), KEEPALIVE)
            except TimeoutError:
                writer.write(b": keepalive\n\n")
            else:
                writer.write(f"event: snapshot\nid: {seen}\ndata: {document}\n\n".encode())
            await writer.drain()
