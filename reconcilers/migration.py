"""Agent side of live migration: the source node runs the VirtualMachineMigrations it is given.

Phases (see `controller/migrations.py` for the controller's half): the leader validates a
Pending request and sets Scheduled with `sourceNode`; the source agent (this module) sets
Running, migrates peer to peer with libvirt to the target's libvirt URI (`status.libvirtUri`,
else `spec.libvirtUri`) with memory over `tcp://<target migrationAddress>` and the VM's max
downtime, writes progress at most every `PROGRESS_INTERVAL`, then Succeeded or Failed (the VM
keeps running here, and a Warning event says why). The leader then switches the VM's placement
and marks the request with the `PlacementSwitched` condition.

While a migration is in flight (`in_flight_migration`) neither the source nor the target agent
starts or destroys the VM's domain: during the hand-over the domain legitimately runs on the
target before the placement says so, and is legitimately gone from the source before it does.

LV hand-over (agents that manage activation, `lvm` set; the protocol is
`reconcilers/volume_claims.py`): before migrating a VM with `volume:` disks the source waits
until the target's agent took the LVs' claims over and set `VolumesActivated=True` on the
migration; after a success the source deactivates its LVs here; after a failure it takes the
claims back and the target deactivates its copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from ipaddress import IPv6Address, ip_address
from typing import Any

from controller.runtime import telemetry
from controller.runtime.defaults import DEFAULT_MIGRATION_CONCURRENCY
from controller.runtime.events import EventRecorder
from controller.runtime.informer import Informer
from controller.runtime.reconcile import Result, RetryableError
from controller.runtime.store import NotFound, Store, StoreError
from crds import AnyResource, ClusterNode, VirtualMachine, VirtualMachineMigration
from crds.meta import now
from crds.migration import PLACEMENT_SWITCHED
from reconcilers.drivers.libvirt import (
    LibvirtError,
    LibvirtHost,
    MigrationProgress,
)
from reconcilers.lvm_lock import LvmSettings
from reconcilers.volume_claims import VolumeClaims

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5
CAP_RETRY = 1.0
TARGET_ACTIVATION_TIMEOUT = 60.0
"""Seconds the source waits for the target's `VolumesActivated` before failing the migration."""
VOLUME_POLL_INTERVAL = 0.2


def in_flight_migration(
    migrations: Iterable[AnyResource], vm: str, node: str
) -> VirtualMachineMigration | None:
    """A migration of `vm` to or from `node` that still owns the domain, if any.

    In flight: Scheduled or Running, or Succeeded while the placement switch is not done.
    """
    for migration in migrations:
        if not isinstance(migration, VirtualMachineMigration) or migration.spec.vm != vm:
            continue
        status = migration.status
        if node not in (status.source_node, migration.spec.target_node):
            continue
        if status.phase in ("Scheduled", "Running"):
            return migration
        if status.phase == "Succeeded" and status.condition(PLACEMENT_SWITCHED) is None:
            return migration
    return None


def migration_endpoints(target: ClusterNode) -> tuple[str, str]:
    """The target's libvirt URI (as the source daemon reaches it) and its migration URI."""
    libvirt_uri = target.status.libvirt_uri or target.spec.libvirt_uri
    if libvirt_uri is None:
        raise ValueError(f"node {target.metadata.name} reports no libvirt URI (is its agent up?)")
    address = target.status.migration_address or str(target.spec.addresses.cluster)
    host = f"[{address}]" if isinstance(ip_address(address), IPv6Address) else address
    return libvirt_uri, f"tcp://{host}"


