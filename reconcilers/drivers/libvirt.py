"""Thin async driver over one libvirt connection (libvirt-python).

The only code in kvmctl that talks to libvirt. Each method is one libvirt action on one
domain, run in a worker thread (libvirt-python blocks) so the asyncio loop never waits on the
daemon. libvirt errors come out as `LibvirtError` subclasses whose type tells the caller what
to do: `LibvirtUnavailable` (retry after reconnecting), `DomainNotFound`,
`DomainStateConflict` (the domain is not in a state that allows the action),
`InvalidDefinition` (libvirt refused the XML: terminal), `MigrationError`.

Events: libvirt needs an event loop implementation registered before the first connection is
opened. This module registers libvirt's own default implementation once per process and runs
it in one daemon thread; lifecycle and watchdog events and the close callback are handed from
that thread to the asyncio loop of the connection with `call_soon_threadsafe`. (libvirtaio's asyncio
implementation is not used: libvirt calls it from whichever thread makes an API call, and it
then touches the asyncio loop from a worker thread, which asyncio does not allow. libvirt
accepts one event implementation per process, so nothing else in the process may register
one.)

    async with await LibvirtHost.connect("qemu:///system") as host:
        async with host.events() as events:
            await host.start("vm1")
            async for event in events: ...
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from crds.libvirt_uri import LibvirtUriError, check_local_uri, check_migrate_uri, check_peer_uri

from .domain_xml import parse_kvmctl_metadata

T = TypeVar("T")

log = logging.getLogger(__name__)


class LibvirtError(Exception):
    """A libvirt call failed; the message says what, on which host and domain, and why."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        """libvirt's error code (`VIR_ERR_*`), when libvirt reported one."""


class LibvirtUnavailable(LibvirtError):
    """The libvirt daemon cannot be reached or the connection is gone: reconnect and retry."""


class DomainNotFound(LibvirtError):
    """No domain of that name is defined on this host."""


class DomainStateConflict(LibvirtError):
    """The action does not fit the domain's state (starting a running domain, for example)."""


class InvalidDefinition(LibvirtError):
    """libvirt refused a domain definition: retrying the same XML will not help."""


class InvalidUri(LibvirtError):
    """A libvirt URI outside the allow-list (libvirt_uri.py): nothing was opened."""


class MigrationError(LibvirtError):
    """A live migration failed or was refused. The domain normally keeps running on the
    source; when the cause is a lost connection to the source, look at both hosts again."""


class DomainState(StrEnum):
    """A domain's state as `virDomainGetState` reports it."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"


_DOMAIN_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


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

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}

ABORTED_JOB_GRACE = 10.0
"""Seconds to wait for a migration job to end once libvirt accepted its abort."""

_MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
)
_UNDEFINE_FLAGS = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | (
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)


@dataclass(frozen=True)
class NodeCapacity:
    """What the host offers to guests."""

    cpus: int
    memory_mib: int
    hostname: str


@dataclass(frozen=True)
class DomainInfo:
    """One domain defined (or running transiently) on the host."""

    name: str
    uuid: str
    state: DomainState
    metadata: dict[str, str]
    """kvmctl's owner tags from the domain XML (see domain_xml); empty for foreign domains."""


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

_WATCHDOG_ACTIONS = {
    getattr(libvirt, constant): constant.removeprefix("VIR_DOMAIN_EVENT_WATCHDOG_").lower()
    for constant in dir(libvirt)
    if constant.startswith("VIR_DOMAIN_EVENT_WATCHDOG_")
}

GUEST_PING = '{"execute":"guest-ping"}'
_NO_AGENT_ANSWER = (
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    libvirt.VIR_ERR_AGENT_UNSYNCED,
    libvirt.VIR_ERR_NO_SUPPORT,
)
"""Errors of a guest-agent command that mean "no answer": the agent is not connected or did
not answer in time (86), answered libvirt's `guest-sync` wrongly (97), or this connection's
driver has no guest agents at all (the test driver)."""


