"""The VirtualMachine reconciler's domain lifecycle: start, stop, destroy, restart in place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime

from controller.ha.agent_rules import (
    DomainAction,
    DomainFacts,
    decide_domain,
    failure_warnings,
    recent_restarts,
)
from controller.runtime.events import EventRecorder
from controller.runtime.informer import Informer
from controller.runtime.layout import NODE_FINALIZERS
from controller.runtime.reconcile import (
    Blocked,
    Result,
    RetryableError,
    TerminalError,
    record_not_ready,
)
from controller.runtime.store import Store
from crds import VirtualMachine
from crds.event import ObjectReference
from crds.meta import now
from reconcilers.drivers.domain_xml import DomainSpec, parse_kvmctl_metadata
from reconcilers.drivers.libvirt import (
    DomainInfo,
    DomainNotFound,
    DomainStateConflict,
    InvalidDefinition,
    LibvirtError,
    LibvirtHost,
    LibvirtUnavailable,
)
from reconcilers.volume_claims import Volume, VolumeClaims, vm_volumes

from .domain import (
    ACTIVE_STATES,
    DomainBuilder,
    DomainSettings,
    define,
    destroy,
    remove_unwanted,
    undefine,
)
from .handover import MigrationHandover
from .health import GuestHealth, Verdict
from .status import StatusWriter, placed_on, set_crashed, set_running, set_stopped

log = logging.getLogger(__name__)

FINALIZER = NODE_FINALIZERS["VirtualMachine"]
BLOCKED_RETRY = 1.0
"""Seconds between looks while starting a domain is not allowed (no heartbeat lease)."""
ACTIVATION_RETRY = 5.0
"""Seconds between attempts to activate the LVs of a VM that cannot start yet."""


class VirtualMachineReconciler:
    """Reconciles VirtualMachines on node `node`; see the package docstring.

    `host` is the current libvirt connection (the agent replaces it after a reconnect; None
    while disconnected). `start_blocker()` returns why starting domains is not allowed now
    (for example: no valid heartbeat lease), or None. `self_fence_victims` holds the VMs the
    agent's self-fence destroyed here: started again uncounted, then dropped from it.
    """

    def __init__(
        self,
        node: str,
        store: Store,
        vms: Informer,
        migrations: Informer,
        iscsi_targets: Informer,
        nodes: Informer,
        recorder: EventRecorder,
        settings: DomainSettings,
        start_blocker: Callable[[], str | None] = lambda: None,
        self_fence_victims: set[str] | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.vms = vms
        self.migrations = migrations
        self.nodes = nodes
        self.recorder = recorder
        self.settings = settings
        self.start_blocker = start_blocker
        self.self_fence_victims = set() if self_fence_victims is None else self_fence_victims
        self.host: LibvirtHost | None = None
        self.domains = DomainBuilder(node, settings, iscsi_targets, nodes)
        self.claims = VolumeClaims(store, node, settings.lvm, vms, migrations, nodes, recorder)
        self.status = StatusWriter(store, node)
        self.handover = MigrationHandover(node, store, migrations, self.claims, self.status)
        self.health = GuestHealth()

    async def record(self, key: str, error: TerminalError | Blocked) -> None:
        """Record a terminal or blocked reconcile on the VM while it is placed here (pass as
        `run_workers`' `on_terminal` and `on_blocked`)."""
        await record_not_ready(
            self.store, self.recorder, "VirtualMachine", key, error, owned=self.status.owns
        )

    def domain_spec(self, vm: VirtualMachine) -> DomainSpec:
        """The domain definition for `vm` on this node; TerminalError for a bad reference."""
        return self.domains.domain_spec(vm)

    async def reconcile(self, key: str) -> Result:
        host = self.host
        if host is None:
            raise RetryableError(f"no libvirt connection on {self.node}")
        try:
            return await self._reconcile(host, key)
        except LibvirtUnavailable as error:
            raise RetryableError(str(error)) from None

    async def _reconcile(self, host: LibvirtHost, name: str) -> Result:
        obj = self.vms.get(name)
        vm = obj if isinstance(obj, VirtualMachine) else None
        domain = await host.lookup(name)
        if domain is not None and not domain.metadata.get("uid"):
            if vm is not None and placed_on(vm, self.node) and vm.spec.run_state == "started":
                raise TerminalError(
                    "DomainNameTaken",
                    f"host {self.node} has a domain {name!r} not created by kvmctl; "
                    "rename or remove it",
                )
            return Result()  # a foreign domain: never touched
        if domain is not None and (vm is None or domain.metadata["uid"] != vm.metadata.uid):
            await self._remove_stale(host, domain, vm)
            domain = None
        if vm is None:
            return Result()
        if vm.metadata.deletion_timestamp is not None:
            return await self._delete(host, vm, domain)
        migration = self.handover.in_flight(vm)
        action = decide_domain(self._facts(vm, domain, migration is not None))
        if action in ("destroy", "forget", "stop"):
            self.self_fence_victims.discard(name)
        if action == "leave":
            assert migration is not None
            await self.handover.leave_to(vm, migration)
            return Result()
        if action in ("destroy", "forget"):
            if domain is not None and not await self.handover.confirmed_elsewhere(vm):
                return Result()  # the caches were behind; the informers bring the change
            volumes = await self._volumes(host, vm, domain)
            if domain is not None:
                await self._remove_not_placed(host, vm, domain)
            await self.claims.release(volumes, name)
            await self.handover.after_leaving(vm)
            return Result()
        if FINALIZER not in vm.metadata.finalizers:
            await self.store.add_finalizer("VirtualMachine", name, FINALIZER)
        if action == "stop":
            return await self._stop(host, vm, domain)
        if action == "keep":
            assert domain is not None
            return await self._observe_running(host, vm, domain)
        if action == "wait":
            log.info("not starting %s on %s: %s", name, self.node, self.start_blocker())
            return Result(requeue_after=BLOCKED_RETRY)
        return await self._start_or_restart(host, vm, domain)

    def _facts(
        self, vm: VirtualMachine, domain: DomainInfo | None, migration_owns: bool
    ) -> DomainFacts:
        """What the shared agent rules (`controller/ha/agent_rules.py`) decide on."""
        status = vm.status
        limit = status.condition("RestartLimitReached")
        here = status.node == self.node
        return DomainFacts(
            placed_here=placed_on(vm, self.node),
            wanted=vm.spec.run_state == "started",
            running=domain is not None and domain.state in ACTIVE_STATES,
            migration_owns=migration_owns,
            ran_here=here and status.state == "Running",
            gave_up_here=here and limit is not None and limit.status == "True",
            restarts=[moment.timestamp() for moment in status.restarts],
            policy=vm.spec.restart_policy,
            now=now().timestamp(),
            start_blocker=self.start_blocker(),
            self_fence_victim=vm.metadata.name in self.self_fence_victims,
        )

    async def _volumes(
        self, host: LibvirtHost, vm: VirtualMachine | None, domain: DomainInfo | None
    ) -> list[Volume]:
        """The LVs to release when the VM leaves: its own and those its domain here opens."""
        xml = None
        if domain is not None and self.settings.lvm is not None:
            with contextlib.suppress(DomainNotFound):
                xml = await host.domain_xml(domain.name)
        return self.claims.volumes(vm, xml)

    # -- placed here, started ----------------------------------------------------------------

    async def _observe_running(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo
    ) -> Result:
        desired = self.domain_spec(vm)
        await self.claims.keep(vm)
        try:
            verdict = await self.health.check(host, vm)
        except (DomainNotFound, DomainStateConflict):
            return Result()  # it stopped meanwhile: its lifecycle event brings the change
        if verdict.unresponsive is not None:
            return await self._unresponsive(host, vm, domain, verdict)
        await self.status.patch(
            vm,
            lambda vm_: set_running(vm_, self.node, domain, desired, list(vm_.status.restarts)),
        )
        return Result(requeue_after=verdict.next_ping)

    async def _unresponsive(
        self,
        host: LibvirtHost,
        vm: VirtualMachine,
        domain: DomainInfo,
        verdict: Verdict,
    ) -> Result:
        """A running guest failed a health check: reset it in place (unless QEMU already did)
        or, at the restart limit, destroy it and give up; decided on etcd's copy."""
        reason = verdict.unresponsive
        assert reason is not None
        fresh = await self.status.fresh_if_placed_here(vm)
        if fresh is None:
            return Result()
        vm, name = fresh, fresh.metadata.name
        facts = replace(self._facts(vm, domain, migration_owns=False), unresponsive=reason)
        action = decide_domain(facts)
        restarts = self._recent_restarts(vm, facts)
        if action == "reset":
            if not verdict.reset_by_qemu:
                await host.reset(name)
            restarts.append(now())
        elif action == "give_up":
            await destroy(host, name)
            await self.claims.release(await self._volumes(host, vm, domain), name)
            self.health.forget(name)
        else:
            return Result()
        if await self._record_failure(vm, facts, action, restarts):
            return Result()  # given up here
        desired = self.domain_spec(vm)
        await self.status.patch(
            vm, lambda vm_: set_running(vm_, self.node, domain, desired, restarts)
        )
        return Result(requeue_after=verdict.next_ping)

    async def _start_or_restart(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo | None
    ) -> Result:
        """Decided again on etcd's current copy, not the cache: a crash seen before the cache
        caught up with our own "Running" report must still count as a restart."""
        fresh = await self.status.fresh_if_placed_here(vm)
        if fresh is None:
            return Result()  # the cache was behind; the informer brings the change
        vm, name = fresh, fresh.metadata.name
        stopped_by = self.health.stopped_by(vm)  # its watchdog powered it off: a failed guest
        facts = replace(self._facts(vm, domain, migration_owns=False), unresponsive=stopped_by)
        action = decide_domain(facts)
        restarts = self._recent_restarts(vm, facts)
        if action == "give_up":
            await self.claims.release(await self._volumes(host, vm, domain), name)
            self.health.forget(name)
            await self._record_failure(vm, facts, action, restarts)
            return Result()
        if action not in ("start", "restart"):
            return Result()  # left down (stop and start the VM, or relocate it), or changed
        problem = await self.claims.activate_for_start(vm)
        if problem is not None:
            raise Blocked("VolumeActivationFailed", problem, ACTIVATION_RETRY)
        desired = self.domain_spec(vm)
        await self._start(host, vm, desired)
        self.self_fence_victims.discard(name)
        self.health.forget(name)
        event: Awaitable[object]  # the start's Events, written alongside the status
        if action == "restart":
            restarts.append(now())
            event = self._record_failure(vm, facts, action, restarts)
        else:
            event = self.recorder.record(vm, "Normal", "DomainStarted", "started on %s", self.node)
        await asyncio.gather(event, self.status.started(host, vm, desired, restarts))
        return Result()

    async def _start(self, host: LibvirtHost, vm: VirtualMachine, desired: DomainSpec) -> None:
        """Define and start the domain; the LVs just claimed are released if it cannot be."""
        name = vm.metadata.name
        try:
            await define(host, desired)
            await host.start(name)
        except DomainStateConflict:
            log.info("domain %s was already started on %s", name, self.node)
        except TerminalError:
            await self.claims.release(vm_volumes(vm), name)
            raise
        except InvalidDefinition as error:
            await self.claims.release(vm_volumes(vm), name)
            raise TerminalError("InvalidDefinition", str(error)) from None
        except LibvirtError as error:
            if isinstance(error, LibvirtUnavailable):
                raise
            await self.recorder.record(vm, "Warning", "StartFailed", "%s", str(error))
            raise RetryableError(str(error)) from None

    @staticmethod
    def _recent_restarts(vm: VirtualMachine, facts: DomainFacts) -> list[datetime]:
        """The VM's restarts that still count against its policy's window."""
        recent = set(recent_restarts(facts.restarts, vm.spec.restart_policy, facts.now))
        return [moment for moment in vm.status.restarts if moment.timestamp() in recent]

    async def _record_failure(
        self, vm: VirtualMachine, facts: DomainFacts, action: DomainAction, restarts: list[datetime]
    ) -> bool:
        """Record the Warnings of a restart, reset or give-up (`failure_warnings`); at the
        restart limit also mark the VM crashed here first. True if it gave up."""
        limit = None
        for reason, message in failure_warnings(facts, action, self.node, len(restarts)):
            if reason == "RestartLimitReached":
                limit = message
            else:
                await self.recorder.record(vm, "Warning", reason, "%s", message)
        if limit is None:
            return False
        await self.status.patch(vm, lambda vm_: set_crashed(vm_, self.node, restarts, limit))
        await self.recorder.record(vm, "Warning", "RestartLimitReached", "%s", limit)
        return True

    # -- placed here, stopped ----------------------------------------------------------------

    async def _stop(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo | None
    ) -> Result:
        name = vm.metadata.name
        self.health.forget(name)
        volumes = await self._volumes(host, vm, domain)
        if domain is not None and domain.state in ACTIVE_STATES:
            timeout = vm.spec.shutdown_timeout_seconds
            clean = await host.shutdown(name, timeout)
            how = "shut down" if clean else f"destroyed after {timeout} s without shutting down"
            await self.recorder.record(vm, "Normal", "DomainStopped", "%s on %s", how, self.node)
        if domain is not None:
            desired = self.domain_spec(vm)
            inactive = parse_kvmctl_metadata(await host.domain_xml(name, inactive=True))
            if inactive.get("specHash") != desired.metadata["specHash"]:
                await define(host, desired)
        await self.claims.release(volumes, name)
        generation = vm.metadata.generation
        await self.status.patch(vm, lambda vm_: set_stopped(vm_, self.node, generation))
        return Result()

    # -- not placed here, stale, deleted -----------------------------------------------------

    async def _remove_not_placed(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo
    ) -> None:
        placement = vm.status.placement
        where = f"placed on {placement.node}" if placement is not None else "not placed anywhere"
        await remove_unwanted(host, self.recorder, self.node, domain, vm, f"the VM is {where}")

    async def _remove_stale(
        self, host: LibvirtHost, domain: DomainInfo, vm: VirtualMachine | None
    ) -> None:
        """A kvmctl domain whose VM is gone (or was recreated with another uid)."""
        volumes = await self._volumes(host, None, domain)
        involved = vm or ObjectReference(kind="VirtualMachine", name=domain.name)
        why = "it belongs to a VirtualMachine that no longer exists"
        await remove_unwanted(host, self.recorder, self.node, domain, involved, why)
        await self.claims.release(volumes, domain.name)

    async def _delete(
        self, host: LibvirtHost, vm: VirtualMachine, domain: DomainInfo | None
    ) -> Result:
        volumes = await self._volumes(host, vm, domain)
        if domain is not None:
            if domain.state in ACTIVE_STATES:
                await destroy(host, domain.name)
            await undefine(host, domain.name)
            await self.recorder.record(vm, "Normal", "DomainDeleted", "undefined on %s", self.node)
        await self.claims.release(volumes, vm.metadata.name)
        placement = vm.status.placement
        if placement is None or placement.node == self.node:
            await self.store.remove_finalizer("VirtualMachine", vm.metadata.name, FINALIZER)
        return Result()
