"""The agent's storage and network plumbing: Bond, IscsiTarget and VolumeGroup reconcilers.

`run_storage_reconcilers` is the one entry point the host agent calls. It watches the three
kinds (and what they refer to: Secrets, VirtualMachines, this node's ClusterNode), enqueues
only the objects that concern this node (`spec.node`, or for a VolumeGroup `spec.nodes`
containing it or empty), feeds netlink link events to the Bond queue, starts tgtd when the
caller passes a `TgtdSupervisor` and none answers, and runs the workers until cancelled.
A tgtd started this way keeps running when the loop stops (its sessions belong to the
initiators); the caller owns the supervisor and may `stop()` it.

    tgtd = TgtdSupervisor("10.0.1.1:3260")
    await run_storage_reconcilers(store, "host1", recorder, StorageSettings(), tgtd)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from controller.runtime.events import EventRecorder
from controller.runtime.informer import DEFAULT_RESYNC_PERIOD, Informer, SharedInformers
from controller.runtime.reconcile import (
    Blocked,
    Reconciler,
    TerminalError,
    record_not_ready,
    run_workers,
)
from controller.runtime.store import PermissionDenied, Store
from controller.runtime.workqueue import WorkQueue
from crds import AnyResource, Bond, IscsiTarget, Secret, VirtualMachine, VolumeGroup
from reconcilers.bond import BondReconciler, watch_bond_links
from reconcilers.drivers.tgt import TgtAdm
from reconcilers.iscsitarget import IscsiTargetReconciler
from reconcilers.lvm_lock import LvmSettings
from reconcilers.tgtd_supervisor import TgtdSupervisor
from reconcilers.volumegroup import VolumeGroupReconciler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageSettings:
    """Where this node's plumbing lives."""

    netns: str | None = None
    """Network namespace of the node's links (None: the agent's own)."""
    tgtd_control_port: int | None = None
    """tgtd's control port (None: tgtd's default)."""
    lvm: LvmSettings = field(default_factory=LvmSettings)
    workers: int = 1
    resync_period: float | None = DEFAULT_RESYNC_PERIOD


def on_this_node(obj: AnyResource, node: str) -> bool:
    """Whether `obj` (a Bond, IscsiTarget or VolumeGroup) is reconciled on `node`."""
    if isinstance(obj, Bond | IscsiTarget):
        return obj.spec.node == node
    if isinstance(obj, VolumeGroup):
        return not obj.spec.nodes or node in obj.spec.nodes
    return False


def targets_using_secret(targets: Iterable[AnyResource], secret: str) -> list[str]:
    return [
        t.metadata.name
        for t in targets
        if isinstance(t, IscsiTarget) and t.spec.chap is not None
        if t.spec.chap.secret_ref.name == secret
    ]


def volume_groups_used_by(vgs: Iterable[AnyResource], vm: VirtualMachine) -> list[str]:
    """Names of the VolumeGroup objects whose VG holds one of `vm`'s disks."""
    used = {ref.vg for disk in vm.spec.disks if (ref := disk.volume_ref()) is not None}
    return [
        vg.metadata.name for vg in vgs if isinstance(vg, VolumeGroup) and vg.spec.vg_name in used
    ]


class _Kind:
    """One kind's queue, fed by its informer for this node's objects only."""

    def __init__(self, informer: Informer, node: str, reconciler: Reconciler) -> None:
        self.informer = informer
        self.node = node
        self.reconciler = reconciler
        self.queue = WorkQueue()
        informer.add_handler(self._changed)

    def _changed(self, _type: str, obj: AnyResource) -> None:
        if on_this_node(obj, self.node):
            self.queue.add(obj.metadata.name)

    def add(self, key: str) -> None:
        obj = self.informer.get(key)
        if obj is not None and on_this_node(obj, self.node):
            self.queue.add(key)

    def mapped(self, keys: Callable[[AnyResource], Iterable[str]]) -> Callable[..., None]:
        def handler(_type: str, obj: AnyResource) -> None:
            for key in keys(obj):
                self.add(key)

        return handler


def _recording(
    store: Store, kind: str, recorder: EventRecorder
) -> Callable[[str, TerminalError | Blocked], Awaitable[None]]:
    async def record(key: str, error: TerminalError | Blocked) -> None:
        await record_not_ready(store, recorder, kind, key, error)

    return record


async def _may_read_secrets(store: Store, node: str) -> bool:
    """Whether this node's etcd user may read Secrets (with RBAC, only storage nodes may)."""
    try:
        await store.list_objects("Secret")
    except PermissionDenied:
        log.info("%s may not read Secrets: CHAP targets cannot be served from this node", node)
        return False
    return True


async def run_storage_reconcilers(
    store: Store,
    node: str,
    recorder: EventRecorder,
    settings: StorageSettings,
    tgtd: TgtdSupervisor | None = None,
) -> None:
    """Run the Bond, IscsiTarget and VolumeGroup reconcilers of `node` until cancelled;
    first start tgtd through `tgtd` if it is given and no tgtd answers."""
    if tgtd is not None:
        await tgtd.ensure_running()
    informers = SharedInformers(store, settings.resync_period)
    bonds = _Kind(
        informers.informer("Bond"),
        node,
        BondReconciler(store, node, recorder, netns=settings.netns),
    )
    targets = _Kind(
        informers.informer("IscsiTarget"),
        node,
        IscsiTargetReconciler(store, node, recorder, TgtAdm(settings.tgtd_control_port)),
    )
    vgs = _Kind(
        informers.informer("VolumeGroup"),
        node,
        VolumeGroupReconciler(store, node, recorder, settings.lvm),
    )
    if await _may_read_secrets(store, node):
        informers.informer("Secret").add_handler(
            targets.mapped(
                lambda s: (
                    targets_using_secret(targets.informer.list(), s.metadata.name)
                    if isinstance(s, Secret)
                    else []
                )
            )
        )
    informers.informer("VirtualMachine").add_handler(
        vgs.mapped(
            lambda vm: (
                volume_groups_used_by(vgs.informer.list(), vm)
                if isinstance(vm, VirtualMachine)
                else []
            )
        )
    )
    informers.informer("ClusterNode").add_handler(
        bonds.mapped(
            lambda n: (
                [b.metadata.name for b in bonds.informer.list()] if n.metadata.name == node else []
            )
        )
    )
    kinds = {"Bond": bonds, "IscsiTarget": targets, "VolumeGroup": vgs}
    try:
        informers.start()
        await informers.wait_for_sync()
        async with asyncio.TaskGroup() as group:
            for kind, work in kinds.items():
                record = _recording(store, kind, recorder)
                group.create_task(
                    run_workers(work.queue, work.reconciler, settings.workers, record, record),
                    name=f"{kind} workers",
                )
            group.create_task(
                watch_bond_links(settings.netns, node, bonds.informer, bonds), name="link watch"
            )
    finally:
        for work in kinds.values():
            work.queue.shutdown()
        await informers.stop()
