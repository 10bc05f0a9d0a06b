"""The state one term's `EtcdEnvironment` keeps, shared by its parts (`production.py`).

The informer caches overlaid with the term's own writes until the informers catch up, the
conditions the environment reads and writes, and the wall clock it stamps.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from controller.migrations import Term
from controller.runtime import layout_keys
from controller.runtime.events import EventRecorder
from controller.runtime.informer import SharedInformers
from controller.runtime.peers import PeerTable
from controller.runtime.store import Store
from crds import AnyResource, VirtualMachine
from reconcilers.drivers.fence import FenceRunner

from .environment import FenceResult, HaTimings, VmView, World
from .failover_clock import FailoverClock
from .storage_loss import FirstSeen
from .world_keys import WorldKeys

KINDS = ("ClusterNode", "VirtualMachine", "VirtualMachineMigration", "ClusterPolicy")
ACKNOWLEDGED = "HaAcknowledged"
"""Condition on a finished VirtualMachineMigration the HA engine has taken into account."""
FAILED = "Failed"
"""Condition on a VirtualMachine the restart policy gave up on."""
RESTART_LIMIT = "RestartLimitReached"
DISK_CONFLICT = "DiskConflict"
"""Condition on a VirtualMachine left Pending because another VM holds one of its disks."""
ADMISSION_HELD = "AdmissionHeld"
"""Condition on a VirtualMachine left Pending because starting it breaks admission control."""


CLOCK_SLACK = 0.05
"""Seconds the wall clock may drift from the loop's before stored times convert anew."""


def precise_now() -> datetime:
    """Wall-clock time with microseconds (crds.meta.now drops them)."""
    return datetime.now(UTC)


class WallToLoop:
    """Stored wall-clock times on the event loop's clock, with one offset until the two clocks
    drift apart by more than `CLOCK_SLACK` (the wall clock was stepped): a stored time then
    converts to the same value at every observation, so the views built from it compare equal
    and can be kept (`EtcdEnvironment.observe`)."""

    def __init__(self) -> None:
        self._offset: float | None = None

    def update(self, now: float, wall: datetime) -> bool:
        """Take both clocks at an observation; True when the offset moved."""
        offset = wall.timestamp() - now
        if self._offset is not None and abs(offset - self._offset) <= CLOCK_SLACK:
            return False
        self._offset = offset
        return True

    def __call__(self, moment: datetime) -> float:
        assert self._offset is not None, "update() comes first"
        return moment.timestamp() - self._offset


class EnvironmentCore:
    """What every part of the environment of one term shares; see `EtcdEnvironment`."""

    def __init__(
        self,
        store: Store,
        informers: SharedInformers,
        recorder: EventRecorder,
        term: Term,
        changed: asyncio.Event,
        timings: HaTimings | None = None,
        fence_runner: FenceRunner | None = None,
        peers: PeerTable | None = None,
        keys: WorldKeys | None = None,
    ) -> None:
        """`changed` is set by the caller's informer handlers on every object change;
        `peers` is where the direct heartbeats are heard (None: lease-based detection only);
        `keys` the controller's warm `WorldKeys` (None: this term watches its own)."""
        self.store = store
        self.recorder = recorder
        self.term = term
        self.timings = timings or HaTimings()
        self.fence_runner = fence_runner or FenceRunner()
        self._informers = {kind: informers.informer(kind) for kind in KINDS}
        self._changed = changed
        self._loop = asyncio.get_running_loop()
        self._storage_seen = FirstSeen()
        self.failovers = FailoverClock()
        self._fenced_how: dict[str, str] = {}
        """How each node this term fenced was fenced (its VMs may be placed in the same step)."""
        self._peers = peers
        self._ack_seen: dict[str, float] = {}
        self._crashes: dict[str, tuple[datetime | None, float]] = {}
        self._clock = WallToLoop()
        self._vm_views: dict[str, tuple[VirtualMachine, VmView]] = {}
        """The view built of each VM object without migrations, kept while the object is."""
        self._own_keys = keys is None
        self.keys = WorldKeys(store, changed) if keys is None else keys
        self._tasks: list[asyncio.Task[None]] = []
        self._fence_tasks: set[asyncio.Task[None]] = set()
        self._fence_results: list[FenceResult] = []
        self._overlay: dict[tuple[str, str], AnyResource] = {}
        self._created: set[tuple[str, str]] = set()
        self._world: World | None = None
        self._migration_names: dict[str, list[str]] = {}
        self._skip_writes = False
        self._restamped = False
        self.deposed = False

    def now(self) -> float:
        return self._loop.time()

    def _key(self, relative: str) -> str:
        return layout_keys.absolute(self.store.prefix, relative)

    def _objects(self, kind: str) -> list[AnyResource]:
        """The cached objects of `kind`, with our own newer writes in place of stale copies."""
        objects = {obj.metadata.name: obj for obj in self._informers[kind].list()}
        for (overlay_kind, name), written in list(self._overlay.items()):
            if overlay_kind != kind:
                continue
            cached = objects.get(name)
            if cached is None:
                if (kind, name) in self._created:  # created by us, not in the cache yet
                    objects[name] = written
                else:  # deleted since we wrote it
                    del self._overlay[(kind, name)]
                continue
            self._created.discard((kind, name))
            cached_version = int(cached.metadata.resource_version or 0)
            written_version = int(written.metadata.resource_version or 0)
            if cached_version >= written_version or cached.metadata.uid != written.metadata.uid:
                del self._overlay[(kind, name)]
            else:
                objects[name] = written
        return sorted(objects.values(), key=lambda obj: obj.metadata.name)
