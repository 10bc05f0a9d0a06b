"""The writes of the HA engine's actions, each guarded by the term's fencing token.

Node health and fence records, placements (a run of them in few transactions), restarts,
the Failed/DiskConflict/AdmissionHeld conditions, migrations and their acknowledgement,
Events, and the re-stamping of older terms' placements. A refused write deposes the term or
skips the rest of the step (`EtcdEnvironment`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

from controller.runtime import layout_keys, telemetry
from controller.runtime.store import Compare, Conflict, Delete, KeyCompare, NotFound, StoreError
from crds import AnyResource, ObjectMeta
from crds.clusternode import FenceRecord
from crds.event import ObjectReference
from crds.migration import VirtualMachineMigration, VirtualMachineMigrationSpec
from crds.virtualmachine import Placement

from .environment import (
    Action,
    ClearFenceAck,
    ClearMigration,
    Emit,
    FenceConfirmation,
    Migrate,
    Place,
    Restart,
    SetAdmissionHold,
    SetDiskConflict,
    SetFailed,
    SetNodeHealth,
)
from .production_core import (
    ACKNOWLEDGED,
    ADMISSION_HELD,
    DISK_CONFLICT,
    FAILED,
    RESTART_LIMIT,
    EnvironmentCore,
    precise_now,
)

log = logging.getLogger(__name__)

REQUESTED_BY = "kvmctl.io/requested-by"


def _migration_name(vm: str) -> str:
    suffix = secrets.token_hex(3)[:5]
    return f"{vm[:50].rstrip('-')}-ha-{suffix}"


class ActionWrites(EnvironmentCore):
    """The writes of `EtcdEnvironment.apply` and `apply_step`."""

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
            confirmed = precise_now() - timedelta(seconds=self.now() - action.fence.at)
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
            else Placement(node=action.node, token=self.term.token, since=precise_now())
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


def _restart(vm: Any) -> bool:
    """Record an in-place restart; dropping RestartLimitReached lets the agent start it."""
    vm.status.restarts = [*vm.status.restarts, precise_now()]
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
