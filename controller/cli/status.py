"""`kvmctl status`: the cluster at a glance, like crm_mon.

The view is made of `Section`s, each a pure function of one `ClusterState` read from etcd: its
JSON data (`-o json`) and its text lines. To show more, append a Section to `SECTIONS`.

Exit codes (also for monitoring scripts): 0 healthy, 1 error, 2 usage, and
`NO_QUORUM` (3) etcd has no quorum, `NO_LEADER` (4) no controller leads,
`ALL_NODES_LOST` (5) no node has a heartbeat (the first that applies; status_checks.py). With
`--check`: one line (`OK: ...` or `DEGRADED: ...`), and `DEGRADED` (6) when the cluster works
short of healthy: an etcd member unhealthy, a node that takes VMs (not cordoned) not Online, a
started VM Failed or not placed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from controller import printers
from controller.ha import admission, requests
from controller.runtime.config import Settings
from controller.runtime.etcd_health import EtcdHealth, etcd_health, heartbeat_ages, read_leader
from controller.runtime.leader_record import LeaderInfo
from controller.runtime.store import Store, StoreError
from crds import AnyResource, ClusterNode, Event, VirtualMachine, VirtualMachineMigration
from crds.clusterpolicy import POLICY_NAME

from .connect import settings_from
from .status_checks import (
    check_line,
    degradations,
    exit_code,
    problems,
)

WARNINGS_WINDOW = timedelta(hours=1)
WARNINGS_SHOWN = 10
FINISHED = ("Succeeded", "Failed")


@dataclass
class ClusterState:
    """Everything the sections show, read once."""

    leader: LeaderInfo | None
    nodes: list[ClusterNode]
    vms: list[VirtualMachine]
    migrations: list[VirtualMachineMigration]
    events: list[Event]
    heartbeats: dict[str, float | None]
    draining: set[str]
    policy: AnyResource | None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Section:
    name: str
    data: Callable[[ClusterState], Any]
    """JSON-able data of the section."""
    text: Callable[[Any], list[str]]
    """The section's lines, from its data."""


