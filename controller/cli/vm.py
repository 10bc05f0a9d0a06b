"""`kvmctl agent` (the host daemon) and `kvmctl migrate VM --to NODE [--wait]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from controller import printers
from controller.runtime.defaults import (
    DEFAULT_AGENT_HTTP_PORT,
    DEFAULT_MIGRATION_CONCURRENCY,
    short_hostname,
)
from controller.runtime.peers import PEER_INTERVAL, PEER_PORT, PeerSettings
from controller.runtime.store import NotFound, Store
from crds import ClusterNode, Event, ObjectMeta, VirtualMachine, VirtualMachineMigration
from crds.migration import PLACEMENT_SWITCHED, VirtualMachineMigrationSpec

from .connect import name_arg, store_from
from .flags import add_heartbeat_flags, add_telemetry_flags, add_wait_flags
from .follow import stream_events

BAR_WIDTH = 30
SUFFIX_LENGTH = 5


def register(commands: Any) -> None:
    agent = commands.add_parser("agent", help="run the host agent (foreground daemon)")
    agent.add_argument(
        "--node",
        type=name_arg,
        default=short_hostname(),
        help="this host's ClusterNode (default: the hostname up to its first dot, %(default)s)",
    )
    agent.add_argument("--libvirt-uri", default="qemu:///system", help="local libvirt URI")
    agent.add_argument("--domain-type", choices=["kvm", "qemu"], default="kvm")
    agent.add_argument("--serial-log-dir", type=Path, help="append guest consoles to DIR/VM.log")
    add_heartbeat_flags(agent, "this agent's", int)
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
    add_telemetry_flags(agent, DEFAULT_AGENT_HTTP_PORT)
    agent.set_defaults(func=run_agent)

    migrate = commands.add_parser("migrate", help="live-migrate a VM to another node")
    migrate.add_argument("vm", type=name_arg)
    migrate.add_argument("--to", required=True, type=name_arg, dest="target", metavar="NODE")
    add_wait_flags(migrate, "until it ends, following it")
    migrate.set_defaults(func=run_migrate)


# agent ---------------------------------------------------------------------------------------


async def run_agent(args: argparse.Namespace) -> int:
    # Imported here: libvirt and the reconcilers would slow every other command's start-up.
    from controller.agent import Agent, AgentSettings
    from controller.runtime.heartbeat import HeartbeatTiming
    from controller.runtime.systemd import Service
    from controller.runtime.telemetry import setup_telemetry
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
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
    )
    telemetry = setup_telemetry("kvmctl-agent", "prometheus", otlp_endpoint=args.otlp_endpoint)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = store_from(args)
    try:
        await store.connect_when_reachable()
        agent = Agent(store, settings)
        async with Service() as service:
            held = agent.heartbeat.established.wait()
            service.ready_when(held, f"heartbeat lease of {args.node} held")
            await agent.run(stop)
    except LibvirtError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        await store.close()
        telemetry.shutdown()  # sends what the OTLP exporters still hold
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
        seen: list[Event] = []  # the Events written since the migration was
        revision = int(created.metadata.resource_version or 0)
        events = asyncio.create_task(stream_events(store, revision, {args.vm, name}, seen.append))
        try:
            async with asyncio.timeout(args.wait_timeout):
                final = await follow(store, name, ProgressBar(sys.stderr))
        except TimeoutError:
            current = await store.try_get("VirtualMachineMigration", name)
            where = ""
            if isinstance(current, VirtualMachineMigration):
                status = current.status
                why = status.message or (seen[-1].spec.message if seen else "")
                where = (
                    f" (still {status.phase}, {status.progress_percent}%{': ' if why else ''}{why})"
                )
            print(
                f"error: migration {name} did not end within {args.wait_timeout:g} s{where}",
                file=sys.stderr,
            )
            return 1
        finally:
            events.cancel()
            await asyncio.wait({events})
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
    """`[#######.......]  42%  Running  1.2Gi left  85.3Mi/s`: redrawn in place on a terminal,
    one line per change otherwise. The rate is from the bytes sent between two updates."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.clock = clock
        self._last = ""
        self._sample: tuple[float, int] | None = None
        self._rate: float | None = None

    def _measure(self, processed: int | None) -> None:
        if processed is None:
            return
        now = self.clock()
        if self._sample is not None and processed > self._sample[1] and now > self._sample[0]:
            self._rate = (processed - self._sample[1]) / (now - self._sample[0])
        if self._sample is None or processed != self._sample[1]:
            self._sample = (now, processed)

    def line(self, migration: VirtualMachineMigration) -> str:
        status = migration.status
        self._measure(status.data_processed_bytes)
        percent = max(0, min(100, status.progress_percent))
        filled = BAR_WIDTH * percent // 100
        phase: str = status.phase
        if phase == "Succeeded" and status.condition(PLACEMENT_SWITCHED) is None:
            phase = "Succeeded, switching placement"
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:3d}%  {phase}"
        if status.phase == "Running" and status.data_remaining_bytes is not None:
            line += f"  {printers.size(status.data_remaining_bytes)} left"
            if self._rate is not None:
                line += f"  {printers.size(self._rate)}/s"
        return line

    def show(self, migration: VirtualMachineMigration) -> None:
        line = self.line(migration)
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
