"""Node maintenance: `node drain|cordon|uncordon NODE` (also `kvmctl drain|cordon|uncordon`).

`drain --wait` streams the events of the node and of its VMs as they happen and ends when the
node is empty (exit 0), when every VM left is stuck (exit 1 at once, naming each and why), or at
`--timeout` (exit 1, naming what is left and why). A VM is stuck when it may not live-migrate
(without --force) or when the controller's latest word on it is a blocker (`VMNotMigratable`:
no eligible target, "host3 has 0 free vcpus").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from controller.ha import requests
from controller.runtime.store import Compacted, Conflict, NotFound, Store
from crds import ClusterNode, Event, VirtualMachine

from .resources import name_arg, store_from

DRAIN_POLL = 0.5
BLOCKERS = frozenset({"VMNotMigratable"})
"""Event reasons saying a VM cannot leave its node for now."""


def register(commands: Any) -> None:
    node = commands.add_parser("node", help="node maintenance: drain, cordon, uncordon")
    node_commands = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    for group in (node_commands, commands):  # `kvmctl node drain a` and `kvmctl drain a`
        _add_commands(group)


def _add_commands(group: Any) -> None:
    drain = group.add_parser(
        "drain",
        help="cordon a node and live-migrate every VM off it",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    drain.add_argument("node", type=name_arg)
    drain.add_argument(
        "--force",
        action="store_true",
        help="stop VMs that may not live-migrate and restart them elsewhere",
    )
    drain.add_argument("--wait", action="store_true", help="wait until the node is empty")
    drain.add_argument(
        "--timeout",
        "--wait-timeout",
        dest="wait_timeout",
        type=float,
        default=600.0,
        help="seconds --wait waits (600)",
    )
    drain.set_defaults(func=run_drain)
    cordon = group.add_parser("cordon", help="mark a node unschedulable (its VMs stay)")
    cordon.add_argument("node", type=name_arg)
    cordon.set_defaults(func=run_cordon)
    uncordon = group.add_parser("uncordon", help="let a node take VMs again (ends a drain)")
    uncordon.add_argument("node", type=name_arg)
    uncordon.set_defaults(func=run_uncordon)


async def get_node(store: Store, name: str) -> ClusterNode:
    node = await store.try_get("ClusterNode", name)
    if not isinstance(node, ClusterNode):
        raise NotFound(f"ClusterNode {name!r} not found")
    return node


async def _set_cordoned(store: Store, name: str, cordoned: bool) -> None:
    for _ in range(10):
        node = await get_node(store, name)
        if node.spec.cordoned == cordoned:
            return
        node.spec.cordoned = cordoned
        try:
            await store.update(node)
            return
        except Conflict:
            continue
    raise Conflict(f"ClusterNode {name!r} kept changing; try again")


async def placed_on(store: Store, node: str) -> list[VirtualMachine]:
    vms, _ = await store.list_objects("VirtualMachine")
    return [
        vm
        for vm in vms
        if isinstance(vm, VirtualMachine)
        and vm.status.placement is not None
        and vm.status.placement.node == node
    ]


class Blockers:
    """What keeps each VM on the node: the latest event about it, when that is a blocker."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.latest: dict[str, Event] = {}

    def saw(self, event: Event) -> None:
        involved = event.spec.involved_object
        if involved.kind != "VirtualMachine":
            return
        known = self.latest.get(involved.name)
        if known is None or known.spec.last_timestamp <= event.spec.last_timestamp:
            self.latest[involved.name] = event

    def why(self, vm: VirtualMachine) -> str | None:
        """Why `vm` cannot leave, or None when it may (or nobody said otherwise yet)."""
        if not self.force and not vm.spec.migration.allowed:
            return "live migration is not allowed (--force stops it and restarts it elsewhere)"
        event = self.latest.get(vm.metadata.name)
        if event is not None and event.spec.reason in BLOCKERS:
            return f"{event.spec.reason}: {event.spec.message}"
        return None


def _event_line(event: Event) -> str:
    involved = event.spec.involved_object
    return f"{involved.kind.lower()}/{involved.name}: {event.spec.reason}: {event.spec.message}"


async def run_drain(args: argparse.Namespace) -> int:
    name = args.node
    async with store_from(args) as store:
        await get_node(store, name)
        events, revision = await store.list_objects("Event")
        await _set_cordoned(store, name, True)
        await requests.request_drain(store, name, args.force)
        vms = await placed_on(store, name)
        print(f"clusternode/{name} cordoned; draining {len(vms)} VMs")
        blockers = Blockers(args.force)
        for vm in vms:
            if not vm.spec.migration.allowed and not args.force:
                print(f"virtualmachine/{vm.metadata.name} stays on {name}: {blockers.why(vm)}")
        if not args.wait:
            return 0
        for event in events:
            if isinstance(event, Event):
                blockers.saw(event)
        watched = {name} | {vm.metadata.name for vm in vms}
        stream = asyncio.create_task(_stream(store, revision, watched, blockers))
        try:
            async with asyncio.timeout(args.wait_timeout):
                return await _wait_drained(store, name, blockers)
        except TimeoutError:
            left = await placed_on(store, name)
            reasons = "; ".join(
                f"{vm.metadata.name} ({blockers.why(vm) or 'not moved yet'})" for vm in left
            )
            print(
                f"error: {name} not drained after {args.wait_timeout:g} s; still there: {reasons}",
                file=sys.stderr,
            )
            return 1
        finally:
            stream.cancel()
            await asyncio.wait({stream})


async def _stream(store: Store, revision: int, watched: set[str], blockers: Blockers) -> None:
    """Print each new event about the node or its VMs, and keep `blockers` current."""
    while True:
        try:
            async for change in store.watch("Event", revision + 1):
                revision = change.revision
                event = change.object
                if change.type == "DELETED" or not isinstance(event, Event):
                    continue
                if event.spec.involved_object.name not in watched:
                    continue
                blockers.saw(event)
                print(_event_line(event), flush=True)
        except Compacted:
            _, revision = await store.list_objects("Event")


async def _wait_drained(store: Store, name: str, blockers: Blockers) -> int:
    while True:
        vms = await placed_on(store, name)
        if not vms:
            print(f"clusternode/{name} drained")
            return 0
        stuck = [(vm.metadata.name, blockers.why(vm)) for vm in vms]
        if all(why is not None for _, why in stuck):
            reasons = "; ".join(f"{vm}: {why}" for vm, why in stuck)
            print(f"error: {name} not drained: {reasons}", file=sys.stderr)
            return 1
        await asyncio.sleep(DRAIN_POLL)


async def run_cordon(args: argparse.Namespace) -> int:
    async with store_from(args) as store:
        await _set_cordoned(store, args.node, True)
    print(f"clusternode/{args.node} cordoned")
    return 0


async def run_uncordon(args: argparse.Namespace) -> int:
    async with store_from(args) as store:
        await get_node(store, args.node)
        await requests.cancel_drain(store, args.node)
        await _set_cordoned(store, args.node, False)
    print(f"clusternode/{args.node} uncordoned")
    return 0
