"""Node maintenance: `node drain|cordon|uncordon NODE` (also `kvmctl drain|cordon|uncordon`).

`drain --wait` streams the events of the node and of its VMs as they happen, and the progress
of each VM's live migration (bytes left, rate), and ends when the node is empty (exit 0), when
every VM left is stuck (exit 1 at once, naming each and why), or at `--timeout` (exit 1, naming
what is left and why). A VM is stuck when it may not live-migrate (without --force) or when the
controller's latest word on it is a blocker (`VMNotMigratable`: no eligible target, "host3 has 0
free vcpus").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from controller.ha import requests
from controller.runtime.store import Conflict, NotFound, Store
from crds import ClusterNode, Event, VirtualMachine, VirtualMachineMigration

from .connect import name_arg, store_from
from .flags import add_wait_flags
from .follow import follow_changes, stream_events
from .vm import ProgressBar

DRAIN_POLL = 0.5
BLOCKERS = frozenset({"VMNotMigratable"})
"""Event reasons saying a VM cannot leave its node for now."""
ENDED = ("Succeeded", "Failed")
"""Migration phases after which a migration shows no progress."""
STALE_SETTLE = 5.0
"""Seconds before a blocker reported before this drain counts (the controller acts first)."""


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
    add_wait_flags(drain, "until the node is empty")
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


def _written(event: Event) -> tuple[int, datetime]:
    """When the event was last written: etcd's revision orders events of the same second."""
    return int(event.metadata.resource_version or 0), event.spec.last_timestamp


class Blockers:
    """What keeps each VM on the node: the latest event about it, when that is a blocker.

    An event written before this drain may be stale (the controller reports a blocker once, and
    again only when it changes): it counts only after `settle` seconds without a newer one.
    """

    def __init__(
        self, force: bool, settle: float = STALE_SETTLE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.force = force
        self.latest: dict[str, Event] = {}
        self.fresh: set[str] = set()
        self.clock = clock
        self.trusted_from = clock() + settle

    def saw(self, event: Event, fresh: bool) -> None:
        involved = event.spec.involved_object
        if involved.kind != "VirtualMachine":
            return
        known = self.latest.get(involved.name)
        if fresh or known is None or _written(known) <= _written(event):
            self.latest[involved.name] = event
            if fresh:
                self.fresh.add(involved.name)

    def why(self, vm: VirtualMachine, stale_too: bool = False) -> str | None:
        """Why `vm` cannot leave, or None when it may (or nobody said otherwise yet);
        `stale_too`: also a blocker reported before this drain, not yet settled."""
        name = vm.metadata.name
        if not self.force and not vm.spec.migration.allowed:
            return "live migration is not allowed (--force stops it and restarts it elsewhere)"
        event = self.latest.get(name)
        if event is None or event.spec.reason not in BLOCKERS:
            return None
        if not stale_too and name not in self.fresh and self.clock() < self.trusted_from:
            return None
        return f"{event.spec.reason}: {event.spec.message}"


async def run_drain(args: argparse.Namespace) -> int:
    name = args.node
    async with store_from(args) as store:
        await get_node(store, name)
        events, revision = await store.list_objects("Event")
        migrations, migrations_revision = await store.list_objects("VirtualMachineMigration")
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
                blockers.saw(event, fresh=False)
        names = {vm.metadata.name for vm in vms}
        progress = MigrationLines(names)
        for migration in migrations:
            if (
                isinstance(migration, VirtualMachineMigration)
                and migration.status.phase not in ENDED
            ):
                progress(migration)
        followers = [
            asyncio.create_task(
                stream_events(store, revision, {name} | names, partial(blockers.saw, fresh=True))
            ),
            asyncio.create_task(
                follow_changes(store, "VirtualMachineMigration", migrations_revision, progress)
            ),
        ]
        try:
            async with asyncio.timeout(args.wait_timeout):
                return await _wait_drained(store, name, blockers)
        except TimeoutError:
            left = await placed_on(store, name)
            reasons = "; ".join(
                f"{vm.metadata.name} ({blockers.why(vm, stale_too=True) or 'not moved yet'})"
                for vm in left
            )
            print(
                f"error: {name} not drained after {args.wait_timeout:g} s; still there: {reasons}",
                file=sys.stderr,
            )
            return 1
        finally:
            for task in followers:
                task.cancel()
            await asyncio.wait(followers)


class MigrationLines:
    """Prints `virtualmachine/VM: [####......]  40%  Running  2.8Gi left  100.0Mi/s` for each
    change of a migration of one of `vms` (a line only when what it says changed)."""

    def __init__(self, vms: set[str]) -> None:
        self.vms = vms
        self.bars: dict[str, ProgressBar] = {}
        self.shown: dict[str, str] = {}

    def __call__(self, migration: Any) -> None:
        if not isinstance(migration, VirtualMachineMigration) or migration.spec.vm not in self.vms:
            return
        name = migration.metadata.name
        line = self.bars.setdefault(name, ProgressBar(sys.stdout)).line(migration)
        if self.shown.get(name) != line:
            self.shown[name] = line
            print(f"virtualmachine/{migration.spec.vm}: {line}", flush=True)


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