@dataclass(frozen=True)
class MigrationProgress:
    """A running migration's job statistics, as the source host reports them."""

    data_total_bytes: int
    data_processed_bytes: int
    data_remaining_bytes: int
    elapsed_ms: int

    @property
    def percent(self) -> float:
        """Share of the data sent so far (memory is resent when dirtied: it may go back)."""
        if self.data_total_bytes <= 0:
            return 0.0
        done = self.data_total_bytes - self.data_remaining_bytes
        return 100.0 * done / self.data_total_bytes


@dataclass(frozen=True)
class _StreamEnd:
    error: LibvirtUnavailable | None


class EventStream:
    """Lifecycle and watchdog events of every domain of one host, from the moment it was created.

    An async iterator; it ends when the host is closed, and raises LibvirtUnavailable when
    the connection is lost. Use it as a context manager (or call `close()`) to unsubscribe.
    """

    def __init__(self, host: LibvirtHost) -> None:
        self._host = host
        self._queue: asyncio.Queue[DomainEvent | _StreamEnd] = asyncio.Queue()

    def _put(self, item: DomainEvent | _StreamEnd) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> DomainEvent:
        item = await self._queue.get()
        if not isinstance(item, _StreamEnd):
            return item
        self._queue.put_nowait(item)  # every later call ends the same way
        if item.error is not None:
            raise item.error
        raise StopAsyncIteration

    def close(self) -> None:
        self._host._streams.discard(self)

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


def _start_event_thread() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per process.

    Also silences libvirt's default error handler, which prints every error to stderr: this
    module raises them as exceptions instead.
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


def _consume_result(job: asyncio.Future[Any]) -> None:
    """Retrieve a left-behind job's outcome, so asyncio does not report it as never retrieved."""
    if not job.cancelled():
        job.exception()


def _wrap(error: Any, context: str) -> LibvirtError:
    """The kvmctl exception for a libvirt.libvirtError raised while doing `context`."""
    code = error.get_error_code()
    message = f"{context}: {error.get_error_message() or error}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(message, code)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN) or (
        error.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
    ):
        return LibvirtUnavailable(message, code)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DomainStateConflict(message, code)
    if code in (
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_ERR_XML_DETAIL,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    ):
        return InvalidDefinition(message, code)
    return LibvirtError(message, code)


def _domain_info(domain: Any) -> DomainInfo:
    state = _DOMAIN_STATES.get(domain.state()[0], DomainState.NOSTATE)
    return DomainInfo(
        name=str(domain.name()),
        uuid=str(domain.UUIDString()),
        state=state,
        metadata=parse_kvmctl_metadata(domain.XMLDesc(0)),
    )


