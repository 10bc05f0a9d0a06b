"""`kvmctl dashboard` for the tests: the command as its own process, a small HTTP and
Server-Sent Events client, and a headless Chromium driven by Playwright.

The browser is Debian's /usr/bin/chromium (`make debs` installs it); Playwright never downloads
one. Used by tests/test_dashboard.py (against a real etcd) and e2e/test_dashboard.py (against a
real cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import Browser, async_playwright

from e2e.harness.hosts import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT = 60.0


@contextlib.asynccontextmanager
async def dashboard_process(
    args: Sequence[str], env: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """Run `kvmctl dashboard ARGS`; yields the URL it prints once it serves. Stopped by PID."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli", "dashboard", *args,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stderr is not None
        line = await asyncio.wait_for(child.stdout.readline(), START_TIMEOUT)
        if not line.startswith(b"dashboard: "):
            error = await asyncio.wait_for(child.stderr.read(), START_TIMEOUT)
            raise RuntimeError(f"kvmctl dashboard did not start: {error.decode().strip()}")
        yield line.decode().split(" ", 1)[1].strip()
    finally:
        if child.returncode is None:
            child.terminate()
        await asyncio.wait_for(child.wait(), START_TIMEOUT)


async def _connect(
    url: str, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    secure = tls if parts.scheme == "https" else None
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port, ssl=secure, limit=1 << 22
    )
    return reader, writer, parts.path or "/"


async def fetch(
    url: str, method: str = "GET", tls: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request: the status code, the headers (lower-case names) and the body."""
    reader, writer, path = await _connect(url, tls)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: dashboard\r\n\r\n".encode())
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if line)
        body = await reader.read()
        return int(head[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def snapshot_stream(
    url: str, tls: ssl.SSLContext | None = None
) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """The snapshots `/api/stream` sends, as they come."""
    reader, writer, _ = await _connect(url, tls)
    writer.write(b"GET /api/stream HTTP/1.1\r\nHost: dashboard\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"text/event-stream" in head, head

    async def snapshots() -> AsyncIterator[dict[str, Any]]:
        while True:
            block = (await reader.readuntil(b"\n\n")).decode()
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if fields.get("event") == "snapshot":
                yield json.loads(fields["data"])

    try:
        yield snapshots()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; Playwright gives it a fresh temporary profile."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=START_TIMEOUT * 1000
        )
        try:
            yield browser
        finally:
            await browser.close()
