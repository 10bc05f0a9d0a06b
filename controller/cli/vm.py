"""`kvmctl agent` (the host daemon) and `kvmctl migrate VM --to NODE [--wait]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from controller.ha.environment import HaTimings
from controller.runtime.defaults import DEFAULT_MIGRATION_CONCURRENCY
from controller.runtime.peers import PEER_INTERVAL, PEER_PORT, PeerSettings
from controller.runtime.store import NotFound, Store
from crds import ClusterNode, ObjectMeta, VirtualMachine, VirtualMachineMigration
from crds.meta import _check_name
from crds.migration import PLACEMENT_SWITCHED, VirtualMachineMigrationSpec

from .resources import store_from

BAR_WIDTH = 30
SUFFIX_LENGTH = 5


def register(commands: Any) -> None:
    agent = commands.add_parser("agent", help="run the host agent (foreground daemon)")
    agent.add_argument("--node", required=True, type=_name, help="this host's ClusterNode")
    agent.add_argument("--libvirt-uri", default="qemu:///system", help="local libvirt URI")
    agent.add_argument("--domain-type", choices=["kvm", "qemu"], default="kvm")
    agent.add_argument("--serial-log-dir", type=Path, help="append guest consoles to DIR/VM.log")
    defaults = HaTimings()
    agent.add_argument(
        "--lease-ttl", type=int, default=int(defaults.lease_ttl), help="heartbeat lease TTL, s"
    )
    agent.add_argument(
        "--renew-interval", type=float, default=defaults.renew_interval, help="seconds"
    )
    agent.add_argument(
        "--self-fence-margin", type=float, default=defaults.self_fence_margin, help="seconds"
    )
    agent.add_argument("--watchdog", type=Path, help="watchdog device to feed (/dev/watchdog)")
    agent.add_argument(
        "--no-storage", action="store_true", help="do not run the Bond/IscsiTarget/VG reconcilers"
    )
    agent.add_argument("--tgtd-portal", metavar="ADDR:PORT", help="start tgtd here if absent")
    agent.add_argument("--tgtd-control-port", type=int, metavar="N", help="tgtd's -C port")
    agent.add_argument(
        "--lvm-system-dir", metavar="DIR", help="LVM_SYSTEM_DIR (a private lvm.conf)"
    )
    agent.add_argument(
        "--lvm-device", action="append", default=[], metavar="DEV", help="restrict LVM to DEV"
    )
    agent.add_argument(
        "--no-lv-activation",
        action="store_true",
        help="do not activate the VMs' LVs (hosts without device-mapper)",
    )
    agent.add_argument("--resync-period", type=float, default=30.0, help="seconds")
    agent.add_argument(
        "--peer-port",
        type=int,
        default=PEER_PORT,
        help=f"UDP port of the controllers' direct heartbeats (default {PEER_PORT}; 0: send none)",
    )
    agent.add_argument(
        "--peer-interval",
        type=float,
        default=PEER_INTERVAL,
        help=f"seconds between direct heartbeats (default {PEER_INTERVAL})",
    )
    agent.add_argument(
        "--migration-concurrency", type=int, default=DEFAULT_MIGRATION_CONCURRENCY, help="per node"
    )
    agent.set_defaults(func=run_agent)

    migrate = commands.add_parser("migrate", help="live-migrate a VM to another node")
    migrate.add_argument("vm", type=_name)
    migrate.add_argument("--to", required=True, type=_name, dest="target", metavar="NODE")
    migrate.add_argument("--wait", action="store_true", help="follow it until it ends")
    migrate.add_argument("--wait-timeout", type=float, default=600.0, help="seconds")
    migrate.set_defaults(func=run_migrate)


def _name(value: str) -> str:
    try:
        return _check_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# agent ---------------------------------------------------------------------------------------


async def run_agent(args: argparse.Namespace) -> int:
    # Imported here: libvirt and the reconcilers would slow every other command's start-up.
    from controller.agent import Agent, AgentSettings
    from controller.runtime.heartbeat import HeartbeatTiming
    from reconcilers.drivers.libvirt import LibvirtError
    from reconcilers.lvm_lock import LvmSettings
    from reconcilers.storage import StorageSettings
    from reconcilers.virtualmachine import DomainSettings

    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    timing = HeartbeatTiming(args.lease_ttl, args.renew_interval, args.self_fence_margin)
    if args.serial_log_dir is not None:
        args.serial_log_dir.mkdir(parents=True, exist_ok=True)
    lvm = LvmSettings(system_dir=args.lvm_system_dir, devices=tuple(args.lvm_device))
    settings = AgentSettings(
        node=args.node,
        libvirt_uri=args.libvirt_uri,
        domain=DomainSettings(
            args.domain_type, args.serial_log_dir, None if args.no_lv_activation else lvm
        ),
        heartbeat=timing,
        watchdog=args.watchdog,
        resync_period=args.resync_period,
        migration_concurrency=args.migration_concurrency,
        storage=None
        if args.no_storage
        else StorageSettings(tgtd_control_port=args.tgtd_control_port, lvm=lvm),
        tgtd_portal=args.tgtd_portal,
        peers=None if args.peer_port == 0 else PeerSettings(args.peer_port, args.peer_interval),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = store_from(args)
    try:
        await store.connect()
        await Agent(store, settings).run(stop)
    except LibvirtError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


# migrate -------------------------------------------------------------------------------------


def migration_name(vm: str) -> str:
    """`<vm>-<random suffix>`, shortened to fit a name."""
    suffix = secrets.token_hex(4)[:SUFFIX_LENGTH]
    return f"{vm[: 62 - SUFFIX_LENGTH].rstrip('-')}-{suffix}"


async def run_migrate(args: argparse.Namespace) -> int:
    async with store_from(args) as store:
        vm = await store.try_get("VirtualMachine", args.vm)
        if not isinstance(vm, VirtualMachine):
            print(f"error: VirtualMachine {args.vm!r} not found", file=sys.stderr)
            return 1
        if not isinstance(await store.try_get("ClusterNode", args.target), ClusterNode):
            print(f"error: ClusterNode {args.target!r} not found", file=sys.stderr)
            return 1
        request = VirtualMachineMigration(
            metadata=ObjectMeta(name=migration_name(args.vm)),
            spec=VirtualMachineMigrationSpec(vm=args.vm, target_node=args.target),
        )
        created = await store.create(request)
        name = created.metadata.name
        print(f"virtualmachinemigration/{name} created")
        if not args.wait:
            return 0
        try:
            async with asyncio.timeout(args.wait_timeout):
                final = await follow(store, name, ProgressBar(sys.stderr))
        except TimeoutError:
            print(f"error: migration {name} did not end within {args.wait_timeout:.0f} s")
            return 1
        if final.status.phase == "Succeeded":
            print(f"{args.vm} migrated to {args.target}")
            return 0
        print(f"error: migration {name} failed: {final.status.message}", file=sys.stderr)
        return 1


def finished(migration: VirtualMachineMigration) -> bool:
    """Failed, or Succeeded with the VM's placement switched to the target."""
    status = migration.status
    if status.phase == "Failed":
        return True
    return status.phase == "Succeeded" and status.condition(PLACEMENT_SWITCHED) is not None


