"""Running and operating the cluster: `kvmctl controller`, `fence ack` and `get leader`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import yaml

from controller import printers
from controller.ha import requests
from controller.ha.environment import HaTimings
from controller.runtime.defaults import DEFAULT_HTTP_PORT, short_hostname
from controller.runtime.etcd_health import read_leader
from controller.runtime.leader_record import ElectionTiming
from controller.runtime.peers import PEER_INTERVAL, PEER_PORT, PeerSettings

from .connect import name_arg, store_from
from .drain import get_node
from .errors import UsageError
from .flags import add_heartbeat_flags, add_telemetry_flags


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
    add_telemetry_flags(controller, DEFAULT_HTTP_PORT)
    add_heartbeat_flags(controller, "the agents'", float)
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
        type=name_arg,
        nargs="?",
        const=short_hostname(),
        help="the ClusterNode this controller runs on: listen to and send direct heartbeats, "
        "and take over at once from a leader whose power-fenced host goes silent; without a "
        "value: the hostname up to its first dot (%(const)s)",
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
    ack.add_argument("node", type=name_arg)
    ack.set_defaults(func=run_fence_ack)


# controller ----------------------------------------------------------------------------------


async def run_controller(args: argparse.Namespace) -> int:
    # Imported here: the fence driver and migration controller are not needed by other commands.
    from controller.ha.controller import build_manager
    from controller.runtime.systemd import Service
    from controller.runtime.telemetry import setup_telemetry
    from reconcilers.drivers.fence import FenceRunner
    from reconcilers.drivers.fence_policy import FencePolicy

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
    telemetry = setup_telemetry("kvmctl-controller", "prometheus", otlp_endpoint=args.otlp_endpoint)
    store = store_from(args)
    await store.connect_when_reachable()
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
    try:
        async with Service() as service:
            service.ready_when(manager.started.wait(), "caches synced")
            await manager.run()  # closes the store
    finally:
        telemetry.shutdown()  # sends what the OTLP exporters still hold
    return 0


# fence ack -----------------------------------------------------------------------------------


async def run_fence_ack(args: argparse.Namespace) -> int:
    async with store_from(args) as store:
        node = await get_node(store, args.node)
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
    output = args.output.format
    if output == "json":
        print(json.dumps(document, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(document, sort_keys=False), end="")
    elif output == "name":
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
