"""Running and operating the cluster: `kvmctl controller`, `fence ack`, `node drain|uncordon`,
and `get leader`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

import yaml

from controller import printers
from controller.ha import requests
from controller.ha.environment import HaTimings
from controller.runtime.defaults import DEFAULT_HTTP_PORT
from controller.runtime.leader import ElectionTiming
from controller.runtime.peers import PEER_INTERVAL, PEER_PORT, PeerSettings
from controller.runtime.store import Conflict, NotFound, Store
from crds import ClusterNode, VirtualMachine
from crds.meta import _check_name

from .resources import store_from
from .status import read_leader

DRAIN_POLL = 0.5


def register(commands: Any) -> None:
    defaults = HaTimings()
    controller = commands.add_parser(
        "controller",
        help="run the HA controller (foreground daemon; several may run, one leads)",
        description=(
            "Run the leader-elected controller: node health, fencing, VM placement and "
            "recovery, drains, and live migrations. Start one on several hosts: leader election "
            "picks one; the others take over within the election TTL."
        ),
    )
    controller.add_argument("--identity", help="name in the election (default: HOST-PID)")
    controller.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        help=f"port of /healthz and /metrics on loopback (default {DEFAULT_HTTP_PORT}; 0 any)",
    )
    controller.add_argument("--metrics-host", default="127.0.0.1", help="address to serve on")
    controller.add_argument(
        "--lease-ttl",
        type=float,
        default=defaults.lease_ttl,
        help="agents' heartbeat lease TTL, s (as given to the agents)",
    )
    controller.add_argument(
        "--renew-interval", type=float, default=defaults.renew_interval, help="agents' renewal, s"
    )
    controller.add_argument(
        "--self-fence-margin", type=float, default=defaults.self_fence_margin, help="seconds"
    )
    controller.add_argument(
        "--recovery-grace",
        type=float,
        default=defaults.recovery_grace,
        help="wait after a lease expired before trusting a self-fence, s",
    )
    controller.add_argument(
        "--watchdog-timeout", type=float, default=defaults.watchdog_timeout, help="seconds"
    )
    controller.add_argument(
        "--fence-retry-initial", type=float, default=defaults.fence_retry_initial, help="seconds"
    )
    controller.add_argument(
        "--fence-retry-max", type=float, default=defaults.fence_retry_max, help="seconds"
    )
    controller.add_argument(
        "--max-parallel-migrations", type=int, default=defaults.max_parallel_migrations
    )
    controller.add_argument(
        "--fence-agents",
        default="default",
        help=(
            "comma-separated fence agents this controller may run; 'default' stands for the "
            "built-in list of power-fencing agents (default: %(default)s)"
        ),
    )
    controller.add_argument(
        "--fence-allow-parameter",
        action="append",
        default=[],
        metavar="AGENT:PARAMETER",
        help=(
            "let ClusterNodes set this exec-like parameter (a program, script, file or options "
            "the agent uses, e.g. fence_virsh:identity_file); repeatable; refused otherwise"
        ),
    )
    controller.add_argument(
        "--election-ttl",
        type=int,
        default=ElectionTiming().ttl,
        help="leader election lease TTL, whole seconds",
    )
    controller.add_argument(
        "--node",
        type=_name,
        help="the ClusterNode this controller runs on: listen to and send direct heartbeats, "
        "and take over at once from a leader whose power-fenced host goes silent",
    )
    controller.add_argument(
        "--peer-port", type=int, default=PEER_PORT, help=f"UDP port (default {PEER_PORT})"
    )
    controller.add_argument(
        "--peer-interval",
        type=float,
        default=PEER_INTERVAL,
        help=f"seconds between this controller's direct heartbeats (default {PEER_INTERVAL})",
    )
    controller.add_argument(
        "--suspect-after",
        type=float,
        default=defaults.suspect_after,
        help="a power-fenced node silent this long is fenced before its lease expires, s",
    )
    controller.set_defaults(func=run_controller)

    fence = commands.add_parser("fence", help="fencing by hand")
    fence_commands = fence.add_subparsers(dest="fence_command", metavar="COMMAND", required=True)
    ack = fence_commands.add_parser(
        "ack",
        help="acknowledge that a lost node is off (kvmctl's fence_ack_manual)",
        description=(
            "Tell the controller that NODE is powered off or cut off from shared storage, so its "
            "VMs may be recovered elsewhere. Only as safe as your word: check first."
        ),
    )
    ack.add_argument("node", type=_name)
    ack.set_defaults(func=run_fence_ack)

    node = commands.add_parser("node", help="node maintenance")
    node_commands = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    drain = node_commands.add_parser("drain", help="cordon a node and live-migrate every VM off it")
    drain.add_argument("node", type=_name)
    drain.add_argument(
        "--force",
        action="store_true",
        help="stop VMs that may not live-migrate and restart them elsewhere",
    )
    drain.add_argument("--wait", action="store_true", help="wait until the node is empty")
    drain.add_argument("--wait-timeout", type=float, default=600.0, help="seconds")
    drain.set_defaults(func=run_drain)
    uncordon = node_commands.add_parser("uncordon", help="let a node take VMs again")
    uncordon.add_argument("node", type=_name)
    uncordon.set_defaults(func=run_uncordon)


def _name(value: str) -> str:
    try:
        return _check_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# controller ----------------------------------------------------------------------------------


async def run_controller(args: argparse.Namespace) -> int:
    # Imported here: the fence driver and migration controller are not needed by other commands.
    from controller.ha.controller import build_manager
    from controller.runtime.telemetry import setup_telemetry
    from reconcilers.drivers.fence import FenceRunner
    from reconcilers.drivers.fence_policy import FencePolicy

    from . import UsageError

    try:
        policy = FencePolicy.from_settings(
            [agent.strip() for agent in args.fence_agents.split(",") if agent.strip()],
            args.fence_allow_parameter,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None

    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    timings = HaTimings(
        lease_ttl=args.lease_ttl,
        renew_interval=args.renew_interval,
        self_fence_margin=args.self_fence_margin,
        recovery_grace=args.recovery_grace,
        watchdog_timeout=args.watchdog_timeout,
        fence_retry_initial=args.fence_retry_initial,
        fence_retry_max=args.fence_retry_max,
        max_parallel_migrations=args.max_parallel_migrations,
        suspect_after=args.suspect_after,
    )
    peers = PeerSettings(args.peer_port, args.peer_interval) if args.node else None
    election = ElectionTiming.for_ttl(args.election_ttl)
    setup_telemetry("kvmctl-controller", "prometheus")
    store = store_from(args)
    await store.connect()
    manager = build_manager(
        store,
        identity=args.identity,
        timings=timings,
        election_timing=election,
        http_host=args.metrics_host,
        http_port=args.metrics_port,
        fence_runner=FenceRunner(policy=policy),
        node=args.node,
        peers=peers,
    )
    await manager.run()  # closes the store
    return 0


# fence ack -----------------------------------------------------------------------------------


async def _node(store: Store, name: str) -> ClusterNode:
    node = await store.try_get("ClusterNode", name)
    if not isinstance(node, ClusterNode):
        raise NotFound(f"ClusterNode {name!r} not found")
    return node


async def run_fence_ack(args: argparse.Namespace) -> int:
    async with store_from(args) as store:
        node = await _node(store, args.node)
        health = node.status.health
        if health not in ("Unknown", "Fencing"):
            print(
                f"error: {args.node} is {health}: an acknowledgement only counts while the node "
                "is lost (Unknown or Fencing)",
                file=sys.stderr,
            )
            return 1
        await requests.request_fence_ack(store, args.node)
    print(f"clusternode/{args.node} fence acknowledged: its VMs will be recovered on other nodes")
    return 0


# drain / uncordon ----------------------------------------------------------------------------


async def _set_cordoned(store: Store, name: str, cordoned: bool) -> None:
    for _ in range(10):
        node = await _node(store, name)
        if node.spec.cordoned == cordoned:
            return
        node.spec.cordoned = cordoned
        try:
            await store.update(node)
            return
        except Conflict:
            continue
    raise Conflict(f"ClusterNode {name!r} kept changing; try again")


async def _placed_on(store: Store, node: str) -> list[VirtualMachine]:
    vms, _ = await store.list_objects("VirtualMachine")
    return [
        vm
        for vm in vms
        if isinstance(vm, VirtualMachine)
        and vm.status.placement is not None
        and vm.status.placement.node == node
    ]


def _stuck(vms: list[VirtualMachine], force: bool) -> list[str]:
    """VMs a drain leaves in place: they may not live-migrate and --force was not given."""
    if force:
        return []
    return [vm.metadata.name for vm in vms if not vm.spec.migration.allowed]


async def run_drain(args: argparse.Namespace) -> int:
    name = args.node
    async with store_from(args) as store:
        await _node(store, name)
        await _set_cordoned(store, name, True)
        await requests.request_drain(store, name, args.force)
        vms = await _placed_on(store, name)
        print(f"clusternode/{name} cordoned; draining {len(vms)} VMs")
        stuck = _stuck(vms, args.force)
        for vm in stuck:
            print(
                f"virtualmachine/{vm} stays on {name}: live migration is not allowed "
                "(--force stops it and restarts it elsewhere)"
            )
        if not args.wait:
            return 0
        try:
            async with asyncio.timeout(args.wait_timeout):
                return await _wait_drained(store, name, args.force)
        except TimeoutError:
            left = [vm.metadata.name for vm in await _placed_on(store, name)]
            print(
                f"error: {name} not drained after {args.wait_timeout:.0f} s; still there: "
                f"{', '.join(left)} (kvmctl events shows why)",
                file=sys.stderr,
            )
            return 1


async def _wait_drained(store: Store, name: str, force: bool) -> int:
    while True:
        vms = await _placed_on(store, name)
        if not vms:
            print(f"clusternode/{name} drained")
            return 0
        stuck = _stuck(vms, force)
        if len(stuck) == len(vms):
            print(
                f"error: {name} not drained: {', '.join(stuck)} may not live-migrate",
                file=sys.stderr,
            )
            return 1
        await asyncio.sleep(DRAIN_POLL)


async def run_uncordon(args: argparse.Namespace) -> int:
    async with store_from(args) as store:
        await _node(store, args.node)
        await requests.cancel_drain(store, args.node)
        await _set_cordoned(store, args.node, False)
    print(f"clusternode/{args.node} uncordoned")
    return 0


# get leader --------------------------------------------------------------------------------


async def print_leader(args: argparse.Namespace) -> int:
    """`kvmctl get leader`: who leads the controllers, since when, with which token."""
    async with store_from(args) as store:
        leader = await read_leader(store)
    if leader is None:
        print("No leader.", file=sys.stderr)
        return 1
    document = {
        "identity": leader.identity,
        "since": leader.since.isoformat(),
        "token": leader.token,
    }
    if args.output == "json":
        print(json.dumps(document, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(document, sort_keys=False), end="")
    elif args.output == "name":
        print(leader.identity)
    else:
        rows = [["IDENTITY", "SINCE", "AGE", "TOKEN"]]
        rows.append(
            [
                leader.identity,
                leader.since.isoformat(timespec="seconds"),
                printers.age(leader.since),
                str(leader.token),
            ]
        )
        print(printers.table(rows))
    return 0
