"""Domain events from libvirt: lifecycle and watchdog events, the stream that delivers them,
and the one thread per process that runs libvirt's event loop.

libvirt needs an event loop implementation registered before the first connection is opened.
`start_event_thread` registers libvirt's own default implementation once per process and runs
it in one daemon thread; the connection hands each event from that thread to its asyncio loop
with `call_soon_threadsafe`. (libvirtaio's asyncio implementation is not used: libvirt calls it
from whichever thread makes an API call, and it then touches the asyncio loop from a worker
thread, which asyncio does not allow. libvirt accepts one event implementation per process, so
nothing else in the process may register one.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any

import libvirt

from .libvirt_errors import LibvirtUnavailable

log = logging.getLogger(__name__)


class LifecycleEventKind(StrEnum):
    """The `VIR_DOMAIN_EVENT_*` lifecycle event types (member names are libvirt's)."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"


_EVENT_KINDS = {
    getattr(libvirt, f"VIR_DOMAIN_EVENT_{kind.name}"): kind for kind in LifecycleEventKind
}
_EVENT_DETAILS = {
    (number, getattr(libvirt, constant)): constant.removeprefix(f"VIR_DOMAIN_EVENT_{kind.name}_")
    .lower()
    .replace("_", "-")
    for number, kind in _EVENT_KINDS.items()
    for constant in dir(libvirt)
    if constant.startswith(f"VIR_DOMAIN_EVENT_{kind.name}_")
}
"""(event, detail) numbers to the detail's name: (STOPPED, 2) is `destroyed`, (STOPPED, 5) is
`failed` (QEMU died), (STARTED, 1) is `migrated`, ..., from libvirt's own constant names."""

_WATCHDOG_ACTIONS = {
    getattr(libvirt, constant): constant.removeprefix("VIR_DOMAIN_EVENT_WATCHDOG_").lower()
    for constant in dir(libvirt)
    if constant.startswith("VIR_DOMAIN_EVENT_WATCHDOG_")
}

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


@dataclass(frozen=True)
class LifecycleEvent:
    """A domain changed state: `event` is the kind, `detail` the reason (`destroyed`,
    `failed`, `migrated`, `booted`, ...; the number as text if this libvirt-python does not
    know it)."""

    name: str
    uuid: str
    event: LifecycleEventKind
    detail: str


@dataclass(frozen=True)
class WatchdogEvent:
    """The domain's watchdog device fired and QEMU took `action` (`reset`, `poweroff`, ...:
    libvirt's `VIR_DOMAIN_EVENT_WATCHDOG_*` names, lower case)."""

    name: str
    uuid: str
    action: str


DomainEvent = LifecycleEvent | WatchdogEvent


def lifecycle_event(domain: Any, event: int, detail: int) -> LifecycleEvent | None:
    """The event of libvirt's lifecycle callback arguments; None for an unknown event type."""
    kind = _EVENT_KINDS.get(event)
    if kind is None:
        return None
    return LifecycleEvent(
        name=str(domain.name()),
        uuid=str(domain.UUIDString()),
        event=kind,
        detail=_EVENT_DETAILS.get((event, detail), str(detail)),
    )


def watchdog_event(domain: Any, action: int) -> WatchdogEvent:
    """The event of libvirt's watchdog callback arguments."""
    return WatchdogEvent(
        name=str(domain.name()),
        uuid=str(domain.UUIDString()),
        action=_WATCHDOG_ACTIONS.get(action, str(action)),
    )


def close_reason(reason: int) -> str:
    """The name of a `VIR_CONNECT_CLOSE_REASON_*` number (`eof`, `keepalive`, ...)."""
    return _CLOSE_REASONS.get(reason, str(reason))


@dataclass(frozen=True)
class StreamEnd:
    """Put last on a stream: it ends, cleanly or (`error`) because the connection was lost."""

    error: LibvirtUnavailable | None


class EventStream:
    """Lifecycle and watchdog events of every domain of one host, from the moment it was created.

    An async iterator; it ends when the host is closed, and raises LibvirtUnavailable when
    the connection is lost. Use it as a context manager (or call `close()`) to unsubscribe.
    """

    def __init__(self, subscribers: set[EventStream]) -> None:
        self._subscribers = subscribers
        """The connection's set of open streams, which `close()` leaves."""
        self._queue: asyncio.Queue[DomainEvent | StreamEnd] = asyncio.Queue()

    def put(self, item: DomainEvent | StreamEnd) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> DomainEvent:
        item = await self._queue.get()
        if not isinstance(item, StreamEnd):
            return item
        self._queue.put_nowait(item)  # every later call ends the same way
        if item.error is not None:
            raise item.error
        raise StopAsyncIteration

    def close(self) -> None:
        self._subscribers.discard(self)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


_event_thread_lock = threading.Lock()
_event_thread: threading.Thread | None = None


def start_event_thread() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per process.

    Also silences libvirt's default error handler, which prints every error to stderr: the
    driver raises them as exceptions instead.
    """
    global _event_thread
    with _event_thread_lock:
        if _event_thread is not None:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        _event_thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        _event_thread.start()


def _ignore_libvirt_error(_opaque: object, _error: object) -> None:
    return None


def _run_event_loop() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.error("libvirt event loop iteration failed")
