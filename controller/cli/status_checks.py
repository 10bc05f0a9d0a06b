"""The verdicts of `kvmctl status` on its report: the problems (each with its exit code), what
`--check` calls degraded, and its one line."""

from __future__ import annotations

from typing import Any

NO_QUORUM = 3
NO_LEADER = 4
ALL_NODES_LOST = 5
DEGRADED = 6


def problems(report: dict[str, Any]) -> list[tuple[int, str]]:
    """What makes the cluster unhealthy, with the exit code of each, most serious first."""
    found: list[tuple[int, str]] = []
    if not report["etcd"]["quorum"]:
        found.append((NO_QUORUM, "etcd has no quorum"))
        return found
    if report["leader"] is None:
        found.append((NO_LEADER, "no controller leads"))
    nodes = report["nodes"]
    if nodes and all(n["heartbeatAgeSeconds"] is None for n in nodes):
        found.append((ALL_NODES_LOST, f"all {len(nodes)} nodes are lost (no heartbeat)"))
    return found


def degradations(report: dict[str, Any]) -> list[str]:
    """The problems, then what else is short of healthy while the cluster still works."""
    found = [message for _, message in problems(report)]
    members = report["etcd"]["members"]
    found += [f"etcd member {m['name']} is unhealthy" for m in members if not m["healthy"]]
    for node in report.get("nodes", []):
        if node["health"] != "Online" and node["scheduling"] == "enabled":
            found.append(f"node {node['name']} is {node['health']}")
    for vm in report.get("vms", []):
        if vm["runState"] == "started" and vm["state"] in ("Failed", "Pending"):
            found.append(f"vm {vm['name']} is {vm['state']}")
    return found


def check_line(report: dict[str, Any]) -> str:
    degraded = report["degraded"]
    if degraded:
        return "DEGRADED: " + "; ".join(degraded)
    members = report["etcd"]["members"]
    leader = report["leader"]["identity"]
    return (
        f"OK: etcd {len(members)}/{len(members)} members healthy, leader {leader}, "
        f"{len(report['nodes'])} nodes, {len(report['vms'])} VMs"
    )


def exit_code(report: dict[str, Any], check: bool = False) -> int:
    found = problems(report)
    if found:
        return found[0][0]
    return DEGRADED if check and report["degraded"] else 0
