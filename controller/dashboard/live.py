"""What moves the dashboard: etcd's watch, through the runtime's informers and key caches.

`LiveView` holds informers on ClusterNode, VirtualMachine and Event, and `PrefixCache`s on the
heartbeat keys and the controllers' leader key. Any change they see (a host lost: its heartbeat
key expires; a new leader: the leader key is created anew) publishes a new snapshot at once.

A heartbeat's age is not in any key: etcd counts it down in the lease, and a renewal writes
nothing a watch would see. So the leader record and the lease ages are read again (the same
reads as `kvmctl status`) with every snapshot and at least every `AGES_REFRESH` seconds; a
snapshot is published only when what it shows has changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from controller.dashboard.view import snapshot
from controller.runtime import layout_keys
from controller.runtime.etcd_health import heartbeat_ages, read_leader
from controller.runtime.informer import SharedInformers
from controller.runtime.leader_record import CONTROLLER_ELECTION, LeaderInfo, LeaderRecordError
from controller.runtime.prefix_cache import PrefixCache
from controller.runtime.store import Store, StoreError
from controller.runtime.tasks import cancel_and_wait
from crds import ClusterNode, Event, VirtualMachine

log = logging.getLogger(__name__)

COALESCE = 0.05
"""Seconds a change waits for the changes that come with it (a failover writes several keys)."""
AGES_REFRESH = 2.0
"""Seconds between reads of the heartbeat ages when nothing else changes."""


class LiveView:
    """The informers and key caches behind the dashboard, and the latest snapshot as JSON."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.informers = SharedInformers(store, resync_period=None)
        self._nodes = self.informers.informer(ClusterNode)
        self._vms = self.informers.informer(VirtualMachine)
        self._events = self.informers.informer(Event)
        self._heartbeats = PrefixCache(store, layout_keys.HEARTBEATS, self._key_changed)
        leader = PrefixCache(store, layout_keys.leader(CONTROLLER_ELECTION), self._key_changed)
        self._caches = (self._heartbeats, leader)
        self._leader: LeaderInfo | None = None
        self._ages: dict[str, float | None] = {}
        self.version = 0
        self.latest = ""
        self._shown = ""
        self._changed = asyncio.Event()
        self._published = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start the watches, wait for their first list, then publish on every change."""
        for informer in (self._nodes, self._vms, self._events):
            informer.add_handler(lambda _type, _obj: self._changed.set())
        self.informers.start()
        self._tasks = [
            asyncio.create_task(cache.run(), name=f"watch {cache.prefix}") for cache in self._caches
        ]
        await self.informers.wait_for_sync()
        await asyncio.gather(*(cache.synced.wait() for cache in self._caches))
        await self._read_keys()
        self._publish()
        self._tasks.append(asyncio.create_task(self._publish_changes(), name="dashboard publisher"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        await self.informers.stop()

    def alive(self) -> bool:
        running = bool(self._tasks) and not any(task.done() for task in self._tasks)
        return self.informers.alive() and running

    async def next(self, seen: int) -> tuple[int, str]:
        """The first snapshot newer than version `seen` (waits for one)."""
        async with self._published:
            await self._published.wait_for(lambda: self.version > seen)
            return self.version, self.latest

    def _key_changed(self, _name: str, _value: bytes | None) -> None:
        self._changed.set()

    def _document(self) -> dict[str, Any]:
        revisions = [i.revision or 0 for i in (self._nodes, self._vms, self._events)]
        objects = (self._nodes.list(), self._vms.list(), self._events.list())
        return snapshot(*objects, max(revisions), self._leader, self._ages)

    async def _read_keys(self) -> None:
        """The leader record and the ages of the heartbeats the cache holds; on a failure,
        the last ones read stay (the informers' objects are as old)."""
        try:
            self._leader = await read_leader(self._store)
            self._ages = await heartbeat_ages(self._store, sorted(self._heartbeats.values))
        except (StoreError, LeaderRecordError) as error:
            log.warning("dashboard: leader and heartbeats not read: %s", error)

    def _publish(self) -> bool:
        """Make the current document the latest, if it shows anything new."""
        document = self._document()
        shown = json.dumps({**document, "generatedAt": None}, sort_keys=True)
        if shown == self._shown:
            return False
        self._shown = shown
        self.latest = json.dumps(document, separators=(",", ":"))
        self.version += 1
        return True

    async def _publish_changes(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), AGES_REFRESH)
            await asyncio.sleep(COALESCE)
            self._changed.clear()
            await self._read_keys()
            if self._publish():
                async with self._published:
                    self._published.notify_all()
