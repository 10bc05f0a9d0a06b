"""The HA engine's Environment over etcd: objects, heartbeat leases, requests, fence agents.

One `EtcdEnvironment` serves one term of leadership (`term`: the fencing token and its guard).

observe() builds the `World` from the informer caches (ClusterNode, VirtualMachine,
VirtualMachineMigration), the heartbeat keys (`{prefix}/heartbeats/{node}`, bound to the agents'
leases), the operator requests and agent reports (`controller/ha/requests.py`) and the results
of fence attempts finished since the last call. Times are the event loop's monotonic clock;
stored wall-clock times are converted at each observation. The heartbeat keys, requests and
reports come from the controller's `WorldKeys` (`controller/ha/world_keys.py`), warm on a standby
too; a heartbeat key missing since their first sync counts as lost since then (later than the
truth, hence safer).

After its first step a term stamps its token on the placements of older terms (agents start
nothing for a placement of another term). apply() writes what the engine decided, every object
write guarded by the term's token:
node health and fence confirmation (`ClusterNode.status.health`, `status.fence`), placements
(`VirtualMachine.status.placement`, with the token), restarts, relocations, the `Failed`
and `DiskConflict` conditions; `Migrate` creates a VirtualMachineMigration (the migration
controller and the source agent carry it out); `ClearMigration` marks the VM's finished
migrations `HaAcknowledged`; `StartFence` runs the method's devices with
`FenceRunner.power_off_and_confirm` in a task (secrets resolved from the Secrets meant for that
node by `controller/fencing.py`, never
logged); `Emit` records an Event. apply_step() does the same for a whole step, writing each
run of placements in as few transactions as fit (`place_runs`, `Store.patch_status_many`).

A guarded write that fails because the term is over marks the environment deposed: nothing more
is applied and `wait()` returns False. Any other failed write skips the remaining writes of the
step (their order matters: a node is written Fenced before anything is recovered from it); the
next observation decides again. Our own writes are overlaid on the caches until the informers
catch up, so the next step never acts on the state from before them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from controller.fencing import run_method
from controller.migrations import Term
from controller.runtime import layout_keys, telemetry
from controller.runtime.events import EventRecorder
from controller.runtime.informer import SharedInformers
from controller.runtime.peers import PeerTable
from controller.runtime.store import (
    Compare,
    Conflict,
    Delete,
    KeyCompare,
    NotFound,
    Store,
    StoreError,
)
from controller.runtime.tasks import cancel_and_wait
from crds import AnyResource, ClusterNode, ClusterPolicy, ObjectMeta, VirtualMachine
from crds.clusternode import FenceRecord
from crds.clusterpolicy import POLICY_NAME
from crds.event import ObjectReference
from crds.migration import PLACEMENT_SWITCHED, VirtualMachineMigration, VirtualMachineMigrationSpec
from crds.virtualmachine import Placement
from reconcilers.drivers.fence import FenceRunner
from reconcilers.drivers.fence_policy import FenceConfigError

from . import requests
from .environment import (
    Action,
    ClearFenceAck,
    ClearMigration,
    Emit,
    FenceConfirmation,
    FenceResult,
    HaTimings,
    Migrate,
    MigrationView,
    NodeView,
    Place,
    Restart,
    SetAdmissionHold,
    SetDiskConflict,
    SetFailed,
    SetNodeHealth,
    StartFence,
    VmState,
    VmView,
    World,
)
from .failover_clock import FailoverClock
from .place_runs import PlaceRun, place_runs
from .storage_loss import FirstSeen
from .world_keys import WorldKeys

log = logging.getLogger(__name__)

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
REQUESTED_BY = "kvmctl.io/requested-by"
ACTIVE_STATES = ("Running", "Paused", "Migrating")
"""VM states (status.state) in which the reporting node has a qemu process for it."""
STATES: dict[str, VmState] = {
    "Running": "Running",
    "Paused": "Running",
    "Stopped": "Stopped",
    "Crashed": "Crashed",
    "Migrating": "Migrating",
    "Unknown": "Unknown",
}


ToMonotonic = Callable[[datetime], float]


def _precise_now() -> datetime:
    """Wall-clock time with microseconds (crds.meta.now drops them)."""
    return datetime.now(UTC)


def _migration_name(vm: str) -> str:
    suffix = secrets.token_hex(3)[:5]
    return f"{vm[:50].rstrip('-')}-ha-{suffix}"


class EtcdEnvironment:
    """`Environment` of the HA engine for one term; use as `async with`, see the docstring."""

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

    async def __aenter__(self) -> EtcdEnvironment:
        if self._own_keys:
            self._tasks.append(asyncio.create_task(self.keys.run(), name="HA keys"))
        try:
            await self.keys.wait_for_sync()
        except BaseException:
            await self._stop_tasks()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        """Cancel the watches and fence runs (`cancel_and_wait`: again any that swallowed it)."""
        tasks = {*self._tasks, *self._fence_tasks}
        self._tasks.clear()
        await cancel_and_wait(tasks)

    # Change notifications --------------------------------------------------------------------

    def _heard_at(self, node: str) -> float | None:
        """The last direct heartbeat from `node`, if it came in the agent's current lease."""
        heard = None if self._peers is None else self._peers.heard_at(node)
        if heard is None or heard < self.keys.session_at.get(node, heard):
            return None
        return heard

    # Environment -----------------------------------------------------------------------------

    def now(self) -> float:
        return self._loop.time()

    async def wait(self, until: float) -> bool:
        if not self.deposed and not self._restamped:
            self._restamped = await self._restamp()
        if self.deposed:
            return False
        try:
            async with asyncio.timeout_at(until):
                await self._changed.wait()
        except TimeoutError:
            pass
        return not self.deposed

    async def observe(self) -> World:
        self._changed.clear()
        self._skip_writes = False
        now, wall = self._loop.time(), _precise_now()

        def mono(moment: datetime) -> float:
            return now - (wall - moment).total_seconds()

        nodes = [n for n in self._objects("ClusterNode") if isinstance(n, ClusterNode)]
        vms = [v for v in self._objects("VirtualMachine") if isinstance(v, VirtualMachine)]
        self.failovers.observe(vms, now)
        migrations = [
            m
            for m in self._objects("VirtualMachineMigration")
            if isinstance(m, VirtualMachineMigration)
        ]
        node_views = {node.metadata.name: self._node_view(node, vms, now, mono) for node in nodes}
        vm_views: dict[str, VmView] = {}
        self._migration_names = {}
        for vm in vms:
            if vm.metadata.deletion_timestamp is not None:
                continue
            mine = [m for m in migrations if m.spec.vm == vm.metadata.name]
            vm_views[vm.metadata.name] = self._vm_view(vm, mine, now, mono)
        results, self._fence_results = tuple(self._fence_results), []
        policy = self._informers["ClusterPolicy"].get(POLICY_NAME)
        self._world = World(
            now=now,
            nodes=node_views,
            vms=vm_views,
            fence_results=results,
            admission=policy.spec.admission if isinstance(policy, ClusterPolicy) else None,
        )
        return self._world

    async def apply(self, action: Action) -> None:
        if self.deposed:
            return
        if isinstance(action, Emit):
            await self._emit(action)
        elif isinstance(action, StartFence):
            task = asyncio.create_task(self._fence(action), name=f"fence {action.node}")
            self._fence_tasks.add(task)
            task.add_done_callback(self._fence_tasks.discard)
        elif self._skip_writes:
            log.info("skipped %s: an earlier write of this step failed", action)
        else:
            try:
                await self._write(action)
            except StoreError as error:
                await self._write_failed(action, error)

    async def apply_step(self, actions: Sequence[Action]) -> None:
        """`apply` each action in order, but each run of placements at once (`place_runs`):
        written in as few guarded transactions as fit, its Events recorded after."""
        for item in place_runs(actions):
            if not isinstance(item, PlaceRun):
                await self.apply(item)
                continue
            if self._skip_writes and not self.deposed:
                for place in item.places:
                    log.info("skipped %s: an earlier write of this step failed", place)
            elif not self.deposed:
                await self._place_all(item.places)
            await self._emit_all(item.emits)

    async def _write_failed(self, action: Action, error: StoreError) -> None:
        """A write refused: deposed (the guard), or the rest of the step is skipped."""
        if isinstance(error, NotFound):
            log.info("%s: %s", action, error)
        elif isinstance(error, Conflict):
            if not await self._still_leading():
                log.error("deposed: %s was refused by the fencing token guard", action)
                self.deposed = True
                return
            log.warning("%s conflicted (%s); deciding again", action, error)
            self._skip_writes = True
        else:
            log.warning("%s failed (%s); deciding again", action, error)
            self._skip_writes = True

    # Building the world ----------------------------------------------------------------------

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

    def _node_view(
        self, node: ClusterNode, vms: list[VirtualMachine], now: float, mono: ToMonotonic
    ) -> NodeView:
        name = node.metadata.name
        status = node.status
        alive = name in self.keys.heartbeats.values
        fence: FenceConfirmation | None = None
        if status.fence is not None and status.fence.how is not None:
            at = now if status.fence.confirmed_at is None else mono(status.fence.confirmed_at)
            fence = FenceConfirmation(status.fence.how, at, status.fence.method)
        report = self._report(name)
        if report is not None:
            domains = report.domains
        else:  # no agent report: what the VMs' statuses say runs there
            domains = frozenset(
                vm.metadata.name
                for vm in vms
                if vm.status.node == name and vm.status.state in ACTIVE_STATES
            )
        clean_since: float | None = None
        if (
            report is not None
            and fence is not None
            and status.fence is not None
            and report.cleaned_fence is not None
            and report.cleaned_fence == status.fence.confirmed_at
        ):
            clean_since = fence.at
        drain = self._drain(name)
        spec = node.spec
        if drain is not None and not spec.cordoned:
            spec = spec.model_copy(update={"cordoned": True})
        capacity = spec.capacity or status.capacity
        return NodeView(
            name=name,
            spec=spec,
            health=status.health,
            fence=fence,
            lease_alive=alive,
            lease_lost_at=None if alive else self.keys.lease_lost_at(name),
            clean_since=clean_since,
            fence_ack_at=self._fence_ack_at(name),
            domains=domains,
            cpus=capacity.cpus if capacity else None,
            memory_mib=capacity.memory_mib if capacity else None,
            drain=None if drain is None else drain.mode,
            heard_at=self._heard_at(name),
            storage_lost=self._storage_seen.seen(
                name, [lost.path for lost in status.storage_lost], now
            ),
        )

    def _key(self, relative: str) -> str:
        return layout_keys.absolute(self.store.prefix, relative)

    def _report(self, node: str) -> requests.NodeReport | None:
        value = self.keys.reports.values.get(node)
        if value is None:
            return None
        try:
            return requests.parse_report(self._key(layout_keys.report(node)), value)
        except requests.RequestFormatError as error:
            log.error("ignoring the report of %s: %s", node, error)
            return None

    def _drain(self, node: str) -> requests.DrainRequest | None:
        value = self.keys.drains.values.get(node)
        if value is None:
            return None
        try:
            return requests.parse_drain(self._key(layout_keys.drain(node)), value)
        except requests.RequestFormatError as error:
            log.error("ignoring the drain request of %s: %s", node, error)
            return None

    def _fence_ack_at(self, node: str) -> float | None:
        """When this term first saw the pending ack of `node` (None if there is none)."""
        if node not in self.keys.fence_acks.values:
            self._ack_seen.pop(node, None)
            return None
        return self._ack_seen.setdefault(node, self._loop.time())

    def _vm_view(
        self,
        vm: VirtualMachine,
        migrations: list[VirtualMachineMigration],
        now: float,
        mono: ToMonotonic,
    ) -> VmView:
        name = vm.metadata.name
        status = vm.status
        placement = None if status.placement is None else status.placement.node
        state: VmState = "Stopped"
        if placement is not None and status.node == placement:
            state = STATES[status.state]
        crashed_at: float | None = None
        if state == "Crashed":
            limit = status.condition(RESTART_LIMIT)
            since = None if limit is None else limit.last_transition_time
            seen = self._crashes.get(name)
            if seen is None or seen[0] != since:
                seen = (since, now)
                self._crashes[name] = seen
            crashed_at = seen[1]
        else:
            self._crashes.pop(name, None)
        failed = status.condition(FAILED)
        conflict = status.condition(DISK_CONFLICT)
        held = status.condition(ADMISSION_HELD)
        return VmView(
            name=name,
            spec=vm.spec,
            placement=placement,
            state=state,
            crashed_at=crashed_at,
            restarts=tuple(mono(moment) for moment in status.restarts),
            relocations=status.relocations,
            failed=failed is not None and failed.status == "True",
            migration=self._migration_view(vm, migrations),
            disk_conflict=None if conflict is None else conflict.message,
            admission_hold=None if held is None else held.message,
        )

    def _migration_view(
        self, vm: VirtualMachine, migrations: list[VirtualMachineMigration]
    ) -> MigrationView | None:
        """The VM's migration as the engine sees it: in flight, or finished and not yet
        acknowledged (the newest such)."""
        placement = None if vm.status.placement is None else vm.status.placement.node
        finished: list[tuple[VirtualMachineMigration, MigrationView]] = []
        for migration in migrations:
            status = migration.status
            target = migration.spec.target_node
            source = status.source_node or placement or ""
            switched = status.condition(PLACEMENT_SWITCHED)
            if status.phase in ("Pending", "Scheduled", "Running") or (
                status.phase == "Succeeded" and switched is None
            ):
                # The migration controller validates and switches placement; until it is done
                # the engine counts both ends as possibly running the VM.
                return MigrationView(source, target, "Running", status.message)
            if status.condition(ACKNOWLEDGED) is not None:
                continue
            if status.phase == "Failed":
                finished.append(
                    (migration, MigrationView(source, target, "Failed", status.message))
                )
            elif switched is not None and switched.status == "True" and placement == target:
                finished.append((migration, MigrationView(source, target, "Succeeded")))
        if not finished:
            return None
        self._migration_names[vm.metadata.name] = [m.metadata.name for m, _ in finished]
        newest = max(
            finished,
            key=lambda item: (
                item[0].metadata.creation_timestamp or datetime.min.replace(tzinfo=UTC),
                item[0].metadata.name,
            ),
        )
        return newest[1]

    # Writes ----------------------------------------------------------------------------------

    async def _still_leading(self) -> bool:
        try:
            ok, _ = await self.store.keys.transaction(list(self.term.guard))
        except StoreError:
            return True  # cannot tell: the next write tries again
        return ok

    def _guard(self) -> list[Compare]:
        return list(self.term.guard)

    async def _restamp(self) -> bool:
        """Stamp this term's token on placements of older terms; True once all are.

        Agents start nothing for a placement whose token is not the current term's, so a new
        leader re-stamps the placements it keeps. It does so after its first step, which
        placed anew what had to be recovered.
        """
        token = self.term.token

        def stamp(vm: Any) -> bool:
            placement = vm.status.placement
            if placement is None or placement.token == token:
                return False
            vm.status.placement = placement.model_copy(update={"token": token})
            return True

        done = True
        for vm in self._objects("VirtualMachine"):
            placement = vm.status.placement
            if placement is None or placement.token == token:
                continue
            try:
                await self._patch("VirtualMachine", vm.metadata.name, stamp)
            except NotFound:
                continue
            except StoreError as error:
                if isinstance(error, Conflict) and not await self._still_leading():
                    self.deposed = True
                    return False
                log.warning("re-stamping %s failed (%s); trying again", vm.metadata.name, error)
                done = False
        return done

    async def _patch(
        self, kind: str, name: str, mutate: Any, extra: Sequence[Compare] = ()
    ) -> None:
        written = await self.store.patch_status(kind, name, mutate, guard=[*self._guard(), *extra])
        self._overlay[(kind, name)] = written

    async def _write(self, action: Action) -> None:
        if isinstance(action, SetNodeHealth):
            await self._set_health(action)
        elif isinstance(action, ClearFenceAck):
            await self._clear_fence_ack(action.node)
        elif isinstance(action, Place):
            await self._place(action)
        elif isinstance(action, Restart):
            await self._patch("VirtualMachine", action.vm, _restart)
        elif isinstance(action, SetFailed):
            await self._patch(
                "VirtualMachine", action.vm, lambda vm: _set_failed(vm, action.failed)
            )
        elif isinstance(action, SetDiskConflict):
            await self._patch(
                "VirtualMachine",
                action.vm,
                lambda vm: _set_hold(vm, DISK_CONFLICT, "DiskInUse", action.message),
            )
        elif isinstance(action, SetAdmissionHold):
            await self._patch(
                "VirtualMachine",
                action.vm,
                lambda vm: _set_hold(
                    vm, ADMISSION_HELD, "InsufficientFailoverCapacity", action.message
                ),
            )
        elif isinstance(action, Migrate):
            await self._migrate(action)
        elif isinstance(action, ClearMigration):
            await self._acknowledge(self._migration_names.pop(action.vm, []))

    async def record_takeover_fence(
        self, node: str, method: str, confirmed_at: float, session_revision: int
    ) -> bool:
        """Record the power fence a standby confirmed before taking over (at `confirmed_at` on
        the loop's clock), unless an agent session started on the node since: the write also
        compares the session trace's mod_revision with `session_revision` (0: no trace)."""
        unchanged = KeyCompare.modified(self._key(layout_keys.session(node)), session_revision)
        confirmation = FenceConfirmation("PowerOff", confirmed_at, method)
        try:
            await self._set_health(SetNodeHealth(node, "Fenced", confirmation), [unchanged])
        except (Conflict, NotFound, StoreError) as error:
            log.warning("the takeover's fence of %s is not recorded (%s)", node, error)
            return False
        return True

    async def _set_health(self, action: SetNodeHealth, extra: list[Compare] | None = None) -> None:
        record: FenceRecord | None = None
        self._fenced_how.pop(action.node, None)
        if action.fence is not None:
            self._fenced_how[action.node] = action.fence.how
            confirmed = _precise_now() - timedelta(seconds=self.now() - action.fence.at)
            record = FenceRecord(
                method=action.fence.method,
                confirmed_at=confirmed,
                how=action.fence.how,
                token=self.term.token,
            )

        def mutate(node: Any) -> bool:
            if (node.status.health, node.status.fence) == (action.health, record):
                return False
            node.status.health = action.health
            node.status.fence = record
            return True

        await self._patch("ClusterNode", action.node, mutate, extra or [])

    async def _clear_fence_ack(self, node: str) -> None:
        key = self._key(layout_keys.fence_ack(node))
        ok, _ = await self.store.keys.transaction(self._guard(), [Delete(key)], action="delete")
        if not ok:
            raise Conflict(f"clearing the fence ack of {node} refused: guard failed")
        self.keys.fence_acks.forget(node)
        self._ack_seen.pop(node, None)

    async def _place(self, action: Place) -> None:
        written = await self.store.patch_status(
            "VirtualMachine", action.vm, self._placement(action), guard=self._guard()
        )
        self._placed(action, written)

    async def _place_all(self, places: list[Place]) -> None:
        """The placements of one run, written together; each failure as `apply` would."""
        mutations = {place.vm: self._placement(place) for place in places}
        result = await self.store.patch_status_many(
            "VirtualMachine", mutations, guard=self._guard()
        )
        for place in places:
            if place.vm in result.written:
                self._placed(place, result.written[place.vm])
        for place in places:
            error = result.failed.get(place.vm)
            if error is not None and not self.deposed:
                await self._write_failed(place, error)

    async def _emit_all(self, emits: list[Emit]) -> None:
        """Record Events at once, in order for each object (they aggregate by reason)."""
        by_object: dict[tuple[str, str], list[Emit]] = {}
        for emit in emits:
            by_object.setdefault((emit.kind, emit.name), []).append(emit)

        async def record(events: list[Emit]) -> None:
            for emit in events:
                if not self.deposed:
                    await self._emit(emit)

        await asyncio.gather(*(record(events) for events in by_object.values()))

    def _placement(self, action: Place) -> Callable[[Any], bool]:
        """The status change of `action` (nothing when the node does not change)."""
        placement = (
            None
            if action.node is None
            else Placement(node=action.node, token=self.term.token, since=_precise_now())
        )

        def mutate(vm: Any) -> bool:
            status = vm.status
            current = None if status.placement is None else status.placement.node
            if current == action.node and not action.relocation:
                return False
            if current != action.node:
                status.node = None  # its agent's last report was about another placement
            status.placement = placement
            if action.relocation:
                status.relocations += 1
                status.restarts = []
                status.drop_condition(RESTART_LIMIT)
            return True

        return mutate

    def _placed(self, action: Place, written: AnyResource) -> None:
        """Overlay the written VM; a VM moved off a fenced node starts a failover's clock."""
        self._overlay[("VirtualMachine", action.vm)] = written
        world = self._world
        old = None
        if world is not None and action.vm in world.vms:
            old = world.vms[action.vm].placement
        if (
            world is not None
            and old is not None
            and action.node is not None
            and old != action.node
            and old in world.nodes
            and (world.nodes[old].health == "Fenced" or old in self._fenced_how)
        ):
            telemetry.count_failover(old)
            lost = world.nodes[old]
            lost_at = lost.lease_lost_at or world.now
            how = lost.fence.how if lost.fence is not None else self._fenced_how[old]
            self.failovers.started(action.vm, action.node, lost_at, how)

    async def _migrate(self, action: Migrate) -> None:
        request = VirtualMachineMigration(
            metadata=ObjectMeta(
                name=_migration_name(action.vm), labels={REQUESTED_BY: "ha-controller"}
            ),
            spec=VirtualMachineMigrationSpec(vm=action.vm, target_node=action.target),
        )
        created = await self.store.create(request, guard=self._guard())
        key = ("VirtualMachineMigration", created.metadata.name)
        self._overlay[key] = created
        self._created.add(key)

    async def _acknowledge(self, names: Iterable[str]) -> None:
        def mark(migration: Any) -> bool:
            return bool(
                migration.status.set_condition(
                    ACKNOWLEDGED, "True", "Observed", "taken into account by the HA controller"
                )
            )

        for name in names:
            await self._patch("VirtualMachineMigration", name, mark)

    async def _emit(self, action: Emit) -> None:
        involved = ObjectReference(kind=action.kind, name=action.name)
        await self.recorder.record(involved, action.type, action.reason, "%s", action.message)

    # Fencing ---------------------------------------------------------------------------------

    async def _fence(self, action: StartFence) -> None:
        ok, message = False, ""
        try:
            ok, message = await self._run_method(action.node, action.method)
        except (FenceConfigError, StoreError, OSError) as error:
            message = str(error)
        log.info(
            "fence attempt %d of %s, method %s: %s (%s)",
            action.attempt,
            action.node,
            action.method,
            "confirmed off" if ok else "failed",
            message,
        )
        telemetry.count_fence(action.node, action.method, ok)
        self._fence_results.append(
            FenceResult(action.attempt, action.node, action.method, ok, message)
        )
        self._changed.set()

    async def _run_method(self, node_name: str, method_name: str) -> tuple[bool, str]:
        node = self._informers["ClusterNode"].get(node_name)
        if not isinstance(node, ClusterNode):
            return False, f"ClusterNode {node_name} not found"
        return await run_method(self.store, self.fence_runner, node, method_name)


def _restart(vm: Any) -> bool:
    """Record an in-place restart; dropping RestartLimitReached lets the agent start it."""
    vm.status.restarts = [*vm.status.restarts, _precise_now()]
    vm.status.drop_condition(RESTART_LIMIT)
    return True


def _set_failed(vm: Any, failed: bool) -> bool:
    status = vm.status
    if failed:
        return bool(
            status.set_condition(
                FAILED,
                "True",
                "RestartPolicyExhausted",
                "crashed past its restarts and relocations; set runState to stopped, then "
                "started, to try again",
            )
        )
    status.drop_condition(FAILED)
    status.drop_condition(RESTART_LIMIT)
    status.restarts = []
    status.relocations = 0
    return True


def _set_hold(vm: Any, condition: str, reason: str, message: str | None) -> bool:
    """Set (message) or drop (None) a condition saying why the VM is left Pending."""
    status = vm.status
    if message is not None:
        return bool(status.set_condition(condition, "True", reason, message))
    return bool(status.drop_condition(condition))