async def follow(store: Store, name: str, bar: ProgressBar) -> VirtualMachineMigration:
    """Watch the migration until `finished`, showing its progress; the last state seen."""
    current = await store.get("VirtualMachineMigration", name)
    assert isinstance(current, VirtualMachineMigration)
    revision = int(current.metadata.resource_version or 0)
    bar.show(current)
    if finished(current):
        bar.done()
        return current
    async for event in store.watch("VirtualMachineMigration", revision + 1):
        if event.object.metadata.name != name:
            continue
        if event.type == "DELETED":
            bar.done()
            raise NotFound(f"migration {name} was deleted")
        assert isinstance(event.object, VirtualMachineMigration)
        current = event.object
        bar.show(current)
        if finished(current):
            break
    bar.done()
    return current


class ProgressBar:
    """`[#######.......]  42%  Running`: redrawn in place on a terminal, one line per change
    otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._last = ""

    def show(self, migration: VirtualMachineMigration) -> None:
        status = migration.status
        percent = max(0, min(100, status.progress_percent))
        filled = BAR_WIDTH * percent // 100
        phase: str = status.phase
        if phase == "Succeeded" and status.condition(PLACEMENT_SWITCHED) is None:
            phase = "Succeeded, switching placement"
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:3d}%  {phase}"
        if line == self._last:
            return
        self._last = line
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
