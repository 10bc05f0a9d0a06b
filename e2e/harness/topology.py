"""The field topologies: etcd and the controllers on the hosts themselves, as users run them.

- `reference`: host1 and host2 run the VMs; `storage` runs tgtd, an etcd member and a
  controller, and no VM: its ClusterNode is cordoned (`storage_node`), which the HA engine's
  placement honours (controller/ha/placement.py), so no VM is ever placed or recovered there.
- `three-hosts`: host1..host3, each a KVM host with an etcd member and a controller; a storage
  host may be added (it then runs tgtd, an agent and a controller, but no etcd member: etcd
  keeps an odd member count).

`topology_cluster(name)` builds the `Cluster` (`topology_chaos_cluster(name)` the
`e2e.harness.chaos.ChaosCluster`, with a timing profile, for the failover bench);
`etcd_leader_host`, `roles` tell a test or the demo which host holds etcd's leader and which runs
the leading controller, so it can pick a victim by role. `e2e.harness.chaos.leader_host(store)` is
the leading controller alone. `lead_controllers_from` and `move_etcd_leader` arrange the roles
before a fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from typing import Any

from controller.runtime import layout_keys
from controller.runtime.store import Store, Unavailable
from crds import ClusterNode, ObjectMeta
from crds.clusternode import ClusterNodeSpec
from e2e.harness import polling
from e2e.harness.chaos import ChaosCluster, leader_host
from e2e.harness.cluster import Cluster, ClusterError
from e2e.harness.host_etcd import HostEtcdError

STORAGE_HOST = "storage"


@dataclass(frozen=True)
class Topology:
    """Which hosts run VMs, which one serves storage, which ones carry etcd's members."""

    name: str
    kvm_hosts: tuple[str, ...]
    storage_host: str | None
    etcd_hosts: tuple[str, ...]


REFERENCE = Topology(
    "reference", ("host1", "host2"), STORAGE_HOST, ("host1", "host2", STORAGE_HOST)
)
THREE_HOSTS = Topology(
    "three-hosts", ("host1", "host2", "host3"), None, ("host1", "host2", "host3")
)
TOPOLOGIES = {shape.name: shape for shape in (REFERENCE, THREE_HOSTS)}


def topology(name: str, *, storage: bool = False) -> Topology:
    """A named topology; `storage` adds the storage host to `three-hosts` (`reference` has it)."""
    try:
        shape = TOPOLOGIES[name]
    except KeyError:
        raise ClusterError(f"unknown topology {name!r}: one of {', '.join(TOPOLOGIES)}") from None
    if storage and shape.storage_host is None:
        return Topology(shape.name, shape.kvm_hosts, STORAGE_HOST, shape.etcd_hosts)
    return shape


def topology_cluster(name: str, *, storage: bool = False, **options: Any) -> Cluster:
    """A `Cluster` (not started) in topology `name`; `options` go to `Cluster`."""
    shape = topology(name, storage=storage)
    return Cluster(shape.kvm_hosts, shape.storage_host, etcd_hosts=shape.etcd_hosts, **options)


def topology_chaos_cluster(name: str, **options: Any) -> ChaosCluster:
    """A `ChaosCluster` (not started) in topology `name`, a controller on every host; `options`
    go to `ChaosCluster` (profile, watchdog...)."""
    shape = topology(name)
    hosts = (*shape.kvm_hosts, *([shape.storage_host] if shape.storage_host else []))
    return ChaosCluster(
        shape.kvm_hosts,
        storage_host=shape.storage_host,
        etcd_hosts=shape.etcd_hosts,
        controller_hosts=hosts,
        **options,
    )


def storage_node(cluster: Cluster) -> ClusterNode:
    """The storage host's ClusterNode: cordoned, so no VM is placed there; no fencing (it runs
    no VM, so its death never needs one)."""
    if cluster.storage_host is None:
        raise ClusterError("this cluster has no storage host")
    spec = {"addresses": {"cluster": cluster.host(cluster.storage_host).address}, "cordoned": True}
    return ClusterNode(
        metadata=ObjectMeta(name=cluster.storage_host), spec=ClusterNodeSpec.model_validate(spec)
    )


async def node_online(store: Store, name: str) -> bool:
    """The host holds its heartbeat and its ClusterNode says Online."""
    if await store.client.get(store.raw_key(layout_keys.heartbeat(name))) is None:
        return False
    node = await store.get("ClusterNode", name)
    return isinstance(node, ClusterNode) and node.status.health == "Online"


async def node_down(store: Store, name: str) -> bool:
    """The cluster is done with the host's loss: Fenced (a fence confirmed: the standby fences a
    leading controller's host before it takes over) or Offline (nothing ran there, no fence)."""
    node = await store.get("ClusterNode", name)
    return isinstance(node, ClusterNode) and node.status.health in ("Fenced", "Offline")


async def hosts_not_online(cluster: Cluster, store: Store) -> list[str]:
    """The hosts that do not hold a heartbeat or whose ClusterNode is not Online."""
    return [name for name in cluster.lab.hosts if not await node_online(store, name)]


async def every_host_online(cluster: Cluster, store: Store) -> bool:
    return not await hosts_not_online(cluster, store)


def etcd_leader_host(cluster: Cluster) -> str | None:
    """The host holding etcd's leader (None during an election). Blocking: it runs etcdctl."""
    if cluster.host_etcd is None:
        raise ClusterError("etcd does not run inside the hosts of this cluster")
    return cluster.host_etcd.leader()


async def roles(cluster: Cluster, store: Store) -> dict[str, list[str]]:
    """Host -> the roles it holds now: "etcd leader", "etcd member", "leading controller",
    "controller"."""
    etcd_leader = await asyncio.to_thread(etcd_leader_host, cluster)
    controller_leader = await leader_host(store)
    held: dict[str, list[str]] = {name: [] for name in cluster.lab.hosts}
    for name in cluster.etcd_hosts:
        held[name].append("etcd leader" if name == etcd_leader else "etcd member")
    for name in cluster.controllers:
        held[name].append("leading controller" if name == controller_leader else "controller")
    return held


ROLE_TIMEOUT = 150.0
"""Generous: two loaded cores, and an etcd election may be under way."""
_eventually = partial(polling.eventually, timeout=ROLE_TIMEOUT, retry_on=(Unavailable,))


async def lead_controllers_from(cluster: Cluster, store: Store, hosts: Collection[str]) -> str:
    """Restart the leading controller (SIGTERM: it resigns, another takes over at once) until
    one on `hosts` leads; its host."""
    leader: str = await _eventually(partial(leader_host, store), "a leading controller")
    while leader not in hosts:
        await asyncio.to_thread(cluster.restart_controller, leader)

        async def moved(old: str = leader) -> str | None:
            now = await leader_host(store)
            return now if now not in (None, old) else None

        leader = await _eventually(moved, f"the controllers' leadership off {leader}")
    return leader


async def move_etcd_leader(cluster: Cluster, name: str) -> None:
    """Hand etcd's leadership to the member on host `name` and wait until it holds it."""
    host_etcd = cluster.host_etcd
    if host_etcd is None:
        raise ClusterError("etcd does not run inside the hosts of this cluster")

    async def there() -> bool:
        leader = await asyncio.to_thread(etcd_leader_host, cluster)
        if leader is not None and leader != name:
            await asyncio.to_thread(host_etcd.move_leader, name)
            leader = await asyncio.to_thread(etcd_leader_host, cluster)
        return leader == name

    retrying = partial(polling.eventually, timeout=ROLE_TIMEOUT, retry_on=(HostEtcdError,))
    await retrying(there, f"etcd's leader on {name}")