class LibvirtHost:
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
    async def connect(cls, uri: str) -> LibvirtHost:
        """Open a read-write connection to `uri` (`qemu:///system`, `test:///default`, ...).

        InvalidUri, before libvirt sees it, for a URI `check_local_uri` refuses.
        """
        try:
            check_local_uri(uri)
        except LibvirtUriError as error:
            raise InvalidUri(f"cannot connect to libvirt: {error}") from None
        _start_event_thread()
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
        self._end_streams(_StreamEnd(error=None))

    def _teardown(self) -> None:
        connection = self._connection
        # Either call fails only when the connection is already gone.
        for callback_id in self._callback_ids:
            with suppress(libvirt.libvirtError):
                connection.domainEventDeregisterAny(callback_id)
        with suppress(libvirt.libvirtError):
            connection.unregisterCloseCallback()
        connection.close()

    async def __aenter__(self) -> LibvirtHost:
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
        stream = EventStream(self)
        if self._closed or self._lost is not None:
            stream._put(_StreamEnd(error=self._lost))
        else:
            self._streams.add(stream)
        return stream

    def on_connection_closed(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` on the asyncio loop if the connection is lost (`eof` when
        the daemon died, `keepalive`, `error`); not called for `close()`."""
        self._close_callbacks.append(callback)

    def _on_lifecycle(self, _conn: Any, domain: Any, event: int, detail: int, _opaque: Any) -> None:
        """Runs in libvirt's event thread."""
        kind = _EVENT_KINDS.get(event)
        if kind is None:
            return
        lifecycle_event = LifecycleEvent(
            name=str(domain.name()),
            uuid=str(domain.UUIDString()),
            event=kind,
            detail=_EVENT_DETAILS.get((event, detail), str(detail)),
        )
        self._in_loop(self._publish, lifecycle_event)

    def _on_watchdog(self, _conn: Any, domain: Any, action: int, _opaque: Any) -> None:
        """Runs in libvirt's event thread."""
        watchdog_event = WatchdogEvent(
            name=str(domain.name()),
            uuid=str(domain.UUIDString()),
            action=_WATCHDOG_ACTIONS.get(action, str(action)),
        )
        self._in_loop(self._publish, watchdog_event)

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        """Runs in libvirt's event thread."""
        self._in_loop(self._connection_lost, _CLOSE_REASONS.get(reason, str(reason)))

    def _in_loop(self, function: Callable[[T], None], argument: T) -> None:
        # A loop that is already closed has nobody left to tell.
        with suppress(RuntimeError):
            self._loop.call_soon_threadsafe(function, argument)

    def _publish(self, event: DomainEvent) -> None:
        for stream in self._streams:
            stream._put(event)

    def _connection_lost(self, reason: str) -> None:
        if self._closed:
            return
        log.warning("libvirt connection to %s closed (%s)", self.uri, reason)
        self._lost = LibvirtUnavailable(f"connection to libvirt at {self.uri} lost ({reason})")
        self._end_streams(_StreamEnd(error=self._lost))
        for callback in self._close_callbacks:
            callback(reason)

    def _end_streams(self, end: _StreamEnd) -> None:
        for stream in self._streams:
            stream._put(end)
        self._streams.clear()

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, context: str, function: Callable[[], T]) -> T:
        """Run one blocking libvirt call in a worker thread, translating its errors."""
        if self._closed:
            raise LibvirtUnavailable(f"{context}: connection to {self.uri} is closed")
        try:
            return await asyncio.to_thread(function)
        except libvirt.libvirtError as error:
            raise _wrap(error, f"{context} on {self.uri}") from error

    def _domain(self, name: str) -> Any:
        return self._connection.lookupByName(name)

    async def node_info(self) -> NodeCapacity:
        def query() -> NodeCapacity:
            info = self._connection.getInfo()
            return NodeCapacity(
                cpus=int(info[2]),
                memory_mib=int(info[1]),
                hostname=str(self._connection.getHostname()),
            )

        return await self._call("read node info", query)

    async def list_domains(self) -> list[DomainInfo]:
        """Every domain on the host, defined or running (one undefined meanwhile is left out)."""

        def query() -> list[DomainInfo]:
            infos = []
            for domain in self._connection.listAllDomains(0):
                try:
                    infos.append(_domain_info(domain))
                except libvirt.libvirtError as error:
                    if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return infos

        return await self._call("list domains", query)

    async def active_domains(self) -> frozenset[tuple[str, str, int]]:
        """(name, UUID, ID) of every domain with a process: one call, no XML read. A domain
        started, stopped or replaced changes it; a change of state or metadata does not."""

        def query() -> frozenset[tuple[str, str, int]]:
            domains = self._connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            return frozenset((str(d.name()), str(d.UUIDString()), int(d.ID())) for d in domains)

        return await self._call("list active domains", query)

    async def lookup(self, name: str) -> DomainInfo | None:
        """The domain called `name`, or None if there is none."""
        try:
            return await self._call(
                f"look up domain {name!r}", lambda: _domain_info(self._domain(name))
            )
        except DomainNotFound:
            return None

    async def state(self, name: str) -> DomainState:
        state_number = await self._call(
            f"read state of domain {name!r}", lambda: self._domain(name).state()[0]
        )
        return _DOMAIN_STATES.get(state_number, DomainState.NOSTATE)

    async def domain_xml(self, name: str, inactive: bool = False) -> str:
        """The domain's XML as libvirt holds it (`inactive`: the definition for the next boot)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return await self._call(
            f"read XML of domain {name!r}", lambda: str(self._domain(name).XMLDesc(flags))
        )

    async def define(self, xml: str) -> None:
        """Define (create or replace) a persistent domain; a running one gets the new
        definition at its next start."""
        await self._call("define domain", lambda: self._connection.defineXML(xml))

    async def start(self, name: str) -> None:
        await self._call(f"start domain {name!r}", lambda: self._domain(name).create())

    async def reset(self, name: str) -> None:
        """Reset the running domain in place, like pressing its reset button (virDomainReset)."""
        await self._call(f"reset domain {name!r}", lambda: self._domain(name).reset(0))

    async def guest_ping(self, name: str, timeout: int) -> bool:
        """Send `guest-ping` to the domain's qemu-guest-agent and wait up to `timeout` seconds:
        True if it answered, False if it did not (not connected, no answer in time, or no
        guest agents on this driver). DomainStateConflict if the domain is not running."""

        def ping() -> bool:
            domain = self._domain(name)
            try:
                libvirt_qemu.qemuAgentCommand(domain, GUEST_PING, timeout, 0)
            except libvirt.libvirtError as error:
                if error.get_error_code() in _NO_AGENT_ANSWER:
                    return False
                raise
            return True

        return await self._call(f"ping the guest agent of {name!r}", ping)

    async def destroy(self, name: str) -> None:
        """Stop the domain at once, like pulling the power cord."""
        await self._call(f"destroy domain {name!r}", lambda: self._domain(name).destroy())

    async def undefine(self, name: str) -> None:
        """Remove the definition (a running domain keeps running, as a transient one)."""
        await self._call(
            f"undefine domain {name!r}", lambda: self._domain(name).undefineFlags(_UNDEFINE_FLAGS)
        )

    async def shutdown(self, name: str, timeout: float, poll_interval: float = 0.2) -> bool:
        """Ask the guest to power off (ACPI) and wait up to `timeout` seconds for it; then
        destroy it. True if it shut down by itself (or was already off)."""
        if await self.state(name) is DomainState.SHUTOFF:
            return True
        try:
            await self._call(f"shut down domain {name!r}", lambda: self._domain(name).shutdown())
        except DomainStateConflict:
            if await self.state(name) is DomainState.SHUTOFF:
                return True  # it stopped between the look and the request
            raise
        deadline = self._loop.time() + timeout
        while True:
            if await self.state(name) is DomainState.SHUTOFF:
                return True
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(poll_interval, remaining))
        log.warning("domain %r did not shut down within %.0f s: destroying it", name, timeout)
        try:
            await self.destroy(name)
        except DomainStateConflict:
            return True  # it went off between the last look and the destroy
        return False

    async def migrate(
        self,
        name: str,
        dest_uri: str,
        *,
        migrate_uri: str,
        max_downtime_ms: int,
        bandwidth_mibps: int | None = None,
        progress: Callable[[MigrationProgress], None] | None = None,
        poll_interval: float = 0.5,
        stall_timeout: float = 15.0,
    ) -> None:
        """Live-migrate a running domain, peer to peer, to the host at `dest_uri`.

        `dest_uri` is the destination's libvirt URI as the *source daemon* reaches it
        (`qemu+tcp://10.0.0.2/system`); `migrate_uri` is where QEMU sends the memory
        (`tcp://10.0.0.2`). The definition moves with the domain (persistent on the
        destination, undefined here). `progress` is called every `poll_interval` seconds while
        the job runs. Raises DomainNotFound, or MigrationError (the domain normally keeps
        running here; also, before anything starts, for a URI outside the allow-list of
        libvirt_uri.py). Cancelling the calling task aborts the migration job, and so does a job
        that moved no data for `stall_timeout` seconds: an unreachable target can otherwise hold
        it for minutes (a TCP connect to a silent peer).
        """
        context = f"migrate domain {name!r} to {dest_uri}"
        # Both come from the target's agent (untrusted), and the source daemon opens them as root.
        try:
            check_peer_uri(dest_uri)
            check_migrate_uri(migrate_uri)
        except LibvirtUriError as error:
            raise MigrationError(f"{context} refused: {error}") from None
        domain = await self._call(f"look up domain {name!r}", lambda: self._domain(name))
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: migrate_uri}
        if bandwidth_mibps is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mibps
        try:
            # Since libvirt 1.2.9 the limit may be set before the job starts.
            await self._call(
                f"{context}: set max downtime {max_downtime_ms} ms",
                lambda: domain.migrateSetMaxDowntime(max_downtime_ms, 0),
            )
        except LibvirtError as error:
            raise MigrationError(str(error), error.code) from error
        job = asyncio.ensure_future(
            self._call(context, lambda: domain.migrateToURI3(dest_uri, params, _MIGRATE_FLAGS))
        )
        loop = asyncio.get_running_loop()
        moved, last_move = -1, loop.time()
        try:
            while not (await asyncio.wait({job}, timeout=poll_interval))[0]:
                report = await self._job_progress(domain)
                if report is not None and report.data_processed_bytes > moved:
                    moved, last_move = report.data_processed_bytes, loop.time()
                if report is not None and progress is not None:
                    progress(report)
                if loop.time() - last_move > stall_timeout:
                    if await self._abort(domain, job, name):
                        return  # it completed just before the abort
                    raise MigrationError(
                        f"{context}: no data moved for {stall_timeout:.0f} s; aborted "
                        "(is the target reachable on its migration address?)"
                    )
        except asyncio.CancelledError:
            log.warning("%s: cancelled, aborting the migration job", context)
            await self._abort(domain, job, name)
            raise
        try:
            job.result()
        except LibvirtError as error:
            raise MigrationError(str(error), error.code) from error

    async def _abort(self, domain: Any, job: asyncio.Future[Any], name: str) -> bool:
        """Abort the migration job and wait for it to end; True if it had completed anyway.

        Once libvirt accepted the abort, the migration can no longer complete (libvirt checks
        the abort flag before QEMU starts sending), so the wait is bounded: a peer-to-peer
        connect to a silent target only ends with TCP's own timeout, about two minutes, and
        the domain keeps running here meanwhile. If the abort was refused (the job may just
        have ended) the outcome is unknown, so wait for the job whatever it takes.
        """
        try:
            await self._call(f"abort migration of domain {name!r}", domain.abortJob)
        except LibvirtError as error:
            log.info("aborting the migration of %s: %s; waiting for the job", name, error)
            await asyncio.wait({job})
        else:
            await asyncio.wait({job}, timeout=ABORTED_JOB_GRACE)
        if not job.done():
            log.warning(
                "migration of %s aborted; libvirt ends its job when the connection attempt "
                "gives up",
                name,
            )
            job.add_done_callback(_consume_result)
            return False
        return job.exception() is None

    async def _job_progress(self, domain: Any) -> MigrationProgress | None:
        """The running job's statistics; None between jobs or if they cannot be read."""
        try:
            stats = await self._call("read migration job statistics", domain.jobStats)
        except LibvirtError as error:
            log.debug("no migration progress: %s", error)
            return None
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        return MigrationProgress(
            data_total_bytes=int(stats.get(libvirt.VIR_DOMAIN_JOB_DATA_TOTAL, 0)),
            data_processed_bytes=int(stats.get(libvirt.VIR_DOMAIN_JOB_DATA_PROCESSED, 0)),
            data_remaining_bytes=int(stats.get(libvirt.VIR_DOMAIN_JOB_DATA_REMAINING, 0)),
            elapsed_ms=int(stats.get(libvirt.VIR_DOMAIN_JOB_TIME_ELAPSED, 0)),
        )
