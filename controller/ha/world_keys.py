"""The keys the HA engine reads besides objects, kept warm on every controller, leader or not.

Heartbeat keys (`heartbeats/<node>`, bound to the agents' leases), fence acks, drain requests and
agent reports (`controller/ha/requests.py`), each in a `PrefixCache`. A standby controller keeps
them as the leader does (the informers keep the objects), so the term it wins starts with the
world already in memory instead of listing and watching it first.

It also keeps what only a witness knows: when each heartbeat key disappeared (`lost_at`) and when
a node's current agent session began (`session_at`). A key missing since the first sync counts as
lost since that sync: later than the truth, hence safer (a self-fencing node's recovery waits
for its loss plus `recovery_grace`).
"""

from __future__ import annotations

import asyncio

from controller.runtime import layout_keys
from controller.runtime.prefix_cache import PrefixCache
from controller.runtime.store import Store
from controller.runtime.tasks import cancel_and_wait


class WorldKeys:
    """Run `run()` for the life of the controller; `changed` is set on every change."""

    def __init__(self, store: Store, changed: asyncio.Event) -> None:
        self._changed = changed
        self.running = False
        """True while run() runs: a term may use these caches instead of its own."""
        self.synced_at: float | None = None
        self._synced = asyncio.Event()
        self.lost_at: dict[str, float] = {}
        self.session_at: dict[str, float] = {}
        self.heartbeats = PrefixCache(store, layout_keys.HEARTBEATS, self._heartbeat_changed)
        self.fence_acks = PrefixCache(store, layout_keys.FENCE_ACKS, self._key_changed)
        self.drains = PrefixCache(store, layout_keys.DRAINS, self._key_changed)
        self.reports = PrefixCache(store, layout_keys.REPORTS, self._key_changed)
        self._caches = (self.heartbeats, self.fence_acks, self.drains, self.reports)

    async def run(self) -> None:
        # Tasks stopped by `cancel_and_wait`, not a TaskGroup: a TaskGroup cancels its tasks
        # once, and a watch that swallowed that cancel (see runtime/tasks.py) would hang it.
        self.running = True
        tasks = [asyncio.create_task(c.run(), name=f"watch {c.prefix}") for c in self._caches]
        try:
            await asyncio.gather(*(cache.synced.wait() for cache in self._caches))
            self.synced_at = _now()
            self._synced.set()
            await asyncio.gather(*tasks)  # they run until cancelled
        finally:
            self.running = False
            await cancel_and_wait(tasks)

    async def wait_for_sync(self) -> float:
        """When every cache had first synced (run() must be running)."""
        await self._synced.wait()
        assert self.synced_at is not None
        return self.synced_at

    def lease_lost_at(self, node: str) -> float:
        """When `node`'s heartbeat key was seen gone (for a node whose key is missing)."""
        return self.lost_at.get(node, self.synced_at or _now())

    def _heartbeat_changed(self, node: str, value: bytes | None) -> None:
        if value is None:
            self.lost_at[node] = _now()
        else:
            self.lost_at.pop(node, None)
            if self.heartbeats.synced.is_set():  # a new lease: a new agent session
                self.session_at[node] = _now()
        self._changed.set()

    def _key_changed(self, _name: str, _value: bytes | None) -> None:
        self._changed.set()


def _now() -> float:
    return asyncio.get_running_loop().time()
