"""A controller's registration with the manager, and the queue and workers that run it.

`Controller(name, kind, reconciler, ...)` names one primary kind (its work-queue keys are that
kind's object names) and what else enqueues those keys:
- `watches`: other kinds whose changes map to primary keys (`Watch(kind, mapper)`);
- `sources`: external event streams, like controller-runtime's `source.Channel` (libvirt
  lifecycle events, netlink link events): `Source(name, run)` where `run(sink)` adds keys to
  `sink` until cancelled; it runs while the controller runs, and its failure stops it;
- `predicate`: which primary objects the controller handles at all. A change of the primary kind
  is enqueued only if the changed object passes; a key from a watch or a source only if the
  cached object of that name exists and passes (except from a source marked `unfiltered`).

`on_not_ready` replaces the manager's default recording of a `TerminalError` or a `Blocked`
outcome (Ready=False on the object's status and a Warning event).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.runtime.informer import KeyMapper, KeySink, SharedInformers
from controller.runtime.reconcile import OnNotReady, Reconciler, run_workers
from controller.runtime.workqueue import WorkQueue
from crds import AnyResource

from . import telemetry

log = logging.getLogger(__name__)

Predicate = Callable[[AnyResource], bool]


@dataclass(frozen=True)
class Watch:
    """Another kind a controller depends on: each change enqueues `mapper(obj)`'s keys."""

    kind: str
    mapper: KeyMapper


@dataclass(frozen=True)
class Source:
    """An external stream of keys: `run(sink)` adds keys to `sink` until cancelled."""

    name: str
    run: Callable[[KeySink], Coroutine[Any, Any, None]]
    unfiltered: bool = False
    """Its keys bypass the predicate (they may name objects no longer cached: a domain whose
    VM is gone); the source filters what it adds itself."""


@dataclass(frozen=True)
class Controller:
    name: str
    kind: str
    reconciler: Reconciler
    workers: int = 1
    leader_only: bool = False
    watches: Sequence[Watch] = field(default_factory=tuple)
    predicate: Predicate | None = None
    sources: Sequence[Source] = field(default_factory=tuple)
    on_not_ready: OnNotReady | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"controller {self.name!r} needs at least one worker")

    def admits(self, obj: AnyResource) -> bool:
        return self.predicate is None or self.predicate(obj)


class ControllerRunner:
    """One controller's queue, workers and sources; a `KeySink` dropping keys while stopped."""

    def __init__(self, controller: Controller, informers: SharedInformers) -> None:
        self.controller = controller
        self.informer = informers.informer(controller.kind)
        self.queue: WorkQueue | None = None
        self.informer.add_handler(self._changed)
        for watch in controller.watches:
            informers.informer(watch.kind).enqueue_mapped(self, watch.mapper)

    def _changed(self, _type: str, obj: AnyResource) -> None:
        if self.queue is not None and self.controller.admits(obj):
            self.queue.add(obj.metadata.name)

    def add(self, key: str) -> None:
        """Enqueue `key` (from a watch or a source) if the controller handles that object."""
        if self.queue is None:
            return
        if self.controller.predicate is not None:
            obj = self.informer.get(key)
            if obj is None or not self.controller.predicate(obj):
                return
        self.queue.add(key)

    async def run(self, record: OnNotReady) -> None:
        """Enqueue every cached object it handles, then reconcile until cancelled."""
        controller = self.controller
        queue = WorkQueue()
        self.queue = queue
        telemetry.watch_queue(controller.name, queue)
        for obj in self.informer.list():
            if controller.admits(obj):
                queue.add(obj.metadata.name)
        reconciler = telemetry.TracedReconciler(
            controller.reconciler, controller.kind, controller.name
        )
        log.info("controller %s started with %d workers", controller.name, controller.workers)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    run_workers(queue, reconciler, controller.workers, record, record),
                    name=f"{controller.name} workers",
                )
                for source in controller.sources:
                    sink: KeySink = queue if source.unfiltered else self
                    group.create_task(source.run(sink), name=f"{controller.name} {source.name}")
        finally:
            self.queue = None
            queue.shutdown()
            telemetry.forget_queue(controller.name)
            log.info("controller %s stopped", controller.name)
