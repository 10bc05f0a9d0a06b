"""The agent's storage-path watch (docs/ha.md, "Storage-path loss").

Every `interval` the agent checks the storage paths the cluster's started VMs need
(`VirtualMachineSpec.storage_paths`), through the drivers only:

- `vg NAME`: every PV of the VolumeGroup that is an iSCSI LUN has a kernel session to its
  target's IQN in state LOGGED_IN (sysfs); then, when the agent manages LVM, `pvs` shows the
  VG's PVs and none is missing. A VG whose `spec.nodes` leaves this node out is not checked;
- `iscsi TARGET` (a disk QEMU opens itself): the target's portal accepts a TCP connection;
- `file PATH`: the image's filesystem answers statvfs and the image's first block reads.

Every node checks every VM's paths, not only those of its own VMs, so that the controller
knows where a VM's path is healthy before it recovers the VM there. The result goes in the
agent's own part of its ClusterNode status: `storageLost` (path, since, why) and the condition
`StorageReachable`, written only when the set of lost paths or their reasons change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from controller.runtime.informer import Informer, SharedInformers
from controller.runtime.store import Store, StoreError
from crds import ClusterNode, IscsiTarget, VirtualMachine, VolumeGroup
from crds.clusternode import LostStoragePath
from crds.meta import now
from reconcilers.drivers.lvm import Lvm, LvmError
from reconcilers.drivers.storage_paths import (
    LOGGED_IN,
    SYSFS,
    FileCheck,
    check_portal,
    iscsi_sessions,
)

log = logging.getLogger(__name__)

CONDITION = "StorageReachable"


@dataclass(frozen=True)
class StorageSources:
    """Where the watch finds the objects (the agent's informer caches)."""

    vms: Callable[[], Iterable[VirtualMachine]]
    volume_groups: Callable[[], Iterable[VolumeGroup]]
    iscsi_target: Callable[[str], IscsiTarget | None]
    node: Callable[[str], ClusterNode | None]


class StorageWatch:
    """The storage paths of node `node`: `lost()` checks them, `run()` reports them."""

    def __init__(
        self,
        node: str,
        sources: StorageSources,
        lvm: Lvm | None,
        sysfs: Path = SYSFS,
        timeout: float = 5.0,
    ) -> None:
        self.node = node
        self.sources = sources
        self.lvm = lvm
        self.sysfs = sysfs
        self.timeout = timeout
        self.files = FileCheck(timeout)
        self._written: dict[str, str] | None = None

    def paths(self) -> set[str]:
        """The paths the started VMs need."""
        paths: set[str] = set()
        for vm in self.sources.vms():
            if vm.spec.run_state == "started":
                paths |= vm.spec.storage_paths()
        return paths

    async def lost(self) -> dict[str, str]:
        """Each broken path with why."""
        sessions = {s.target: s.state for s in await asyncio.to_thread(iscsi_sessions, self.sysfs)}
        pvs: dict[str, list[str]] | None = None
        lost: dict[str, str] = {}
        paths = sorted(self.paths())
        images = [path.partition(" ")[2] for path in paths if path.startswith("file ")]
        files = await self.files.check_many(images)
        for path in paths:
            kind, _, name = path.partition(" ")
            problem: str | None
            if kind == "vg":
                if not self._relevant(name):
                    continue
                problem = self._sessions_of(name, sessions)
                if problem is None and self.lvm is not None:
                    if pvs is None:
                        pvs = await self._pvs()
                    problem = _pv_problem(name, pvs)
            elif kind == "iscsi":
                problem = await self._portal(name)
            else:
                problem = files[name]
            if problem is not None:
                lost[path] = problem
        return lost

    def _sessions_of(self, vg: str, sessions: dict[str, str]) -> str | None:
        """Why an iSCSI PV of VG `vg` is unreachable (its session), or None."""
        group = next((g for g in self.sources.volume_groups() if g.spec.vg_name == vg), None)
        if group is None:
            return None
        for pv in group.spec.physical_volumes:
            target = None if pv.iscsi is None else self.sources.iscsi_target(pv.iscsi.target)
            if target is None or pv.iscsi is None:
                continue
            state = sessions.get(target.spec.iqn)
            if state != LOGGED_IN:
                return (
                    f"iSCSI session to {target.spec.iqn} (LUN {pv.iscsi.lun} of IscsiTarget "
                    f"{pv.iscsi.target}) is {state or 'not logged in'}"
                )
        return None

    async def _pvs(self) -> dict[str, list[str]]:
        """Per VG, its PVs' attributes; one `pvs` per look (an error stands for every VG)."""
        assert self.lvm is not None
        try:
            reports = await self.lvm.pvs()
        except LvmError as error:
            return {"": [error.message]}
        by_vg: dict[str, list[str]] = {}
        for pv in reports:
            if pv.vg_name is not None:
                by_vg.setdefault(pv.vg_name, []).append(pv.attr)
        return by_vg

    async def _portal(self, name: str) -> str | None:
        target = self.sources.iscsi_target(name)
        if target is None:
            return None  # the VM reconciler reports IscsiTargetNotFound
        host, _, port = target.spec.portal.rpartition(":")
        if _unspecified(host):
            server = self.sources.node(target.spec.node)
            if server is None:
                return None
            host = str(server.spec.addresses.cluster)
        return await check_portal(f"{host}:{port}", self.timeout)

    def _relevant(self, vg: str) -> bool:
        group = next((g for g in self.sources.volume_groups() if g.spec.vg_name == vg), None)
        return group is None or not group.spec.nodes or self.node in group.spec.nodes

    async def report(self, store: Store) -> None:
        """Check, then write `storageLost` and `StorageReachable` if they changed."""
        lost = await self.lost()
        if lost == self._written:
            return
        at = now()

        def mutate(current: Any) -> bool:
            status = current.status
            since = {entry.path: entry.since for entry in status.storage_lost}
            status.storage_lost = [
                LostStoragePath(path=path, since=since.get(path, at), message=why)
                for path, why in sorted(lost.items())
            ]
            if lost:
                message = "; ".join(f"{path}: {why}" for path, why in sorted(lost.items()))
                status.set_condition(CONDITION, "False", "StoragePathLost", message[:4096])
            else:
                message = "every storage path the VMs need works here"
                status.set_condition(CONDITION, "True", "StoragePathsHealthy", message)
            return True

        await store.patch_status("ClusterNode", self.node, mutate)
        if lost:
            log.warning("%s lost storage: %s", self.node, lost)
        self._written = lost

    async def run(self, store: Store, interval: float = 5.0) -> None:
        """Until cancelled: `report` every `interval`."""
        while True:
            try:
                await self.report(store)
            except (StoreError, OSError) as error:
                log.warning("storage paths of %s not reported: %s", self.node, error)
            await asyncio.sleep(interval)


def _unspecified(host: str) -> bool:
    """`0.0.0.0` or `::` (a portal listening everywhere); a host name is not."""
    try:
        return ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _pv_problem(vg: str, pvs: dict[str, list[str]]) -> str | None:
    if "" in pvs:
        return f"pvs failed: {pvs[''][0]}"
    attrs = pvs.get(vg)
    if not attrs:
        return f"no physical volume of {vg} is visible"
    missing = sum(1 for attr in attrs if "m" in attr)
    if missing:
        return f"{missing} of the {len(attrs)} physical volumes of {vg} are missing"
    return None


def from_informers(node: str, informers: SharedInformers, lvm: Lvm | None) -> StorageWatch:
    """The watch of an agent, over its shared informer caches."""
    vms, groups = informers.informer("VirtualMachine"), informers.informer("VolumeGroup")
    targets, nodes = informers.informer("IscsiTarget"), informers.informer("ClusterNode")

    def one(informer: Informer, kind: type[Any], name: str) -> Any:
        obj = informer.get(name)
        return obj if isinstance(obj, kind) else None

    sources = StorageSources(
        vms=lambda: [vm for vm in vms.list() if isinstance(vm, VirtualMachine)],
        volume_groups=lambda: [g for g in groups.list() if isinstance(g, VolumeGroup)],
        iscsi_target=lambda name: one(targets, IscsiTarget, name),
        node=lambda name: one(nodes, ClusterNode, name),
    )
    return StorageWatch(node, sources, lvm)
