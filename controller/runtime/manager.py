"""The manager: runs a process's controllers on shared watch caches, with leader election.

Every loop of a daemon is a `Controller` (`controller/runtime/controller.py`: a primary kind, a
reconciler following `controller/runtime/reconcile.py`'s contract, watches of other kinds,
external sources, a predicate), so the reconcile spans, queue depths and durations of
`telemetry` cover all of them. The manager:

1. starts one informer per kind (shared between controllers) and waits until all have listed,
   then awaits `setup` (work that must be done before any controller starts: the agent's
   registration);
2. runs every controller's workers and sources, and the `background` tasks, then calls
   `on_ready` (once); a `leader_only` controller runs only while this process
   leads the election and is cancelled the moment leadership is lost; each start (every term)
   enqueues every cached object, so nothing changed meanwhile is missed; `leader_tasks` are
   other long-running leader-only work (the HA loop), started each term with the term's
   fencing token and guard and cancelled with it;
3. records a terminal reconcile error, and a blocked reconcile (`Blocked`: warned once, looked
   at again later), as `Ready=False reason=<reason>` on the object's status (guarded by the
   fencing token for leader-only controllers) and a Warning event (`record_not_ready`);
4. serves `GET /healthz` (200 once synced and every part alive, else 503) and `GET /metrics`
   (prometheus_client's default registry, where `setup_telemetry(..., "prometheus")` puts
   kvmctl's metrics) on a loopback port by default;
5. on SIGTERM or SIGINT (or `stop()`): cancels workers, resigns leadership, awaits `teardown`,
   stops the informers and the HTTP server and closes the store (unless `close_store=False`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import prometheus_client

from controller.runtime.controller import Controller, ControllerRunner
from controller.runtime.defaults import DEFAULT_HTTP_PORT
from controller.runtime.events import EventRecorder
from controller.runtime.informer import DEFAULT_RESYNC_PERIOD, KeySink, SharedInformers
from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import ElectionTiming, guard_compare
from controller.runtime.reconcile import (
    Blocked,
    OnNotReady,
    RetryableError,
    TerminalError,
    record_not_ready,
)
from controller.runtime.store import Compare, Store

from . import telemetry

log = logging.getLogger(__name__)

HTTP_READ_TIMEOUT = 5.0
"""Records a terminal error or a blocked reconcile on the object (`record_not_ready`)."""


@dataclass(frozen=True)
class Term:
    """One term of leadership: the fencing token and the compare that guards writes with it."""

    token: int
    guard: list[Compare]

    @classmethod
    def of(cls, store: Store, election_key: str, token: int) -> Term:
        return cls(token, [guard_compare(store.client, election_key, token)])


@dataclass(frozen=True)
class LeaderTask:
    """Leader-only work besides reconcilers: `run(token, guard)` for one term, until cancelled.

    `guard` is the compare list that makes a write fail once the term `token` is over.
    """

    name: str
    run: Callable[[int, list[Compare]], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Background:
    """Work that runs for the life of the manager, leader or not (until cancelled)."""

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]


class Manager:
    """Runs `controllers` against `store` until stopped; see the module docstring."""

    def __init__(
        self,
        store: Store,
        controllers: Sequence[Controller],
        *,
        identity: str | None = None,
        election: str = "controller",
        election_timing: ElectionTiming | None = None,
        http_host: str = "127.0.0.1",
        http_port: int | None = DEFAULT_HTTP_PORT,
        resync_period: float | None = DEFAULT_RESYNC_PERIOD,
        component: str = "kvmctl-controller",
        node: str | None = None,
        informers: SharedInformers | None = None,
        leader_tasks: Sequence[LeaderTask] = (),
        background: Sequence[Background] = (),
        setup: Callable[[], Awaitable[None]] | None = None,
        on_ready: Callable[[], None] | None = None,
        teardown: Callable[[], Awaitable[None]] | None = None,
        close_store: bool = True,
        campaign: bool | None = None,
    ) -> None:
        """`informers` lets the caller build mappers on the caches the manager will use;
        `background` tasks run (after the caches synced) whether this process leads or not;
        `node` is also written in the leader record. `campaign` (default: whether a leader task
        or a leader-only controller is given) creates the elector, so that leader-only
        controllers may also be `add`ed later."""
        self.store = store
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self.informers = informers or SharedInformers(store, resync_period)
        self.recorder = EventRecorder(store, component, node)
        self._runners: list[ControllerRunner] = []
        self._leader_tasks = list(leader_tasks)
        self._background = list(background)
        self._setup = setup
        self._on_ready = on_ready
        self._teardown = teardown
        self._close_store = close_store
        self.elector: LeaderElector | None = None
        if campaign is None:
            campaign = bool(leader_tasks) or any(c.leader_only for c in controllers)
        if campaign:
            self.elector = LeaderElector(
                store.client, store.prefix, election, self.identity, election_timing, node
            )
        self._http_host = http_host
        self._http_port = http_port
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._token: int | None = None
        self._stopping = asyncio.Event()
        self.started = asyncio.Event()
        """Set once the caches are synced and the controllers run (or campaign)."""
        self._check_names([])  # the leader tasks' names
        for controller in controllers:
            self.add(controller)

    @property
    def http_port(self) -> int | None:
        """The port /healthz and /metrics are served on (the real one when 0 was asked)."""
        if self._server is None or not self._server.sockets:
            return None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def is_leader(self) -> bool:
        return self._token is not None

    def add(self, controller: Controller) -> None:
        """Register `controller` (before `run`); its informers join the shared cache."""
        if self.started.is_set():
            raise RuntimeError(f"controller {controller.name!r} added after the manager started")
        if controller.leader_only and self.elector is None:
            raise ValueError(f"leader-only controller {controller.name!r}: nobody campaigns")
        self._check_names([controller.name])
        self._runners.append(ControllerRunner(controller, self.informers))

    def queue(self, name: str) -> KeySink:
        """Where to enqueue keys for controller `name` (dropped while it does not run)."""
        for runner in self._runners:
            if runner.controller.name == name:
                return runner
        raise KeyError(f"no controller named {name!r}")

    def term(self) -> Term:
        """The term this manager leads; RetryableError when it does not lead."""
        guard = self.leader_guard()
        assert self._token is not None
        return Term(self._token, guard)

    def healthy(self) -> bool:
        """Whether the caches are synced and every part runs (what /healthz answers)."""
        return self._health()[0]

    def _check_names(self, new: list[str]) -> None:
        names = [r.controller.name for r in self._runners] + [t.name for t in self._leader_tasks]
        names += new
        if len(set(names)) != len(names):
            raise ValueError(f"controller names must be distinct: {names}")

    def leader_guard(self) -> list[Compare]:
        """Compares to add to a safety-critical write so it fails once this term is over."""
        if self.elector is None or self._token is None:
            raise RetryableError("this manager does not lead: the write is refused")
        return [guard_compare(self.store.client, self.elector.key, self._token)]

    def stop(self) -> None:
        """Ask `run` to shut down (what SIGTERM and SIGINT do)."""
        self._stopping.set()

    async def run(self, handle_signals: bool = True) -> None:
        """Run until `stop()` or a signal; then shut everything down and close the store.

        Raises if a part fails for good (an informer or a controller's workers crash).
        """
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for signum in signals:
            loop.add_signal_handler(signum, self.stop)
        try:
            if self._http_port is not None:
                self._server = await asyncio.start_server(
                    self._serve_http, self._http_host, self._http_port
                )
            self.informers.start()
            if not await self._unless_stopped(self.informers.wait_for_sync()):
                return
            if self._setup is not None and not await self._unless_stopped(self._setup()):
                return
            for runner in self._runners:
                if not runner.controller.leader_only:
                    work = runner.run(self._recording(runner.controller))
                    name = f"controller {runner.controller.name}"
                    self._tasks.append(asyncio.create_task(work, name=name))
            for task in self._background:
                self._tasks.append(asyncio.create_task(task.run(), name=task.name))
            if self.elector is not None:
                self._tasks.append(asyncio.create_task(self.elector.run(self._lead), name="elect"))
            self.started.set()
            if self._on_ready is not None:
                self._on_ready()
            await self._until_stopped_or_failed()
        finally:
            await self._shutdown()
            for signum in signals:
                loop.remove_signal_handler(signum)

    async def _unless_stopped(self, work: Awaitable[None]) -> bool:
        """Await `work` unless a stop comes first; True if it completed."""
        task = asyncio.ensure_future(work)
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task.done() and not task.cancelled():
            task.result()  # re-raise a failure
            return True
        return False

    async def _until_stopped_or_failed(self) -> None:
        stop = asyncio.create_task(self._stopping.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {stop, *self._tasks, *self.informers.tasks()}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        for task in done:
            if task is not stop:
                error = None if task.cancelled() else task.exception()
                name = task.get_name() if isinstance(task, asyncio.Task) else "a task"
                raise RuntimeError(f"{name} stopped unexpectedly: {error!r}") from error

    async def _lead(self, token: int) -> None:
        """Leader-only work for one term: leader-only controllers and tasks, until cancelled."""
        self._token = token
        if self.elector is not None:
            telemetry.set_leader(self.elector.key, True)
        try:
            guard = self.leader_guard()
            async with asyncio.TaskGroup() as group:
                for runner in self._runners:
                    if runner.controller.leader_only:
                        group.create_task(runner.run(self._recording(runner.controller)))
                for task in self._leader_tasks:
                    group.create_task(task.run(token, list(guard)), name=task.name)
        finally:
            self._token = None
            if self.elector is not None:
                telemetry.set_leader(self.elector.key, False)

    def _recording(self, controller: Controller) -> OnNotReady:
        if controller.on_not_ready is not None:
            return controller.on_not_ready
        return functools.partial(self._record, controller)

    async def _record(
        self, controller: Controller, key: str, error: TerminalError | Blocked
    ) -> None:
        """`Ready=False` and a Warning event (guarded by the term for leader-only controllers)."""
        guard = self.leader_guard() if controller.leader_only else []
        await record_not_ready(self.store, self.recorder, controller.kind, key, error, guard)

    async def _shutdown(self) -> None:
        """Stop in order: workers and leadership (resigning), informers, HTTP, the store."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        try:
            if self._teardown is not None:
                await self._teardown()
        finally:
            await self.informers.stop()
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            if self._close_store:
                await self.store.close()
        log.info("manager %s shut down", self.identity)

    # HTTP -----------------------------------------------------------------------------------

    def _health(self) -> tuple[bool, str]:
        if not self.informers.synced():
            return False, "caches not synced yet"
        if not self.informers.alive():
            return False, "an informer stopped"
        if not self.started.is_set() or any(task.done() for task in self._tasks):
            return False, "controllers not running"
        return True, "ok"

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.1 server: GET /healthz and GET /metrics, one request per connection."""
        try:
            async with asyncio.timeout(HTTP_READ_TIMEOUT):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/healthz":
                healthy, reason = self._health()
                status = "200 OK" if healthy else "503 Service Unavailable"
                content_type, body = "text/plain", f"{reason}\n".encode()
            elif path == "/metrics":
                status = "200 OK"
                content_type = prometheus_client.CONTENT_TYPE_LATEST
                body = prometheus_client.generate_latest()
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method == "GET" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as error:
            log.debug("HTTP request dropped: %s", error)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