class MigrationRunner:
    """Reconciles VirtualMachineMigrations whose source is this node (keyed by name).

    `lvm`: this node's LVM settings when its agent manages LV activation (None: it does not,
    and migrations never wait for the target's `VolumesActivated`).
    """

    def __init__(
        self,
        node: str,
        store: Store,
        migrations: Informer,
        vms: Informer,
        nodes: Informer,
        recorder: EventRecorder,
        concurrency: int = DEFAULT_MIGRATION_CONCURRENCY,
        lvm: LvmSettings | None = None,
        activation_timeout: float = TARGET_ACTIVATION_TIMEOUT,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"migration concurrency must be at least 1, got {concurrency}")
        self.node = node
        self.store = store
        self.migrations = migrations
        self.vms = vms
        self.nodes = nodes
        self.recorder = recorder
        self.concurrency = concurrency
        self.claims = VolumeClaims(store, node, lvm, vms, migrations, nodes, recorder)
        self.activation_timeout = activation_timeout
        self.host: LibvirtHost | None = None
        self._running: dict[str, asyncio.Task[None]] = {}

    @property
    def running(self) -> int:
        return len(self._running)

    async def reconcile(self, key: str) -> Result:
        obj = self.migrations.get(key)
        if not isinstance(obj, VirtualMachineMigration):
            task = self._running.get(key)
            if task is not None:
                log.warning("migration %s was deleted while running: aborting it", key)
                task.cancel()
            return Result()
        if obj.status.source_node != self.node:
            return Result()
        if obj.status.phase == "Running" and key not in self._running:
            await self._finish(obj, "Failed", "interrupted: the source agent restarted")
            await self.claims.take_back(obj)
            return Result()
        if obj.status.phase != "Scheduled" or key in self._running:
            return Result()
        if len(self._running) >= self.concurrency:
            return Result(requeue_after=CAP_RETRY)
        host = self.host
        if host is None:
            raise RetryableError(f"no libvirt connection on {self.node}")
        try:
            started = await self.store.patch_status(
                "VirtualMachineMigration", key, lambda m: _start(m, self.node)
            )
        except NotFound:
            return Result()
        if not isinstance(started, VirtualMachineMigration) or started.status.phase != "Running":
            return Result()
        self._running[key] = asyncio.create_task(
            self._migrate(host, started), name=f"migrate {key}"
        )
        return Result()

    async def stop(self) -> None:
        """Abort running migrations (each domain stays here) and wait for them."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _migrate(self, host: LibvirtHost, migration: VirtualMachineMigration) -> None:
        name = migration.metadata.name
        try:
            await self._run_migration(host, migration)
        except asyncio.CancelledError:
            message = f"aborted on {self.node}; the VM stays there if it still runs"
            await asyncio.shield(self._finish(migration, "Failed", message))
            raise
        except Exception as error:
            log.exception("migration %s failed unexpectedly", name)
            await self._finish(migration, "Failed", f"unexpected error: {error}")
            await self.claims.take_back(migration)
        finally:
            self._running.pop(name, None)

    async def _run_migration(self, host: LibvirtHost, migration: VirtualMachineMigration) -> None:
        vm_name = migration.spec.vm
        target_name = migration.spec.target_node
        vm = self.vms.get(vm_name)
        target = self.nodes.get(target_name)
        if not isinstance(vm, VirtualMachine):
            await self._finish(migration, "Failed", f"VirtualMachine {vm_name} not found")
            return
        if not isinstance(target, ClusterNode):
            await self._finish(migration, "Failed", f"target node {target_name} not found")
            return
        try:
            dest_uri, migrate_uri = migration_endpoints(target)
        except ValueError as error:
            await self._fail(migration, vm, str(error))
            return
        problem = await self.claims.wait_for_target(
            migration, self.activation_timeout, VOLUME_POLL_INTERVAL
        )
        if problem is not None:
            await self._fail(migration, vm, problem)
            return
        progress = _ProgressWriter(self.store, migration.metadata.name)
        log.info("migrating %s from %s to %s (%s)", vm_name, self.node, target_name, dest_uri)
        try:
            await host.migrate(
                vm_name,
                dest_uri,
                migrate_uri=migrate_uri,
                max_downtime_ms=vm.spec.migration.max_downtime_ms,
                progress=progress.report,
                poll_interval=PROGRESS_INTERVAL,
            )
        except LibvirtError as error:
            await progress.close()
            await self._fail(migration, vm, str(error))
            return
        await progress.close()
        await self.claims.deactivate_after_migration(vm)
        await self._finish(migration, "Succeeded", f"migrated from {self.node} to {target_name}")
        await self.recorder.record(
            vm, "Normal", "Migrated", "live-migrated from %s to %s", self.node, target_name
        )

    async def _fail(
        self, migration: VirtualMachineMigration, vm: VirtualMachine, message: str
    ) -> None:
        text = f"{message}; the VM keeps running on {self.node}"
        await self._finish(migration, "Failed", text)
        await self.recorder.record(vm, "Warning", "MigrationFailed", "%s", text)
        await self.recorder.record(migration, "Warning", "MigrationFailed", "%s", text)
        await self.claims.take_back(migration)

    async def _finish(self, migration: VirtualMachineMigration, phase: str, message: str) -> None:
        ended = False

        def mutate(current: Any) -> bool:
            nonlocal ended
            status = current.status
            if status.phase in ("Succeeded", "Failed"):
                return False
            ended = True
            status.phase = phase
            status.message = message
            status.finished_at = now()
            if phase == "Succeeded":
                status.progress_percent = 100
                status.data_remaining_bytes = 0
            return True

        try:
            await self.store.patch_status(
                "VirtualMachineMigration", migration.metadata.name, mutate
            )
        except NotFound:
            return
        except StoreError as error:
            log.error(
                "could not record migration %s as %s: %s", migration.metadata.name, phase, error
            )
            return
        if ended:
            telemetry.count_migration(phase.lower())


def _start(migration: Any, node: str) -> bool:
    status = migration.status
    if status.phase != "Scheduled" or status.source_node != node:
        return False
    status.phase = "Running"
    status.started_at = now()
    status.message = "migrating"
    return True


class _ProgressWriter:
    """Writes the latest progress report to the migration's status, one write at a time."""

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._name = name
        self._latest: MigrationProgress | None = None
        self._writing: asyncio.Task[None] | None = None

    def report(self, progress: MigrationProgress) -> None:
        self._latest = progress
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write())

    async def close(self) -> None:
        if self._writing is not None:
            await asyncio.wait({self._writing})

    async def _write(self) -> None:
        progress = self._latest
        if progress is None:
            return

        def mutate(current: Any) -> bool:
            status = current.status
            if status.phase != "Running":
                return False
            status.progress_percent = min(99, int(progress.percent))
            status.data_remaining_bytes = progress.data_remaining_bytes
            status.data_processed_bytes = progress.data_processed_bytes
            return True

        try:
            await self._store.patch_status("VirtualMachineMigration", self._name, mutate)
        except StoreError as error:
            log.info("progress of migration %s not written: %s", self._name, error)
