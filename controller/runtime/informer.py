"""Watch caches (informers): every object of one kind in memory, kept current from etcd.

An informer lists its kind once, then watches from the list's revision on. A lost connection
resumes the watch where it stopped (`Store.watch` does that); a resume refused because etcd
compacted the history (`Compacted`) relists and delivers the difference, so no change is ever
missed, only folded into one. Every `resync_period` each cached object is delivered again
(`RESYNC`), so a reconciler that dropped something on the floor gets another look.

Handlers are plain functions `handler(event_type, obj)` run on the event loop; they must be
quick (enqueue a key, nothing more). Objects handed to handlers and returned by `get`/`list`
are the cache's own: read them, never change them.

`SharedInformers` holds one informer per kind, so several controllers watching the same kind
share a single cache and a single etcd watch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Generic, Literal, Protocol, cast, overload

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential
from typing_extensions import TypeVar

from controller.runtime.store import Compacted, Store, StoreError
from controller.runtime.store_client import kind_of
from controller.runtime.tasks import cancel_and_wait
from crds import AnyResource

log = logging.getLogger(__name__)

R = TypeVar("R", bound=AnyResource, default=AnyResource)
"""The model an informer holds (bare `Informer` means `Informer[AnyResource]`)."""
EventType = Literal["ADDED", "MODIFIED", "DELETED", "RESYNC"]
Handler = Callable[[EventType, AnyResource], None]
KeyMapper = Callable[[AnyResource], Iterable[str]]

DEFAULT_RESYNC_PERIOD = 600.0
LIST_RETRY_DELAY = 0.5
LIST_RETRY_MAX_DELAY = 5.0
"""A failed list is retried with exponential backoff from 0.5 s to 5 s, with full jitter."""


class KeySink(Protocol):
    """Anything keys can be added to: a `WorkQueue`, or a controller's current queue."""

    def add(self, key: str) -> None: ...


