"""The host agent's report in its ClusterNode's status (`controller/agent.py`).

Capacity from libvirt unless `spec.capacity` overrides it, agent version, the libvirt URI peers
use, the migration address, the `Ready`/`AgentReady` conditions and `lastHeartbeatTime`, written
at registration and every `status_interval`; on stop, `AgentReady` turns False.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

from controller.runtime.store import Store, StoreError
from crds import ClusterNode
from crds.clusternode import Capacity
from crds.libvirt_uri import peer_uri_or_none
from crds.meta import now
from reconcilers.drivers.libvirt import LibvirtError, LibvirtHost

log = logging.getLogger(__name__)

AGENT_VERSION = importlib.metadata.version("kvmctl")


class NodeStatusReporter:
    """Writes node `node`'s status: `write()` once, `run()` every `interval`."""

    def __init__(
        self,
        store: Store,
        node: str,
        libvirt_uri: str,
        interval: float,
        own_node: Callable[[], ClusterNode | None],
        host: Callable[[], LibvirtHost | None],
    ) -> None:
        self.store = store
        self.node = node
        self.libvirt_uri = libvirt_uri
        self.interval = interval
        self.own_node = own_node
        self.host = host

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.write()
            except (StoreError, LibvirtError) as error:
                log.warning("node status of %s not written: %s", self.node, error)

    async def write(self, stopping: bool = False) -> None:
        node = self.own_node()
        host = self.host()
        if node is None:
            return
        capacity = node.spec.capacity
        if capacity is None and host is not None and not stopping:
            info = await host.node_info()
            capacity = Capacity(cpus=info.cpus, memory_mib=max(64, info.memory_mib))
        # Peers migrate to it: a local-only URI (a socket path, test://) is not reported.
        libvirt_uri = node.spec.libvirt_uri or peer_uri_or_none(self.libvirt_uri)
        address = str(node.spec.addresses.cluster)

        def mutate(current: Any) -> bool:
            status = current.status
            if stopping:
                status.set_condition("AgentReady", "False", "AgentStopped", "agent stopped")
                return True
            if capacity is not None:
                status.capacity = capacity
            status.agent_version = AGENT_VERSION
            status.libvirt_uri = libvirt_uri
            status.migration_address = address
            status.last_heartbeat_time = now()
            message = f"agent {AGENT_VERSION} on {self.node} with {self.libvirt_uri}"
            status.set_condition("AgentReady", "True", "AgentRunning", message)
            if status.condition("Ready") is None or status.health in ("Online", "Unknown"):
                status.set_condition("Ready", "True", "AgentRunning", message)
            return True

        await self.store.patch_status("ClusterNode", self.node, mutate)
