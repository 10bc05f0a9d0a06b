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

The parts: `production_world.py` builds the views of the `World`, `production_writes.py`
writes the actions, `production_fencing.py` runs the fence attempts, all over the state in
`production_core.py` (the caches overlaid with the term's own writes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from controller.runtime.store import StoreError
from controller.runtime.tasks import cancel_and_wait
from crds import ClusterNode, ClusterPolicy, VirtualMachine
from crds.clusterpolicy import POLICY_NAME
from crds.migration import VirtualMachineMigration

from .environment import Action, Emit, StartFence, VmView, World
from .place_runs import PlaceRun, place_runs
from .production_core import precise_now
from .production_fencing import FenceRuns
from .production_world import WorldViews
from .production_writes import ActionWrites

log = logging.getLogger(__name__)


class EtcdEnvironment(WorldViews, ActionWrites, FenceRuns):
    """`Environment` of the HA engine for one term; use as `async with`, see the docstring."""

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
        now = self._loop.time()
        if self._clock.update(now, precise_now()):
            self._vm_views.clear()  # their stored times convert anew
        nodes = [n for n in self._objects("ClusterNode") if isinstance(n, ClusterNode)]
        vms = [v for v in self._objects("VirtualMachine") if isinstance(v, VirtualMachine)]
        self.failovers.observe(vms, now)
        migrations: dict[str, list[VirtualMachineMigration]] = {}
        for migration in self._objects("VirtualMachineMigration"):
            if isinstance(migration, VirtualMachineMigration):
                migrations.setdefault(migration.spec.vm, []).append(migration)
        node_views = {n.metadata.name: self._node_view(n, vms, now, self._clock) for n in nodes}
        self._migration_names = {}
        self._vm_views = {
            vm.metadata.name: self._kept_vm_view(vm, migrations.get(vm.metadata.name, []), now)
            for vm in vms
            if vm.metadata.deletion_timestamp is None
        }
        vm_views = {name: view for name, (_, view) in self._vm_views.items()}
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

    def _kept_vm_view(
        self, vm: VirtualMachine, migrations: list[VirtualMachineMigration], now: float
    ) -> tuple[VirtualMachine, VmView]:
        """The view of `vm`, built again only when its object changed or it has migrations
        (whose views also note the migrations to acknowledge)."""
        kept = self._vm_views.get(vm.metadata.name)
        if kept is not None and kept[0] is vm and not migrations:
            return kept
        return vm, self._vm_view(vm, migrations, now, self._clock)

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