def register(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="etcd, leader, nodes, VMs, migrations and warnings (like crm_mon)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    once = status.add_mutually_exclusive_group()
    once.add_argument("-w", "--watch", action="store_true", help="refresh until interrupted")
    once.add_argument(
        "--check",
        action="store_true",
        help="one line, OK or DEGRADED, and exit 6 when degraded (for monitoring scripts)",
    )
    status.add_argument(
        "--interval", type=_positive, default=2.0, help="seconds between refreshes (2)"
    )
    status.set_defaults(func=run_status)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be in (0, 3600], got {text}")
    return value


# gathering -----------------------------------------------------------------------------------


def _of(kind: type[Any], objects: list[Any]) -> list[Any]:
    return [o for o in objects if isinstance(o, kind)]


async def read_state(store: Store) -> ClusterState:
    nodes: list[ClusterNode] = _of(ClusterNode, (await store.list_objects("ClusterNode"))[0])
    names = [node.metadata.name for node in nodes]
    migrations = (await store.list_objects("VirtualMachineMigration"))[0]
    return ClusterState(
        leader=await read_leader(store),
        nodes=nodes,
        vms=_of(VirtualMachine, (await store.list_objects("VirtualMachine"))[0]),
        migrations=_of(VirtualMachineMigration, migrations),
        events=_of(Event, (await store.list_objects("Event"))[0]),
        heartbeats=await heartbeat_ages(store, names),
        draining={n for n in names if await requests.read_drain(store, n) is not None},
        policy=await store.try_get("ClusterPolicy", POLICY_NAME),
    )


# sections ------------------------------------------------------------------------------------


def etcd_data(health: EtcdHealth) -> dict[str, Any]:
    members = [
        {
            "name": m.name,
            "endpoint": m.endpoint,
            "healthy": m.healthy,
            "leader": m.leader,
            "version": m.version,
            "raftTerm": m.raft_term,
            "dbSizeBytes": m.db_size,
            "error": m.error,
        }
        for m in health.members
    ]
    return {"quorum": health.quorum, "members": members}


def etcd_text(data: dict[str, Any]) -> list[str]:
    healthy = sum(1 for m in data["members"] if m["healthy"])
    quorum = "quorum" if data["quorum"] else "NO QUORUM"
    rows: list[list[object]] = [["ETCD MEMBER", "ENDPOINT", "HEALTH", "ROLE", "VERSION", "ERROR"]]
    for m in data["members"]:
        role = "leader" if m["leader"] else ("follower" if m["healthy"] else "-")
        health = "healthy" if m["healthy"] else "unhealthy"
        rows.append([m["name"], m["endpoint"], health, role, m["version"] or "-", m["error"] or ""])
    total = len(data["members"])
    return [f"etcd: {quorum}, {healthy}/{total} members healthy", printers.table(rows)]


def leader_data(state: ClusterState) -> dict[str, Any] | None:
    leader = state.leader
    if leader is None:
        return None
    return {
        "identity": leader.identity,
        "node": leader.node,
        "since": leader.since.isoformat(),
        "ageSeconds": int((state.now - leader.since).total_seconds()),
        "term": leader.token,
    }


def leader_text(data: dict[str, Any] | None) -> list[str]:
    if data is None:
        return ["Leader: none (no controller is running, or an election is under way)"]
    on = f" on {data['node']}" if data["node"] else ""
    since = datetime.fromisoformat(data["since"]).isoformat(timespec="seconds")
    return [
        f"Leader: {data['identity']}{on} since {since} ({_seconds(data['ageSeconds'])}), "
        f"term {data['term']}"
    ]


def _seconds(value: float) -> str:
    """An age in seconds as printers.age shows ages: 45s, 12m, 5h, 3d."""
    return printers.age(datetime.now(UTC) - timedelta(seconds=value))


def _scheduling(state: ClusterState, node: ClusterNode) -> str:
    if node.metadata.name in state.draining:
        return "draining"
    return "cordoned" if node.spec.cordoned else "enabled"


def _placed(state: ClusterState, node: str) -> int:
    return sum(1 for vm in state.vms if vm.status.placement and vm.status.placement.node == node)


def nodes_data(state: ClusterState) -> list[dict[str, Any]]:
    rows = []
    for node in state.nodes:
        name = node.metadata.name
        fence = node.status.fence
        rows.append(
            {
                "name": name,
                "health": node.status.health,
                "heartbeatAgeSeconds": state.heartbeats.get(name),
                "scheduling": _scheduling(state, node),
                "vms": _placed(state, name),
                "fence": None
                if fence is None or fence.how is None
                else {
                    "how": fence.how,
                    "method": fence.method,
                    "confirmedAt": fence.confirmed_at.isoformat() if fence.confirmed_at else None,
                },
            }
        )
    return rows


def nodes_text(data: list[dict[str, Any]]) -> list[str]:
    if not data:
        return ["No ClusterNodes."]
    rows: list[list[object]] = [["NODE", "HEALTH", "HEARTBEAT", "SCHEDULING", "VMS", "FENCE"]]
    for n in data:
        age = n["heartbeatAgeSeconds"]
        fence = "-"
        if n["fence"] is not None:
            method = f" ({n['fence']['method']})" if n["fence"]["method"] else ""
            confirmed = n["fence"]["confirmedAt"]
            when = printers.age(datetime.fromisoformat(confirmed)) if confirmed else "?"
            fence = f"{n['fence']['how']}{method} {when} ago"
        heartbeat = "lost" if age is None else f"{age:.0f}s"
        rows.append([n["name"], n["health"], heartbeat, n["scheduling"], n["vms"], fence])
    return [printers.table(rows)]


def _vm_columns(vm: VirtualMachine) -> tuple[str, str, str]:
    """Node, state and since when, as clustat shows a service's owner and state."""
    status = vm.status
    failed = status.condition("Failed")
    if failed is not None and failed.status == "True":
        return "-", "Failed", printers.age(failed.last_transition_time)
    placement = status.placement
    if placement is None:
        return "-", "Stopped" if vm.spec.run_state != "started" else "Pending", "-"
    state = status.state if status.node == placement.node else "Starting"
    return placement.node, state, printers.age(placement.since)


def vms_data(state: ClusterState) -> list[dict[str, Any]]:
    rows = []
    for vm in state.vms:
        node, shown, since = _vm_columns(vm)
        rows.append(
            {
                "name": vm.metadata.name,
                "runState": vm.spec.run_state,
                "node": None if node == "-" else node,
                "state": shown,
                "since": since,
            }
        )
    return rows


def vms_text(data: list[dict[str, Any]]) -> list[str]:
    if not data:
        return ["No VirtualMachines."]
    rows: list[list[object]] = [["VM", "RUNSTATE", "NODE", "STATE", "SINCE"]]
    rows += [[v["name"], v["runState"], v["node"] or "-", v["state"], v["since"]] for v in data]
    return [printers.table(rows)]


def migrations_data(state: ClusterState) -> list[dict[str, Any]]:
    return [
        {
            "name": m.metadata.name,
            "vm": m.spec.vm,
            "source": m.status.source_node,
            "target": m.spec.target_node,
            "phase": m.status.phase,
            "progressPercent": m.status.progress_percent,
            "dataRemainingBytes": m.status.data_remaining_bytes,
        }
        for m in state.migrations
        if m.status.phase not in FINISHED
    ]


def migrations_text(data: list[dict[str, Any]]) -> list[str]:
    if not data:
        return ["No migrations in flight."]
    rows: list[list[object]] = [["MIGRATION", "VM", "FROM", "TO", "PHASE", "PROGRESS", "LEFT"]]
    for m in data:
        left = m["dataRemainingBytes"]
        rows.append(
            [
                m["name"],
                m["vm"],
                m["source"] or "-",
                m["target"],
                m["phase"],
                f"{m['progressPercent']}%",
                "-" if left is None else printers.size(left),
            ]
        )
    return [printers.table(rows)]


def warnings_data(state: ClusterState) -> list[dict[str, Any]]:
    since = state.now - WARNINGS_WINDOW
    recent = sorted(
        (e for e in state.events if e.spec.type == "Warning" and e.spec.last_timestamp >= since),
        key=lambda e: e.spec.last_timestamp,
        reverse=True,
    )
    return [
        {
            "lastTimestamp": e.spec.last_timestamp.isoformat(),
            "reason": e.spec.reason,
            "object": f"{e.spec.involved_object.kind.lower()}/{e.spec.involved_object.name}",
            "count": e.spec.count,
            "message": e.spec.message,
        }
        for e in recent[:WARNINGS_SHOWN]
    ]


def warnings_text(data: list[dict[str, Any]]) -> list[str]:
    if not data:
        return [f"No warnings in the last {WARNINGS_WINDOW.seconds // 60} minutes."]
    rows: list[list[object]] = [["LAST SEEN", "REASON", "OBJECT", "COUNT", "MESSAGE"]]
    for w in data:
        seen = printers.age(datetime.fromisoformat(w["lastTimestamp"]))
        rows.append([seen, w["reason"], w["object"], w["count"], w["message"]])
    return ["Recent warnings:", printers.table(rows)]


SECTIONS: list[Section] = [
    Section("leader", leader_data, leader_text),
    Section("nodes", nodes_data, nodes_text),
    Section("vms", vms_data, vms_text),
    Section("migrations", migrations_data, migrations_text),
    Section("warnings", warnings_data, warnings_text),
    Section(
        "admission",
        lambda state: admission.status_line(state.policy, [*state.nodes, *state.vms]),
        lambda line: [line],
    ),
]


# the report ----------------------------------------------------------------------------------


async def gather(store: Store, settings: Settings) -> dict[str, Any]:
    """The whole report as JSON-able data: etcd, then each section, then the problems."""
    health = await etcd_health(store, settings.tls)
    report: dict[str, Any] = {"etcd": etcd_data(health)}
    if health.quorum:
        state = await read_state(store)
        for section in SECTIONS:
            report[section.name] = section.data(state)
    report["problems"] = [message for _, message in problems(report)]
    report["degraded"] = degradations(report)
    return report


def render(report: dict[str, Any]) -> str:
    lines = etcd_text(report["etcd"])
    for section in SECTIONS:
        if section.name in report:
            lines += ["", *section.text(report[section.name])]
    if report["problems"]:
        lines += ["", *(f"PROBLEM: {p}" for p in report["problems"])]
    return "\n".join(lines)


async def run_status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    store = settings.store()
    try:
        while True:
            try:
                report = await gather(store, settings)
            except StoreError as error:
                if not args.watch:
                    raise
                report = {"etcd": {"quorum": False, "members": []}, "problems": [str(error)]}
            if args.check and args.output == "text":
                print(check_line(report), flush=True)
            else:
                _show(report, args.output, args.watch)
            if not args.watch:
                return exit_code(report, args.check)
            await asyncio.sleep(args.interval)
    finally:
        await store.close()


def _show(report: dict[str, Any], output: str, watch: bool) -> None:
    """Once: indented JSON or text. Watching: one JSON line per refresh, or the text redrawn
    in place on a terminal (one block after another otherwise)."""
    if output == "json":
        print(json.dumps(report, indent=None if watch else 2), flush=True)
        return
    if watch and sys.stdout.isatty():
        sys.stdout.write("\x1b[H\x1b[2J")
    print(render(report), flush=True)
