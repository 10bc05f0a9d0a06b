"""Hand-built views of a cluster for the HA engine and placement: nodes, VMs, a world."""

from __future__ import annotations

from typing import Any

from controller.ha.environment import NodeView, VmView, World
from crds.clusternode import ClusterNodeSpec, NodeHealth
from crds.virtualmachine import VirtualMachineSpec


def node(
    name: str,
    health: NodeHealth = "Online",
    memory: int | None = 8192,
    lease: bool = True,
    fencing: dict[str, Any] | None = None,
    cordoned: bool = False,
    domains: frozenset[str] = frozenset(),
    lost_at: float | None = None,
    ack_at: float | None = None,
) -> NodeView:
    spec = ClusterNodeSpec.model_validate(
        {"addresses": {"cluster": "10.0.0.1"}, "fencing": fencing or {}, "cordoned": cordoned}
    )
    return NodeView(
        name=name,
        spec=spec,
        health=health,
        fence=None,
        lease_alive=lease,
        lease_lost_at=None if lease else (lost_at if lost_at is not None else 0.0),
        clean_since=None,
        fence_ack_at=ack_at,
        domains=domains,
        cpus=8,
        memory_mib=memory,
    )


def vm(name: str, placement: str | None = None, state: str = "Running", **spec: Any) -> VmView:
    spec.setdefault("memoryMiB", 1024)
    return VmView(
        name=name,
        spec=VirtualMachineSpec.model_validate(spec),
        placement=placement,
        state=state,  # type: ignore[arg-type]
    )


def world(nodes: list[NodeView], vms: list[VmView], now: float = 10.0, **kw: Any) -> World:
    return World(now=now, nodes={n.name: n for n in nodes}, vms={v.name: v for v in vms}, **kw)
