"""The HA decision engine: node health, fencing, recovery, restart policy, drain and failback.

`Engine.step(world)` reads one snapshot and returns the actions to take; `run(engine, env)`
loops it over an `Environment`. The engine keeps only transient state (fence attempts in flight,
retry backoff, which warnings it already reported): everything that matters for safety is in the
world (node health and fence confirmation, placements), so a new leader carries on from the
stored objects. docs/ha.md states the rules and why they are safe.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

from controller.exclusive import Claims, Clash, KnownResources
from crds.clusternode import NodeHealth

from .admission import check, plan
from .environment import (
    Action,
    ClearFenceAck,
    ClearMigration,
    Emit,
    Environment,
    EventType,
    FenceConfirmation,
    FenceHow,
    HaTimings,
    Migrate,
    NodeView,
    Place,
    Restart,
    SetAdmissionHold,
    SetDiskConflict,
    SetFailed,
    SetNodeHealth,
    StartFence,
    VmView,
    World,
    power_fenced,
    silent_nodes,
)
from .placement import DiskHolders, Usage, choose_node, domain_rank, ineligibility
from .storage_loss import StorageLossWatch

DEFAULT_PERIOD = 0.5
"""The production loop looks again at least this often even when nothing changed."""


@dataclass
class _Fencing:
    """Progress of fencing one node: which method is next, what is in flight, the backoff."""

    backoff: float
    method_index: int = 0
    attempt: int | None = None
    retry_at: float = 0.0
    announced: bool = False


class Engine:
    def __init__(self, timings: HaTimings | None = None, wake_for_silence: bool = True) -> None:
        """`wake_for_silence`: set a timer for when each heard node would turn silent (off
        in the simulator, which wakes the engine itself when the silent nodes change)."""
        self.timings = timings or HaTimings()
        self._wake_for_silence = wake_for_silence
        self._known = KnownResources(Claims(macs=False))
        self._fencing: dict[str, _Fencing] = {}
        self._next_attempt = 1
        self._reported: dict[str, tuple[str, str]] = {}
        self._recovering: set[str] = set()
        self._drained: set[str] = set()
        self._storage = StorageLossWatch()
        self.next_wakeup: float | None = None
        """The earliest time a timer of the engine fires (self-fence grace, fence retry)."""

    # The step ---------------------------------------------------------------------------------

    def step(self, world: World) -> list[Action]:
        """Decide what to do about `world`; the caller applies the actions in order."""
        self._world = world
        self._actions: list[Action] = []
        self._health: dict[str, NodeHealth] = {n.name: n.health for n in world.nodes.values()}
        self._placement: dict[str, str | None] = {v.name: v.placement for v in world.vms.values()}
        self._usage = Usage(world.vms.values())
        self._migrations = sum(
            1 for v in world.vms.values() if v.migration and v.migration.phase == "Running"
        )
        self.next_wakeup = None
        heard = {n.name: n.heard_at for n in world.nodes.values()}
        self._silent = silent_nodes(heard, world.now, self.timings.suspect_after)
        emits, storage_wake = self._storage.step(world, self._usage)
        self._actions.extend(emits)
        if storage_wake is not None:
            self._wake_at(storage_wake)
        for node in sorted(world.nodes.values(), key=lambda n: n.name):
            self._node_step(node)
        self._nodes = {
            name: replace(view, health=self._health[name]) for name, view in world.nodes.items()
        }
        self._reported_on: dict[str, set[str]] = {}
        """VM -> the nodes whose agent reports a domain of it."""
        for node in world.nodes.values():
            for name in node.domains:
                self._reported_on.setdefault(name, set()).add(node.name)
        self._disks = DiskHolders(
            (v for v in world.vms.values() if self._holds_disks(v)), self._known
        )
        self._disk_blocked: set[str] = set()
        self._held: set[str] = set()
        self._plan: dict[str, str] | None = None
        self._planned = False
        for vm in sorted(world.vms.values(), key=lambda v: (-v.spec.priority, v.name)):
            self._vm_step(vm)
            if vm.disk_conflict is not None and vm.name not in self._disk_blocked:
                self._actions.append(SetDiskConflict(vm.name, None))
            if vm.admission_hold is not None and vm.name not in self._held:
                self._actions.append(SetAdmissionHold(vm.name, None))
        self._report_drains()
        return self._actions

    @property
    def _now(self) -> float:
        return self._world.now

    def _emit(
        self, node_or_vm: NodeView | VmView, reason: str, message: str, type_: EventType = "Normal"
    ) -> None:
        if isinstance(node_or_vm, NodeView):
            emit = Emit("ClusterNode", node_or_vm.name, reason, message, type_)
        else:
            emit = Emit("VirtualMachine", node_or_vm.name, reason, message, type_)
        self._actions.append(emit)

    def _wake_at(self, when: float) -> None:
        if self.next_wakeup is None or when < self.next_wakeup:
            self.next_wakeup = when

    # Nodes ------------------------------------------------------------------------------------

    def _set_health(
        self, node: NodeView, health: NodeHealth, fence: FenceConfirmation | None
    ) -> None:
        self._health[node.name] = health
        self._actions.append(SetNodeHealth(node.name, health, fence))

    def _suspected(self, node: NodeView) -> bool:
        """Power-fenced and silent on the cluster network: fenced without waiting for the lease.

        Self-fencing nodes are never suspected on silence: their recovery needs the lease's
        server-side expiry (docs/ha.md)."""
        if not power_fenced(node.spec):
            return False
        if node.name in self._silent:
            return True
        if self._wake_for_silence and node.heard_at is not None and node.health == "Online":
            self._wake_at(node.heard_at + self.timings.suspect_after)
        return False

    def _lost(self, node: NodeView) -> bool:
        """Lease gone, silent, or to be fenced for its lost storage (`storage_loss.py`)."""
        return not node.lease_alive or self._suspected(node) or node.name in self._storage.fence

    def _node_step(self, node: NodeView) -> None:
        health = self._health[node.name]
        if health in ("Online", "Offline", "Fenced") and node.fence_ack_at is not None:
            self._actions.append(ClearFenceAck(node.name))
            if health == "Online":
                self._emit(
                    node,
                    "FenceAckIgnored",
                    "the node is Online: an acknowledgement only counts while it is lost",
                    "Warning",
                )
        if health == "Online":
            if not self._lost(node):
                return
            self._set_health(node, "Unknown", None)
            if node.name in self._storage.fence:
                why = self._storage.why(node.name)
            elif node.lease_alive and node.heard_at is not None:
                silent = self._now - node.heard_at
                why = f"no direct heartbeat for {silent:.1f}s (its lease is still held)"
            else:
                why = "heartbeat lease expired"
            self._emit(node, "NodeLost", why, "Warning")
            health = "Unknown"
        if health in ("Unknown", "Offline"):
            if not self._lost(node):
                self._set_health(node, "Online", None)
                self._emit(node, "NodeOnline", "agent holds its heartbeat lease")
                return
            if not self._may_run_anything(node):
                if health != "Offline":
                    self._set_health(node, "Offline", None)
                    self._emit(node, "NodeOffline", "no lease, and nothing placed or running there")
                return
            self._set_health(node, "Fencing", None)
            self._fencing[node.name] = _Fencing(backoff=self.timings.fence_retry_initial)
            health = "Fencing"
        if health == "Fencing":
            self._fence_step(node)
        elif health == "Fenced":
            fence = node.fence
            clean = node.clean_since is not None and (fence is None or node.clean_since >= fence.at)
            if node.lease_alive and clean:
                self._set_health(node, "Online", None)
                self._emit(node, "NodeOnline", "agent is back and destroyed every stale domain")

    def _may_run_anything(self, node: NodeView) -> bool:
        if node.domains:
            return True
        for vm in self._world.vms.values():
            if vm.placement == node.name:
                return True
            migration = vm.migration
            if (
                migration is not None
                and migration.phase in ("Running", "Succeeded")
                and node.name in (migration.source, migration.target)
            ):
                return True
        return False

    def _fenced(self, node: NodeView, how: FenceHow, method: str | None, message: str) -> None:
        self._fencing.pop(node.name, None)
        self._set_health(node, "Fenced", FenceConfirmation(how, self._now, method))
        self._emit(node, "NodeFenced", message)

    def _fence_step(self, node: NodeView) -> None:
        progress = self._fencing.setdefault(
            node.name, _Fencing(backoff=self.timings.fence_retry_initial)
        )
        methods = node.spec.fencing.methods
        for result in self._world.fence_results:
            if result.node != node.name or result.attempt != progress.attempt:
                continue
            progress.attempt = None
            if result.ok:
                self._fenced(
                    node, "PowerOff", result.method, f"method {result.method} confirmed power off"
                )
                return
            self._emit(
                node, "FencingFailed", f"method {result.method}: {result.message}", "Warning"
            )
            progress.method_index += 1
        if node.fence_ack_at is not None:
            self._actions.append(ClearFenceAck(node.name))
            self._fenced(node, "ManualAck", None, "an operator acknowledged the node is off")
            return
        if not self._lost(node) and progress.attempt is None:
            self._fencing.pop(node.name)
            self._set_health(node, "Online", None)
            self._emit(node, "NodeOnline", "lease renewed before fencing completed")
            return
        if node.spec.fencing.self_fence:
            lost_at = node.lease_lost_at if node.lease_lost_at is not None else self._now
            safe_at = lost_at + self.timings.recovery_grace
            if not progress.announced:
                progress.announced = True
                self._emit(
                    node,
                    "FencingStarted",
                    "relying on self-fencing: the agent destroyed its VMs before its lease "
                    f"expired; safe at {safe_at:.1f}",
                )
            if self._now >= safe_at:
                self._fenced(
                    node, "SelfFence", None, "lease expired and the self-fence grace passed"
                )
            else:
                self._wake_at(safe_at)
            return
        if progress.attempt is not None:
            return
        if self._now < progress.retry_at:
            self._wake_at(progress.retry_at)
            return
        if progress.method_index >= len(methods):
            if methods:
                message = f"all {len(methods)} fence methods failed; nothing is recovered"
            else:
                message = (
                    "no fence method and self-fencing not allowed: make sure the node is off, "
                    f"then run `kvmctl fence ack {node.name}`"
                )
            self._emit(
                node, "FencingFailed", f"{message}; retrying in {progress.backoff:.0f}s", "Warning"
            )
            progress.retry_at = self._now + progress.backoff
            progress.backoff = min(progress.backoff * 2, self.timings.fence_retry_max)
            progress.method_index = 0
            self._wake_at(progress.retry_at)
            return
        method = methods[progress.method_index]
        progress.attempt = self._next_attempt
        self._next_attempt += 1
        agents = ", ".join(device.agent for device in method.devices)
        self._emit(node, "FencingStarted", f"method {method.name} ({agents})")
        self._actions.append(StartFence(node.name, method.name, progress.attempt))

    # VMs --------------------------------------------------------------------------------------

    def _report(self, vm: VmView, reason: str, message: str) -> None:
        """A Warning, emitted again only when it changes."""
        if self._reported.get(vm.name) != (reason, message):
            self._reported[vm.name] = (reason, message)
            self._emit(vm, reason, message, "Warning")

    def _place(self, vm: VmView, node: str | None, relocation: bool = False) -> None:
        old = self._placement[vm.name]
        if old is not None:
            self._usage.remove(vm.name, vm.spec, old)
        if node is not None:
            self._usage.add(vm.name, vm.spec, node)
            self._disks.add(vm)
            if self._plan is not None and self._plan.get(vm.name) != node:
                self._plan = None  # admission's plan no longer describes the world
        self._placement[vm.name] = node
        self._reported.pop(vm.name, None)
        self._actions.append(Place(vm.name, node, relocation))

    def _report_disk_conflict(self, vm: VmView, clash: Clash) -> None:
        """Record (condition, then Warning) that `vm` is left Pending for another's disk."""
        message = (
            f"{clash.resource} is in use by {clash.other} ({clash.rule}): not placed until "
            f"{clash.other} no longer uses it"
        )
        self._disk_blocked.add(vm.name)
        if vm.disk_conflict != message:
            self._actions.append(SetDiskConflict(vm.name, message))
        self._report(vm, "DiskConflict", message)

    def _holds_disks(self, vm: VmView) -> bool:
        """Placed (even on a fenced node: recovering keeps the disk), or may run somewhere."""
        return self._placement[vm.name] is not None or bool(self._may_run_on(vm))

    def _may_run_on(self, vm: VmView) -> set[str]:
        """Nodes that may be running (or starting) `vm` and are not known to be fenced."""
        hosts = set(self._reported_on.get(vm.name, ()))
        placement = self._placement[vm.name]
        awaiting_restart = vm.state == "Crashed" and not self._restarted_since_crash(vm)
        if placement is not None and not awaiting_restart:
            hosts.add(placement)
        if vm.migration is not None and vm.migration.phase in ("Running", "Succeeded"):
            hosts.update((vm.migration.source, vm.migration.target))
        return {h for h in hosts if self._health.get(h) != "Fenced"}

    @staticmethod
    def _restarted_since_crash(vm: VmView) -> bool:
        return vm.crashed_at is None or any(t >= vm.crashed_at for t in vm.restarts)

    def _vm_step(self, vm: VmView) -> None:
        if vm.spec.run_state != "started":
            self._stop(vm)
            return
        if vm.failed:
            return
        migration = vm.migration
        if migration is not None:
            if migration.phase == "Running":
                return
            if migration.phase == "Succeeded":
                self._place(vm, migration.target)
                self._actions.append(ClearMigration(vm.name))
                message = f"live-migrated from {migration.source} to {migration.target}"
                self._emit(vm, "VMMigrated", message)
                return
            if migration.phase == "Failed":
                self._actions.append(ClearMigration(vm.name))
                message = f"{migration.source} to {migration.target}: {migration.message}"
                self._emit(vm, "MigrationFailed", message, "Warning")
            elif migration.phase == "Pending" and self._requested_migration(vm, migration.target):
                return
        placement = self._placement[vm.name]
        if placement is None:
            self._start_somewhere(vm)
            return
        health = self._health.get(placement)
        if health == "Fenced" or placement not in self._world.nodes:
            self._recover(vm, placement)
            return
        clash = self._disks.clash(vm)
        if clash is not None:  # placed as a second writer: a store written by hand or by old code
            self._place(vm, None)
            self._report_disk_conflict(vm, clash)
            return
        if health != "Online":
            return
        node = self._world.nodes[placement]
        if vm.name in self._recovering and vm.state == "Running":
            self._recovering.discard(vm.name)
            self._emit(vm, "VMRecovered", f"running on {placement}")
        if vm.state == "Crashed" and not self._restarted_since_crash(vm):
            self._restart_policy(vm, placement)
        elif vm.state == "Running" and node.spec.cordoned and node.drain is not None:
            self._drain(vm, node)
        elif vm.state == "Running" and vm.spec.failover_domain.failback:
            self._failback(vm, placement)

    def _stop(self, vm: VmView) -> None:
        if vm.migration is not None and vm.migration.phase in ("Pending", "Failed"):
            self._actions.append(ClearMigration(vm.name))
        if self._placement[vm.name] is not None:
            self._place(vm, None)
            self._emit(vm, "VMStopped", f"runState is {vm.spec.run_state}")
        if vm.failed or vm.restarts or vm.relocations:
            self._actions.append(SetFailed(vm.name, False))
        self._recovering.discard(vm.name)

    def _blocked(self, vm: VmView, target: str | None = None) -> bool:
        """True (and reported) when some unfenced node other than `target` may still run it."""
        others = sorted(self._may_run_on(vm) - {target})
        if others:
            self._report(vm, "VMPending", f"may still run on {', '.join(others)}")
        return bool(others)

    def _start_somewhere(self, vm: VmView) -> None:
        clash = self._disks.clash(vm)
        if clash is not None:
            self._report_disk_conflict(vm, clash)
            return
        if self._blocked(vm):
            return
        target, why = choose_node(vm, self._nodes, self._world.vms, self._usage)
        if target is None:
            self._report(vm, "VMPending", f"no node can run it: {why}")
            return
        if self._held_by_admission(vm, target):
            return
        self._place(vm, target)
        self._emit(vm, "VMPlaced", f"placed on {target}")

    def _current_views(self, placed_only: bool) -> dict[str, VmView]:
        """The VMs where this step has them (only the placed ones, or all)."""
        return {
            name: replace(view, placement=self._placement[name])
            for name, view in self._world.vms.items()
            if not placed_only or self._placement[name] is not None
        }

    def _held_by_admission(self, vm: VmView, target: str) -> bool:
        """Hold (enforce) or warn about (warn) a start after which the policy is not met.

        VMs placed on lost hosts count as placed wherever they could be recovered, so a start
        never takes the room a recovery needs; a VM this engine is recovering is not checked."""
        policy = self._world.admission
        if policy is None or vm.name in self._recovering:
            return False
        if not self._planned:
            self._planned = True
            self._plan = plan(policy, self._nodes, self._current_views(placed_only=False))
        if self._plan is not None and self._plan.get(vm.name) == target:
            return False
        placed = self._current_views(placed_only=True)
        after = check(policy, self._nodes, {**placed, vm.name: replace(vm, placement=target)})
        if after.ok:
            return False
        message = f"starting it on {target} would break admission control ({policy.describe()})"
        message = f"{message}: {after.reason}"
        if policy.mode == "warn":
            self._emit(vm, "AdmissionWarning", message, "Warning")
            return False
        self._held.add(vm.name)
        if vm.admission_hold != message:
            self._actions.append(SetAdmissionHold(vm.name, message))
        self._report(vm, "AdmissionHeld", message)
        return True

    def _recover(self, vm: VmView, lost: str) -> None:
        hosts = self._may_run_on(vm)
        if len(hosts) == 1:
            (host,) = hosts
            if self._health.get(host) == "Online" and vm.name in self._world.nodes[host].domains:
                self._place(vm, host)
                self._emit(vm, "VMAdopted", f"{lost} is fenced and the VM runs on {host}")
                return
        if self._blocked(vm):
            return
        clash = self._disks.clash(vm)
        if clash is not None:
            self._place(vm, None)
            self._report_disk_conflict(vm, clash)
            return
        target, why = choose_node(vm, self._nodes, self._world.vms, self._usage)
        self._recovering.add(vm.name)
        if target is None:
            self._place(vm, None)
            self._report(vm, "VMPending", f"no node can run it: {why}")
            return
        self._place(vm, target)
        self._emit(vm, "VMRelocating", f"{lost} is fenced; recovering on {target}", "Warning")

    def _restart_policy(self, vm: VmView, node: str) -> None:
        policy = vm.spec.restart_policy
        window = policy.window_seconds
        recent = [t for t in vm.restarts if t > self._now - window]
        if len(recent) < policy.max_restarts:
            self._actions.append(Restart(vm.name))
            message = f"crashed; restart {len(recent) + 1} of {policy.max_restarts} in {window}s"
            self._emit(vm, "VMRestarted", f"{message} on {node}", "Warning")
            return
        self._wake_at(min(recent) + window)  # a restart in place is allowed again then
        if vm.relocations < policy.max_relocations:
            if self._blocked(vm):
                return
            target, why = choose_node(vm, self._nodes, self._world.vms, self._usage, {node})
            if target is None:
                self._report(vm, "VMPending", f"restart limit reached; cannot relocate: {why}")
                return
            self._place(vm, target, relocation=True)
            message = (
                f"crashed again after {len(recent)} restarts in {window}s on {node}; relocation "
                f"{vm.relocations + 1} of {policy.max_relocations} to {target}"
            )
            self._emit(vm, "VMRelocating", message, "Warning")
            return
        self._actions.append(SetFailed(vm.name, True))
        self._place(vm, None)
        message = (
            f"crashed after {len(recent)} restarts and {vm.relocations} relocations: left Failed "
            "(set runState to stopped, then started, to try again)"
        )
        self._emit(vm, "VMFailed", message, "Warning")

    def _migrate(self, vm: VmView, source: str, target: str) -> None:
        self._usage.add(vm.name, vm.spec, target)
        self._migrations += 1
        self._actions.append(Migrate(vm.name, source, target))

    def _requested_migration(self, vm: VmView, target: str) -> bool:
        """Handle an operator's migration request; True when it is still waiting its turn."""
        placement = self._placement[vm.name]
        refusal: str | None = None
        if placement is None or vm.state != "Running" or self._health.get(placement) != "Online":
            refusal = "the VM is not running on an Online node"
        elif not vm.spec.migration.allowed:
            refusal = "live migration is not allowed for this VM"
        elif target == placement:
            refusal = f"the VM already runs on {target}"
        elif target not in self._world.nodes:
            refusal = f"no node named {target}"
        else:
            refusal = ineligibility(
                vm.name, vm.spec, self._nodes[target], self._usage, self._world.vms
            )
        if refusal is not None:
            self._actions.append(ClearMigration(vm.name))
            self._emit(vm, "MigrationRejected", f"to {target}: {refusal}", "Warning")
            return False
        if self._migrations >= self.timings.max_parallel_migrations:
            return True
        assert placement is not None
        self._migrate(vm, placement, target)
        self._emit(vm, "VMMigrating", f"requested: live-migrating from {placement} to {target}")
        return True

    def _drain(self, vm: VmView, node: NodeView) -> None:
        if self._migrations >= self.timings.max_parallel_migrations:
            return
        target, why = choose_node(vm, self._nodes, self._world.vms, self._usage, {node.name})
        if target is None:
            self._report(vm, "VMNotMigratable", f"cannot leave {node.name}: {why}")
        elif vm.spec.migration.allowed:
            self._migrate(vm, node.name, target)
            self._emit(vm, "VMMigrating", f"draining {node.name}: live-migrating to {target}")
        elif node.drain == "force":
            self._place(vm, None)
            message = f"draining {node.name} with force: stopping it to restart elsewhere"
            self._emit(vm, "VMStopped", message, "Warning")
        else:
            message = (
                f"live migration is not allowed: left on {node.name} "
                "(drain with --force stops it and restarts it elsewhere)"
            )
            self._report(vm, "VMNotMigratable", message)

    def _failback(self, vm: VmView, current: str) -> None:
        if not vm.spec.migration.allowed:
            return
        if self._migrations >= self.timings.max_parallel_migrations:
            return
        target, _ = choose_node(vm, self._nodes, self._world.vms, self._usage, {current})
        if target is None or domain_rank(vm.spec, target) >= domain_rank(vm.spec, current):
            return
        self._migrate(vm, current, target)
        self._emit(vm, "VMFailback", f"live-migrating from {current} back to preferred {target}")

    def _report_drains(self) -> None:
        for node in sorted(self._world.nodes.values(), key=lambda n: n.name):
            if node.drain is None or not node.spec.cordoned:
                self._drained.discard(node.name)
                continue
            busy = any(p == node.name for p in self._placement.values()) or any(
                vm.migration is not None and vm.migration.source == node.name
                for vm in self._world.vms.values()
            )
            if not busy and node.name not in self._drained:
                self._drained.add(node.name)
                self._emit(node, "NodeDrained", "no VM is placed on the node")


async def run(
    engine: Engine,
    env: Environment,
    period: float = DEFAULT_PERIOD,
    around_step: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> None:
    """Observe, decide, act, wait; until the environment says stop.

    Each observe-and-act runs inside `around_step()` (production: a reconcile span).
    """
    while True:
        with around_step():
            world = await env.observe()
            await env.apply_step(engine.step(world))
        until = world.now + period
        if engine.next_wakeup is not None:
            until = min(until, engine.next_wakeup)
        if not await env.wait(until):
            return
