"""What `kvmctl dashboard` shows, as JSON: a pure function of the objects the informers hold.

`snapshot` is the document of `/api/snapshot` and of every Server-Sent Event of `/api/stream`:
the controllers' leader (identity, node, term), the hosts (their health, heartbeat age, fencing
and the VMs placed on each), the VMs (where each runs), the latest Events, and the failover
timeline: the Events the HA engine records on the way from a
lost host to its VMs running elsewhere (NodeLost, FencingStarted, NodeFenced, VMPlaced ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from controller.runtime.leader_record import LeaderInfo
from crds import ClusterNode, Event, VirtualMachine

EVENTS_SHOWN = 50
TIMELINE_SHOWN = 30
FAILOVER_REASONS = frozenset(
    {
        "NodeLost",
        "FencingStarted",
        "FencingFailed",
        "NodeFenced",
        "NodeOnline",
        "VMPlaced",
        "VMRelocating",
        "VMRestarted",
        "VMRecovered",
        "VMFailed",
        "AckedNodeWasRunning",
    }
)
"""The Events of a failover, as controller/ha/engine.py and the agents record them."""


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="seconds")


def vm_row(vm: VirtualMachine) -> dict[str, Any]:
    """A VM's node (where it is placed), its state as the agent reports it, and since when."""
    status = vm.status
    failed = status.condition("Failed")
    placement = status.placement
    if failed is not None and failed.status == "True":
        node, state, since = None, "Failed", failed.last_transition_time
    elif placement is None:
        pending = vm.spec.run_state == "started"
        node, state, since = None, "Pending" if pending else "Stopped", None
    else:
        reported = status.state if status.node == placement.node else "Starting"
        node, state, since = placement.node, reported, placement.since
    return {
        "name": vm.metadata.name,
        "runState": vm.spec.run_state,
        "node": node,
        "state": state,
        "since": _time(since),
        "message": status.message,
    }


def leader_row(leader: LeaderInfo | None) -> dict[str, Any] | None:
    if leader is None:
        return None
    return {
        "identity": leader.identity,
        "node": leader.node,
        "term": leader.token,
        "since": _time(leader.since),
    }


def node_row(
    node: ClusterNode, vms: list[dict[str, Any]], heartbeat_age: float | None
) -> dict[str, Any]:
    """`heartbeatAgeSeconds`: since the agent last renewed its heartbeat lease (None: no
    heartbeat key, the node is lost or its agent never ran)."""
    fence = node.status.fence
    return {
        "name": node.metadata.name,
        "health": node.status.health,
        "cordoned": node.spec.cordoned,
        "message": node.status.message,
        "heartbeatAgeSeconds": heartbeat_age,
        "fence": None
        if fence is None or fence.how is None
        else {"how": fence.how, "method": fence.method, "confirmedAt": _time(fence.confirmed_at)},
        "vms": sorted(vm["name"] for vm in vms if vm["node"] == node.metadata.name),
    }


def event_row(event: Event) -> dict[str, Any]:
    spec = event.spec
    return {
        "name": event.metadata.name,
        "time": _time(spec.last_timestamp),
        "firstTime": _time(spec.first_timestamp),
        "type": spec.type,
        "reason": spec.reason,
        "kind": spec.involved_object.kind,
        "object": spec.involved_object.name,
        "count": spec.count,
        "message": spec.message,
        "source": spec.source.node or spec.source.component,
    }


def _recency(event: Event) -> tuple[datetime, int]:
    """Newest first; within one second (timestamps are whole seconds), the last written."""
    return event.spec.last_timestamp, int(event.metadata.resource_version or 0)


def snapshot(
    nodes: Iterable[ClusterNode],
    vms: Iterable[VirtualMachine],
    events: Iterable[Event],
    revision: int,
    leader: LeaderInfo | None,
    heartbeat_ages: dict[str, float | None],
) -> dict[str, Any]:
    """The whole view; `revision` is the etcd revision of the objects it shows."""
    vm_rows = [vm_row(vm) for vm in sorted(vms, key=lambda vm: vm.metadata.name)]
    node_rows = [
        node_row(n, vm_rows, heartbeat_ages.get(n.metadata.name))
        for n in sorted(nodes, key=lambda n: n.metadata.name)
    ]
    latest = sorted(events, key=_recency, reverse=True)
    timeline = [e for e in latest if e.spec.reason in FAILOVER_REASONS][:TIMELINE_SHOWN]
    return {
        "revision": revision,
        "generatedAt": _time(datetime.now(UTC)),
        "leader": leader_row(leader),
        "nodes": node_rows,
        "vms": vm_rows,
        "events": [event_row(e) for e in latest[:EVENTS_SHOWN]],
        "timeline": [event_row(e) for e in reversed(timeline)],
    }