class Informer(Generic[R]):
    """List + watch of one kind into a dict name -> object; see the module docstring.

    `Informer(store, VirtualMachine)` is an `Informer[VirtualMachine]`: its cache and handlers
    are typed by the model; `Informer(store, "VirtualMachine")` holds `AnyResource`s.
    Run it with `await informer.run()` (cancel the task to stop). Cancelling and running it
    again resumes from the last revision seen, keeping the cache.
    """

    @overload
    def __init__(
        self: Informer[AnyResource],
        store: Store,
        kind: str,
        resync_period: float | None = DEFAULT_RESYNC_PERIOD,
    ) -> None: ...
    @overload
    def __init__(
        self, store: Store, kind: type[R], resync_period: float | None = DEFAULT_RESYNC_PERIOD
    ) -> None: ...
    def __init__(
        self,
        store: Store,
        kind: str | type[R],
        resync_period: float | None = DEFAULT_RESYNC_PERIOD,
    ) -> None:
        kind = kind_of(kind)
        store.kind_prefix(kind)  # raises StoreError for an unknown kind
        if resync_period is not None and resync_period <= 0:
            raise ValueError(f"resync_period must be > 0 or None, got {resync_period}")
        self.store = store
        self.kind = kind
        self.resync_period = resync_period
        self.has_synced = asyncio.Event()
        self._cache: dict[str, R] = {}
        self._handlers: list[Callable[[EventType, R], None]] = []
        self._revision: int | None = None

    @property
    def revision(self) -> int | None:
        """The etcd revision the cache reflects (None before the first list)."""
        return self._revision

    def get(self, name: str) -> R | None:
        return self._cache.get(name)

    def list(self) -> list[R]:
        return list(self._cache.values())

    def __len__(self) -> int:
        return len(self._cache)

    def add_handler(self, handler: Callable[[EventType, R], None]) -> None:
        """Call `handler` for every change; a late handler first gets the cache as ADDED."""
        self._handlers.append(handler)
        if self.has_synced.is_set():
            for obj in list(self._cache.values()):
                self._call(handler, "ADDED", obj)

    def enqueue(self, queue: KeySink) -> None:
        """Add the name of every changed object to `queue`."""
        self.add_handler(lambda _type, obj: queue.add(obj.metadata.name))

    def enqueue_mapped(self, queue: KeySink, mapper: Callable[[R], Iterable[str]]) -> None:
        """Add the keys `mapper(obj)` returns for every changed object to `queue`.

        For example a ClusterNode change enqueues the VirtualMachines placed on that node. A
        resync maps nothing: the queue's own kind resyncs too, which hands the controller each
        of its objects once a period; mapping every watched object as well would reconcile them
        once more per watched kind.
        """

        def handler(event_type: EventType, obj: R) -> None:
            if event_type == "RESYNC":
                return
            for key in mapper(obj):
                queue.add(key)

        self.add_handler(handler)

    async def run(self) -> None:
        """List (unless resuming), then watch and resync until cancelled."""
        resync = None
        if self.resync_period is not None:
            resync = asyncio.create_task(self._resync_forever(self.resync_period))
        try:
            while True:
                if self._revision is None:
                    await self._relist()
                try:
                    await self._watch()
                except Compacted as error:
                    log.info("%s watch: %s; relisting", self.kind, error)
                    await self._relist()
        finally:
            if resync is not None:
                resync.cancel()

    async def _relist(self) -> None:
        """Read every object and deliver the difference from the cache; retry until it works."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StoreError),
            wait=wait_random_exponential(multiplier=LIST_RETRY_DELAY, max=LIST_RETRY_MAX_DELAY),
            before_sleep=self._log_list_failure,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                objects, revision = await self.store.list_objects(self.kind)
        # The store validated each object with the kind's model: an R.
        fresh = {obj.metadata.name: cast(R, obj) for obj in objects}
        for name, gone in list(self._cache.items()):
            if name not in fresh:
                del self._cache[name]
                self._deliver("DELETED", gone)
        for name, obj in fresh.items():
            old = self._cache.get(name)
            self._cache[name] = obj
            if old is None:
                self._deliver("ADDED", obj)
            elif old.metadata.resource_version != obj.metadata.resource_version:
                self._deliver("MODIFIED", obj)
        self._revision = revision
        if not self.has_synced.is_set():
            log.debug(
                "%s informer synced: %d objects at revision %d", self.kind, len(fresh), revision
            )
            self.has_synced.set()

    def _log_list_failure(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("listing %s failed, retrying: %s", self.kind, error)

    async def _watch(self) -> None:
        assert self._revision is not None
        listed = self._revision
        async for event in self.store.watch(self.kind, self._revision + 1):
            if event.revision <= listed:
                continue  # already reflected by a relist
            # Not `<= self._revision`: one transaction may change several objects, whose
            # events share its revision (a batch of placements, store_batch).
            self._revision = event.revision
            obj = cast(R, event.object)
            if event.type == "DELETED":
                self._cache.pop(obj.metadata.name, None)
            else:
                self._cache[obj.metadata.name] = obj
            self._deliver(event.type, obj)

    async def _resync_forever(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            if self.has_synced.is_set():
                for obj in list(self._cache.values()):
                    self._deliver("RESYNC", obj)

    def _deliver(self, event_type: EventType, obj: R) -> None:
        for handler in self._handlers:
            self._call(handler, event_type, obj)

    def _call(self, handler: Callable[[EventType, R], None], event_type: EventType, obj: R) -> None:
        try:
            handler(event_type, obj)
        except Exception:
            log.exception("%s handler failed on %s %s", self.kind, event_type, obj.metadata.name)


class SharedInformers:
    """One informer per kind, shared by every controller of a process."""

    def __init__(self, store: Store, resync_period: float | None = DEFAULT_RESYNC_PERIOD) -> None:
        self.store = store
        self.resync_period = resync_period
        self._informers: dict[str, Informer[Any]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @overload
    def informer(self, kind: type[R]) -> Informer[R]: ...
    @overload
    def informer(self, kind: str) -> Informer[AnyResource]: ...
    def informer(self, kind: str | type[AnyResource]) -> Informer[Any]:
        """The informer of `kind` (a name, or a model for a typed one), created on first use
        (and started if the others run)."""
        kind = kind_of(kind)
        informer = self._informers.get(kind)
        if informer is None:
            informer = Informer(self.store, kind, self.resync_period)
            self._informers[kind] = informer
            if self._tasks:
                self._start(informer)
        return informer

    @property
    def kinds(self) -> list[str]:
        return list(self._informers)

    def start(self) -> None:
        """Start every informer not running yet."""
        for informer in self._informers.values():
            if informer.kind not in self._tasks:
                self._start(informer)

    async def wait_for_sync(self) -> None:
        """Wait until every informer has listed once; raise if one of them died first."""
        synced = asyncio.gather(*(i.has_synced.wait() for i in self._informers.values()))
        try:
            waiting: set[asyncio.Future[Any]] = {synced, *self._tasks.values()}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            synced.cancel()
        self._raise_if_dead()

    def tasks(self) -> list[asyncio.Task[None]]:
        """The running informers' tasks."""
        return list(self._tasks.values())

    def synced(self) -> bool:
        return all(informer.has_synced.is_set() for informer in self._informers.values())

    def alive(self) -> bool:
        return all(not task.done() for task in self._tasks.values())

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)

    def _start(self, informer: Informer[Any]) -> None:
        self._tasks[informer.kind] = asyncio.create_task(
            informer.run(), name=f"informer {informer.kind}"
        )

    def _raise_if_dead(self) -> None:
        for kind, task in self._tasks.items():
            if task.done():
                error = task.exception() if not task.cancelled() else None
                raise RuntimeError(f"the {kind} informer stopped: {error!r}") from error
