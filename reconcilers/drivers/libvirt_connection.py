"""One libvirt connection: opening and closing it, its event subscription, and running one
blocking libvirt call in a worker thread with its errors translated.

The base of `LibvirtHost` (libvirt_host.py), which adds the domain calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType
from typing import Any, Self, TypeVar

import libvirt

from crds.libvirt_uri import LibvirtUriError, check_local_uri

from .libvirt_errors import InvalidUri, LibvirtError, LibvirtUnavailable, wrap_error
from .libvirt_events import (
    DomainEvent,
    EventStream,
    StreamEnd,
    close_reason,
    lifecycle_event,
    start_event_thread,
    watchdog_event,
)

T = TypeVar("T")

log = logging.getLogger(__name__)


class LibvirtConnection:
    """One libvirt connection, standing for one host. Create it with `connect()`."""

    def __init__(self, uri: str, connection: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.uri = uri
        self._connection = connection
        self._loop = loop
        self._closed = False
        self._lost: LibvirtUnavailable | None = None
        self._streams: set[EventStream] = set()
        self._close_callbacks: list[Callable[[str], None]] = []
        self._callback_ids: list[int] = []

    @classmethod
    async def connect(cls, uri: str) -> Self:
        """Open a read-write connection to `uri` (`qemu:///system`, `test:///default`, ...).

        InvalidUri, before libvirt sees it, for a URI `check_local_uri` refuses.
        """
        try:
            check_local_uri(uri)
        except LibvirtUriError as error:
            raise InvalidUri(f"cannot connect to libvirt: {error}") from None
        start_event_thread()
        try:
            connection = await asyncio.to_thread(libvirt.open, uri)
        except libvirt.libvirtError as error:
            message = f"cannot connect to libvirt at {uri}: {error.get_error_message() or error}"
            raise LibvirtUnavailable(message, error.get_error_code()) from error
        host = cls(uri, connection, asyncio.get_running_loop())
        try:
            await host._call("subscribe to events", host._subscribe)
        except LibvirtError:
            await asyncio.to_thread(connection.close)
            raise
        return host

    def _subscribe(self) -> None:
        connection = self._connection
        connection.registerCloseCallback(self._on_close, None)
        for event_id, callback in (
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_WATCHDOG, self._on_watchdog),
        ):
            self._callback_ids.append(
                connection.domainEventRegisterAny(None, event_id, callback, None)
            )

    async def close(self) -> None:
        """Unsubscribe, close the connection and end every event stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._teardown)
        self._end_streams(StreamEnd(error=None))

    def _teardown(self) -> None:
        connection = self._connection
        # Either call fails only when the connection is already gone.
        for callback_id in self._callback_ids:
            with suppress(libvirt.libvirtError):
                connection.domainEventDeregisterAny(callback_id)
        with suppress(libvirt.libvirtError):
            connection.unregisterCloseCallback()
        connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- events ------------------------------------------------------------------------------

    def events(self) -> EventStream:
        """Subscribe to lifecycle and watchdog events of all domains, starting now (ends at once
        on a closed or lost connection)."""
        stream = EventStream(self._streams)
        if self._closed or self._lost is not None:
            stream.put(StreamEnd(error=self._lost))
        else:
            self._streams.add(stream)
        return stream

    def on_connection_closed(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` on the asyncio loop if the connection is lost (`eof` when
        the daemon died, `keepalive`, `error`); not called for `close()`."""
        self._close_callbacks.append(callback)

    def _on_lifecycle(self, _conn: Any, domain: Any, event: int, detail: int, _opaque: Any) -> None:
        """Runs in libvirt's event thread."""
        lifecycle = lifecycle_event(domain, event, detail)
        if lifecycle is not None:
            self._in_loop(self._publish, lifecycle)

    def _on_watchdog(self, _conn: Any, domain: Any, action: int, _opaque: Any) -> None:
        """Runs in libvirt's event thread."""
        self._in_loop(self._publish, watchdog_event(domain, action))

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        """Runs in libvirt's event thread."""
        self._in_loop(self._connection_lost, close_reason(reason))

    def _in_loop(self, function: Callable[[T], None], argument: T) -> None:
        # A loop that is already closed has nobody left to tell.
        with suppress(RuntimeError):
            self._loop.call_soon_threadsafe(function, argument)

    def _publish(self, event: DomainEvent) -> None:
        for stream in self._streams:
            stream.put(event)

    def _connection_lost(self, reason: str) -> None:
        if self._closed:
            return
        log.warning("libvirt connection to %s closed (%s)", self.uri, reason)
        self._lost = LibvirtUnavailable(f"connection to libvirt at {self.uri} lost ({reason})")
        self._end_streams(StreamEnd(error=self._lost))
        for callback in self._close_callbacks:
            callback(reason)

    def _end_streams(self, end: StreamEnd) -> None:
        for stream in self._streams:
            stream.put(end)
        self._streams.clear()

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, context: str, function: Callable[[], T]) -> T:
        """Run one blocking libvirt call in a worker thread, translating its errors."""
        if self._closed:
            raise LibvirtUnavailable(f"{context}: connection to {self.uri} is closed")
        try:
            return await asyncio.to_thread(function)
        except libvirt.libvirtError as error:
            raise wrap_error(error, f"{context} on {self.uri}") from error

    def _domain(self, name: str) -> Any:
        return self._connection.lookupByName(name)
