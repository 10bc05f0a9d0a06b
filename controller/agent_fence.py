"""The host agent's self-fence hooks (`controller/agent.py`, `controller/runtime/heartbeat.py`).

When the heartbeat lease cannot be renewed in time on a node that relies on self-fencing,
`fence` destroys every kvmctl domain of the host through libvirt alone (no etcd) and remembers
the VMs it destroyed (`victims`: a self-fence is no crash). Once the lease is back, `recover`
records the fence and enqueues every VM again; the VM reconciler re-reads each VM from etcd
before starting it, so a VM the controller moved away meanwhile stays down here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from controller.runtime.events import EventRecorder
from controller.runtime.heartbeat import Heartbeat, HeartbeatTiming
from controller.runtime.informer import Informer, KeySink
from crds import AnyResource, ClusterNode
from reconcilers.drivers.libvirt import LibvirtHost, LibvirtUnavailable
from reconcilers.migration import MigrationRunner
from reconcilers.virtualmachine import destroy_every_domain

log = logging.getLogger(__name__)


class SelfFence:
    """Node `node`'s self-fence and the recovery after it; see the module docstring."""

    def __init__(
        self,
        node: str,
        timing: HeartbeatTiming,
        own_node: Callable[[], ClusterNode | None],
        host: Callable[[], LibvirtHost | None],
        vms: Informer[AnyResource],
        migration_runner: MigrationRunner,
        recorder: EventRecorder,
        victims: set[str],
    ) -> None:
        self.node = node
        self.timing = timing
        self.own_node = own_node
        self.host = host
        self.vms = vms
        self.migration_runner = migration_runner
        self.recorder = recorder
        self.victims = victims
        """The VMs a self-fence destroyed, until started again (shared with the reconciler)."""
        self._fenced_domains: list[str] = []

    def enabled(self) -> bool:
        node = self.own_node()
        return node is not None and node.spec.fencing.self_fence

    async def fence(self) -> None:
        """Destroy every kvmctl domain of this host now; libvirt only, no etcd."""
        host = self.host()
        if host is None:
            raise LibvirtUnavailable(f"self-fence of {self.node}: no libvirt connection")
        destroyed = await destroy_every_domain(host)
        log.error("self-fenced %s: destroyed %s", self.node, ", ".join(destroyed) or "nothing")
        self._fenced_domains = destroyed
        self.victims.update(destroyed)
        await self.migration_runner.stop()

    async def recover(self, heartbeat: Heartbeat, vm_queue: KeySink) -> None:
        """After a self-fence: once the lease is back, record it and look at every VM again."""
        while True:
            await asyncio.sleep(self.timing.renew_interval)
            if not heartbeat.self_fenced or not heartbeat.lease_valid():
                continue
            heartbeat.acknowledge_fence()
            fenced, self._fenced_domains = self._fenced_domains, []
            node = self.own_node()
            timing = heartbeat.last_self_fence
            if node is not None and timing is not None:
                renewed_at, destroyed_at = timing
                await self.recorder.record(
                    node,
                    "Warning",
                    "SelfFenced",
                    "%s could not renew its heartbeat lease in time and destroyed its VMs "
                    "%.2f s after its last renewal (lease TTL %d s): %s",
                    self.node,
                    destroyed_at - renewed_at,
                    self.timing.ttl,
                    ", ".join(fenced) or "none",
                )
            for vm in self.vms.list():
                vm_queue.add(vm.metadata.name)
