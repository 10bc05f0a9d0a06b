"""The host agent: `kvmctl agent --node NAME`, one per KVM host.

It waits for its ClusterNode object, reports the host in the node's status (capacity, agent
version, addresses, conditions, `lastHeartbeatTime` every `status_interval`:
`controller/agent_status.py`), keeps its heartbeat lease (`controller/runtime/heartbeat.py`)
and runs the host's reconcilers, all Controllers of one `Manager` over one shared cache:
VirtualMachines (`reconcilers/virtualmachine.py`), the source side of live migrations
(`reconcilers/migration.py`) and the Bond, IscsiTarget and VolumeGroup loops
(`reconcilers/storage.py`); the heartbeat, the node status, the direct heartbeats, the HA report
and the storage-path watch (`controller/ha/storage_watch.py`, every `storage_check_interval`)
run beside them as the manager's background tasks. With `domain.lvm` set the VM and migration
reconcilers manage the activation of the VMs' LVs (claimed and activated before a start,
released after a stop, handed over during a migration; docs/storage.md).

Libvirt lifecycle and watchdog events enqueue the VM of the same name through the VM
controller's queue (a `Source`), so a crashed or watchdog-reset guest is seen at once; the
informers resync every `resync_period`. The VM controller's queue takes only the VMs that
concern this node (placed here, with a domain here, migrating to or from here:
`controller/agent_vms.py`), so a resync reconciles this host's VMs, not the cluster's. A lost
libvirt connection is reopened, and every domain and every VM of this node is looked at again
(`controller/agent_libvirt.py`).

Starting a domain needs a valid heartbeat lease and a node that is not being fenced, and the
reconciler re-reads the VM from etcd right before: a VM the controller moved away while this
node was cut off is never started here from stale information. A node relying on self-fencing
destroys its domains when its lease runs out (`controller/agent_fence.py`).

With `peers` set (the default), it also sends a direct heartbeat to every ClusterNode's
cluster address every `peers.interval` (`controller/runtime/peers.py`): the controllers' fast
detector.

SIGTERM stops the agent cleanly; the guests keep running (like libvirtd).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from controller.agent_fence import SelfFence
from controller.agent_libvirt import LibvirtLink
from controller.agent_node import OwnNodeChanges
from controller.agent_status import AGENT_VERSION, NodeStatusReporter
from controller.agent_vms import NodeVms
from controller.ha.agent_rules import start_blocker
from controller.ha.agent_side import HaReporter
from controller.ha.environment import HaTimings
from controller.ha.storage_watch import from_informers
from controller.runtime.controller import Controller, Source, Watch
from controller.runtime.defaults import DEFAULT_MIGRATION_CONCURRENCY
from controller.runtime.events import EventRecorder
from controller.runtime.heartbeat import Heartbeat, HeartbeatTiming, Watchdog, boot_id
from controller.runtime.informer import EventType, KeySink, SharedInformers
from controller.runtime.layout import node_writer
from controller.runtime.manager import Background, Manager
from controller.runtime.peers import PeerSender, PeerSettings
from controller.runtime.store import Store, StoreError
from crds import AnyResource, ClusterNode, VirtualMachineMigration
from reconcilers.drivers.libvirt import DomainEvent, LibvirtHost, WatchdogEvent
from reconcilers.migration import MigrationRunner
from reconcilers.storage import StorageSettings, may_read_secrets, storage_controllers
from reconcilers.tgtd_supervisor import TgtdSupervisor
from reconcilers.virtualmachine import DomainSettings, VirtualMachineReconciler

log = logging.getLogger(__name__)

VM_CONTROLLER = "virtualmachine"


@dataclass(frozen=True)
class AgentSettings:
    node: str
    libvirt_uri: str
    domain: DomainSettings = field(default_factory=DomainSettings)
    heartbeat: HeartbeatTiming = field(default_factory=HeartbeatTiming)
    watchdog: Path | None = None
    resync_period: float = 30.0
    status_interval: float = 30.0
    """How often lastHeartbeatTime (and capacity) is written to the ClusterNode status."""
    migration_concurrency: int = DEFAULT_MIGRATION_CONCURRENCY
    vm_workers: int = 16
    """VMs reconciled at once (a key is never on two workers; each start still re-reads the
    VM from etcd first): a failover's starts in one wave, not several (docs/benchmarks.md)."""
    storage: StorageSettings | None = field(default_factory=StorageSettings)
    """Bond, IscsiTarget and VolumeGroup reconcilers for this node (None: do not run them)."""
    tgtd_portal: str | None = None
    """Start a tgtd serving this portal when none answers (a storage node)."""
    peers: PeerSettings | None = field(default_factory=PeerSettings)
    """Where to send direct heartbeats (None: do not send them)."""
    storage_check_interval: float | None = 5.0
    """How often the storage paths the VMs need are checked (None: never; docs/ha.md)."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    """Where to serve /healthz and /metrics (None: not served; 0: any free port)."""


class Agent:
    """One host's agent; `run(stop)` until `stop` is set."""

    def __init__(self, store: Store, settings: AgentSettings) -> None:
        store = store.as_writer(node_writer(settings.node))  # it writes only its node's parts
        self.store = store
        self.settings = settings
        self.node = settings.node
        self.informers = SharedInformers(store, settings.resync_period)
        self.vms = self.informers.informer("VirtualMachine")
        self.migrations = self.informers.informer("VirtualMachineMigration")
        self.nodes = self.informers.informer("ClusterNode")
        self.iscsi_targets = self.informers.informer("IscsiTarget")
        self.recorder = EventRecorder(store, "kvmctl-agent", settings.node)
        self.manager: Manager | None = None
        """The manager running the agent's loops (created by `run`)."""
        self.self_fence_victims: set[str] = set()
        """The VMs a self-fence destroyed, until started again (`controller/agent_fence.py`)."""
        self.vm_reconciler = VirtualMachineReconciler(
            self.node,
            store,
            self.vms,
            self.migrations,
            self.iscsi_targets,
            self.nodes,
            self.recorder,
            settings.domain,
            self.start_blocker,
            self.self_fence_victims,
        )
        self.migration_runner = MigrationRunner(
            self.node,
            store,
            self.migrations,
            self.vms,
            self.nodes,
            self.recorder,
            settings.migration_concurrency,
            lvm=settings.domain.lvm,
        )
        self.fence = SelfFence(
            self.node,
            settings.heartbeat,
            self.own_node,
            lambda: self.host,
            self.vms,
            self.migration_runner,
            self.recorder,
            self.self_fence_victims,
        )
        watchdog = Watchdog(settings.watchdog) if settings.watchdog is not None else None
        # Each renewal is an answer from the etcd member in use: probed only when renewals stop.
        store.client.probe_after_silence(settings.heartbeat.renew_interval)
        self.heartbeat = Heartbeat(
            store.client,
            store.prefix,
            self.node,
            AGENT_VERSION,
            settings.heartbeat,
            self.fence.enabled,
            self.fence.fence,
            self._healthy,
            watchdog,
        )
        lvm = None if settings.domain.lvm is None else settings.domain.lvm.driver()
        self.storage_watch = from_informers(self.node, self.informers, lvm)
        """Reports the storage paths lost on this node (ClusterNode status.storageLost)."""
        self.ha = HaReporter(store, self.node, HaTimings(), self.recorder)
        """Tells the HA controller which domains run here, and clears the node after a fence."""
        self._ha_news = OwnNodeChanges(self.node)
        self._vm_news = OwnNodeChanges(self.node)
        """Which changes of this node wake the HA report, and the VM reconciles (agent_node.py)."""
        self.nodes.add_handler(self._wake_ha_report)
        self.vm_filter = NodeVms(self.node, self.migrations)
        """Which VMs the VM controller's queue takes (`controller/agent_vms.py`)."""
        self.libvirt = LibvirtLink(
            self.node, settings.libvirt_uri, self.vms, self.vm_filter, self.domain_event, self._use
        )
        self.status = NodeStatusReporter(
            store,
            self.node,
            settings.libvirt_uri,
            settings.status_interval,
            self.own_node,
            lambda: self.host,
        )
        """Writes this node's ClusterNode status (`controller/agent_status.py`)."""
        self.ready = asyncio.Event()
        """Set once registered, connected to libvirt and reconciling."""

    @property
    def host(self) -> LibvirtHost | None:
        """The libvirt connection, None while there is none (`controller/agent_libvirt.py`)."""
        return self.libvirt.host

    def _use(self, host: LibvirtHost | None) -> None:
        self.vm_reconciler.host = self.migration_runner.host = host

    # -- state the reconcilers and the heartbeat read ----------------------------------------

    def own_node(self) -> ClusterNode | None:
        node = self.nodes.get(self.node)
        return node if isinstance(node, ClusterNode) else None

    def start_blocker(self) -> str | None:
        """Why domains may not be started now, or None (`controller/ha/agent_rules.py`)."""
        node = self.own_node()
        health = None if node is None else node.status.health
        return start_blocker(self.heartbeat.lease_valid(), self.heartbeat.self_fenced, health)

    def _peer_addresses(self) -> list[str]:
        return [
            str(node.spec.addresses.cluster)
            for node in self.nodes.list()
            if isinstance(node, ClusterNode)
        ]

    def _past_self_fence_deadline(self) -> bool:
        """Self-fenced and still without a lease: destroy anything that appears."""
        return self.heartbeat.self_fenced and not self.heartbeat.lease_valid()

    def _healthy(self) -> bool:
        """The agent's loops are alive (the caller runs on the event loop, so it turns)."""
        return self.manager is not None and self.manager.healthy()

    @property
    def vm_queue(self) -> KeySink | None:
        """Where to enqueue VirtualMachine names for this node's VM controller."""
        return None if self.manager is None else self.manager.queue(VM_CONTROLLER)

    # -- run ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Register, then reconcile until `stop` is set; raise if a part fails for good."""
        storage = self.settings.storage
        read_secrets = storage is not None and await may_read_secrets(self.store, self.node)
        manager = Manager(
            self.store,
            self._controllers(read_secrets),
            informers=self.informers,
            http_host=self.settings.metrics_host,
            http_port=self.settings.metrics_port,
            component="kvmctl-agent",
            node=self.node,
            background=self._background(),
            setup=self._register,
            on_ready=self._running,
            teardown=self._teardown,
            close_store=False,
        )
        self.manager = manager
        stopping = asyncio.create_task(_stop_when_set(stop, manager))
        try:
            await manager.run(handle_signals=False)
        finally:
            stopping.cancel()

    def _controllers(self, read_secrets: bool) -> list[Controller]:
        """The VM and migration-source controllers, and the storage ones if configured."""
        recover = functools.partial(self.fence.recover, self.heartbeat)
        vms = Controller(
            VM_CONTROLLER,
            "VirtualMachine",
            self.vm_reconciler,
            self.settings.vm_workers,
            watches=[
                Watch("VirtualMachineMigration", _migrated_vm),
                Watch("ClusterNode", self._every_vm_if_mine),
                Watch("IscsiTarget", self._vms_using_target),
            ],
            predicate=self.vm_filter.concerns,
            sources=[
                Source("libvirt events", self.libvirt.run, unfiltered=True),
                Source("self-fence recovery", recover),
            ],
            on_not_ready=self.vm_reconciler.record,
        )
        migrations = Controller(
            "migration-source", "VirtualMachineMigration", self.migration_runner, 2
        )
        controllers = [vms, migrations]
        storage = self.settings.storage
        if storage is not None:
            controllers += storage_controllers(
                self.store, self.node, self.recorder, storage, self.informers, read_secrets
            )
        return controllers

    def _background(self) -> list[Background]:
        ha = lambda: self.ha.run(  # noqa: E731
            self.own_node, lambda: self.host, self._past_self_fence_deadline
        )
        background = [
            Background("heartbeat", self.heartbeat.run),
            Background("node status", self.status.run),
            Background("ha report", ha),
        ]
        if self.settings.peers is not None:
            background.append(Background("direct heartbeats", self._direct_heartbeats))
        interval = self.settings.storage_check_interval
        if interval is not None:
            storage = lambda: self.storage_watch.run(self.store, interval)  # noqa: E731
            background.append(Background("storage paths", storage))
        return background

    def _running(self) -> None:
        self.ready.set()
        log.info("agent of %s running", self.node)

    async def _direct_heartbeats(self) -> None:
        own = self.own_node()
        assert own is not None and self.settings.peers is not None, "registered, with peers"
        sender = PeerSender(
            self.node,
            "agent",
            boot_id(),
            str(own.spec.addresses.cluster),
            self._peer_addresses,
            self.settings.peers,
        )
        await sender.run()

    async def _teardown(self) -> None:
        await self.migration_runner.stop()
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(2):
                await self.status.write(stopping=True)
        await self.libvirt.close()
        log.info("agent of %s stopped; guests keep running", self.node)

    def _wake_ha_report(self, event: EventType, node: AnyResource) -> None:
        gone = event == "DELETED" and node.metadata.name == self.node
        if self._ha_news.changed(node) or gone:
            self.ha.wake()

    def _every_vm_if_mine(self, node: AnyResource) -> list[str]:
        """Every VM, when this node changed in what its VM reconciles decide on."""
        if not self._vm_news.changed(node):
            return []
        return [vm.metadata.name for vm in self.vms.list()]

    def _vms_using_target(self, target: AnyResource) -> Iterable[str]:
        for vm in self.vms.list():
            disks = vm.spec.disks
            if any(d.iscsi is not None and d.iscsi.target == target.metadata.name for d in disks):
                yield vm.metadata.name

    async def _register(self) -> None:
        """Wait for the ClusterNode object and libvirt, then write the node's status (and
        start tgtd on a storage node when none answers)."""
        if self.own_node() is None:
            log.warning("waiting for ClusterNode %s to be created", self.node)
            created = asyncio.Event()
            self.nodes.add_handler(
                lambda _type, obj: created.set() if obj.metadata.name == self.node else None
            )
            if self.own_node() is None:
                await created.wait()
        await self.libvirt.open()
        await self.status.write()
        storage = self.settings.storage
        if storage is not None and self.settings.tgtd_portal is not None:
            await TgtdSupervisor(
                self.settings.tgtd_portal, storage.tgtd_control_port
            ).ensure_running()

    # -- libvirt -----------------------------------------------------------------------------

    def domain_event(self, event: DomainEvent, vm_queue: KeySink) -> None:
        """Enqueue the VM of a libvirt event; a watchdog firing is remembered for the VM's next
        reconcile to count."""
        if isinstance(event, WatchdogEvent):
            self.vm_reconciler.health.watchdog_fired(event.name, event.action)
        self.vm_filter.domain_event(event)
        vm_queue.add(event.name)
        self.ha.wake()


def _migrated_vm(migration: AnyResource) -> list[str]:
    return [migration.spec.vm] if isinstance(migration, VirtualMachineMigration) else []


async def _stop_when_set(stop: asyncio.Event, manager: Manager) -> None:
    await stop.wait()
    manager.stop()
