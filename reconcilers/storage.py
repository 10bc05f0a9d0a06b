"""The agent's storage and network plumbing: Bond, IscsiTarget and VolumeGroup controllers.

`storage_controllers` registers the three with the agent's manager, on its shared cache. Each
handles only the objects that concern this node (`spec.node`, or for a VolumeGroup `spec.nodes`
containing it or empty), and is also enqueued by what it refers to: a Secret (CHAP) enqueues the
IscsiTargets using it (only when this node may read Secrets: `may_read_secrets`), a
VirtualMachine the VolumeGroups holding its disks, this node's ClusterNode every Bond; netlink
link events feed the Bond controller (a `Source`).

`run_storage_reconcilers` runs them on a manager of their own (first starting tgtd through the
`TgtdSupervisor` it is given when none answers), until cancelled. A tgtd started this way keeps
running when the loop stops (its sessions belong to the initiators); the caller owns the
supervisor and may `stop()` it.

    tgtd = TgtdSupervisor("10.0.1.1:3260")
    await run_storage_reconcilers(store, "host1", recorder, StorageSettings(), tgtd)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.runtime.controller import Controller, Source, Watch
from controller.runtime.events import EventRecorder
from controller.runtime.informer import DEFAULT_RESYNC_PERIOD, KeySink, SharedInformers
from controller.runtime.manager import Manager
from controller.runtime.store import PermissionDenied, Store
from crds import AnyResource, Bond, IscsiTarget, VirtualMachine, VolumeGroup
from reconcilers.bond import BondReconciler
from reconcilers.bond_links import watch_bond_links
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
    """For `run_storage_reconcilers`; in the agent the kinds share its cache and resync period."""


def on_this_node(obj: AnyResource, node: str) -> bool:
    """Whether `obj` (a Bond, IscsiTarget or VolumeGroup) is reconciled on `node`."""
    if isinstance(obj, Bond | IscsiTarget):
        return obj.spec.node == node
    if isinstance(obj, VolumeGroup):
        return not obj.spec.nodes or node in obj.spec.nodes
    return False


def targets_using_secret(targets: Iterable[AnyResource], secret: str) -> list[str]:
    """Names of the IscsiTargets whose CHAP credentials are in Secret `secret`."""
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


async def may_read_secrets(store: Store, node: str) -> bool:
    """Whether this node's etcd user may read Secrets (with RBAC, only storage nodes may)."""
    try:
        await store.list_objects("Secret")
    except PermissionDenied:
        log.info("%s may not read Secrets: CHAP targets cannot be served from this node", node)
        return False
    return True


def storage_controllers(
    store: Store,
    node: str,
    recorder: EventRecorder,
    settings: StorageSettings,
    informers: SharedInformers,
    read_secrets: bool,
) -> list[Controller]:
    """The Bond, IscsiTarget and VolumeGroup controllers of `node` (see the module docstring)."""
    bonds = informers.informer("Bond")
    targets = informers.informer("IscsiTarget")
    vgs = informers.informer("VolumeGroup")

    def mine(obj: AnyResource) -> bool:
        return on_this_node(obj, node)

    def secret_users(secret: AnyResource) -> list[str]:
        return targets_using_secret(targets.list(), secret.metadata.name)

    def vgs_of(vm: AnyResource) -> list[str]:
        return volume_groups_used_by(vgs.list(), vm) if isinstance(vm, VirtualMachine) else []

    def every_bond(changed: AnyResource) -> list[str]:
        return [b.metadata.name for b in bonds.list()] if changed.metadata.name == node else []

    async def link_events(sink: KeySink) -> None:
        await watch_bond_links(settings.netns, node, bonds, sink)

    workers = settings.workers
    return [
        Controller(
            "bond",
            "Bond",
            BondReconciler(store, node, recorder, netns=settings.netns),
            workers,
            watches=[Watch("ClusterNode", every_bond)],
            predicate=mine,
            sources=[Source("link watch", link_events)],
        ),
        Controller(
            "iscsitarget",
            "IscsiTarget",
            IscsiTargetReconciler(store, node, recorder, TgtAdm(settings.tgtd_control_port)),
            workers,
            watches=[Watch("Secret", secret_users)] if read_secrets else [],
            predicate=mine,
        ),
        Controller(
            "volumegroup",
            "VolumeGroup",
            VolumeGroupReconciler(store, node, recorder, settings.lvm),
            workers,
            watches=[Watch("VirtualMachine", vgs_of)],
            predicate=mine,
        ),
    ]


async def run_storage_reconcilers(
    store: Store,
    node: str,
    recorder: EventRecorder,
    settings: StorageSettings,
    tgtd: TgtdSupervisor | None = None,
) -> None:
    """Run the Bond, IscsiTarget and VolumeGroup controllers of `node` until cancelled, on a
    manager of their own (`store` stays open); first start tgtd through `tgtd` if it is given
    and no tgtd answers."""
    if tgtd is not None:
        await tgtd.ensure_running()
    informers = SharedInformers(store, settings.resync_period)
    read_secrets = await may_read_secrets(store, node)
    controllers = storage_controllers(store, node, recorder, settings, informers, read_secrets)
    manager = Manager(
        store,
        controllers,
        informers=informers,
        http_port=None,
        component=recorder.source.component,
        node=node,
        close_store=False,
    )
    await manager.run(handle_signals=False)
