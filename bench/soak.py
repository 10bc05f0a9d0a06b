"""Chaos soak: random faults for a set time, checking that nothing runs twice and nothing is lost.

Run: `python -m bench.soak --minutes 30 [--profile default|tuned] [--seed N] [--report FILE]` as
root (`make soak`). Prints each fault as it goes and a summary (failover times per fault kind);
writes the report as JSON (default `.run/soak/report.json`) and, when anything failed, every
host's logs (`.run/soak/logs`). Exits 1 if a VM ever ran on two hosts, an object was lost, or a
VM did not run again within the hard deadline.

The cluster: the `three-hosts` topology of `e2e.harness.topology` as users run it, a
`ChaosCluster` whose host1..host3 each run an etcd member, libvirtd, `kvmctl agent --watchdog` (a
watchdog stand-in per host), `kvmctl controller --node HOST` (one leads) and a simulated IPMI
BMC; host1 and host2 are power-fenced (fence_ipmilan), host3 relies on self-fencing. Three TCG
guests, one preferring each host (unrestricted failover domains).

Faults are dealt from a deck (every kind once per round, in a random order). Each cycle waits
until every etcd member is healthy (all answer, one leader), injects one fault, waits until every
VM runs exactly once on a live host, then undoes the fault (`restore`: power on, reconnect,
restart the killed agent or controller; restart or replace the etcd member) and waits until
every node is Online:

- `power-cut`: SIGKILL of a random host's namespace init (every process of the host, its etcd
  member included); `etcd-leader-power-cut`, `controller-leader-power-cut`: the same on the host
  holding etcd's leader, or running the leading controller, at the time of the fault;
- `network-cut`: the host's link down (IPMI hosts are powered off by their BMC; host3
  self-fences its guests and stays up, its etcd member cut off);
- `agent-kill`: SIGKILL of the agent alone (guests keep running; the watchdog resets the host,
  or IPMI fences it); `agent-hang`: SIGSTOP of the agent alone (likewise);
- `leader-kill`: SIGKILL of the leading controller (nothing should move);
- `etcd-member-kill`: SIGKILL of one host's etcd member (nothing should move; restarted from
  its data dir); `etcd-disk-loss`: the same, then its data dir is wiped and the member removed
  from etcd and added back as a new member, started empty (it must rejoin, else the soak ends
  with that error);
- `double-fault`: a host's agent SIGSTOPped and another host's power cut at once. Two hosts
  lost are two of etcd's three members: no quorum until one is powered on again; once the hung
  host died the soak powers both on (`bench.soak_faults`). Its times include that repair.

Checked throughout: the two-copies checker (every 100 ms, every host's qemu processes); after
every cycle, every object created at the start (Secret, ClusterNodes, VirtualMachines) is still
in etcd with its spec unchanged. Measured: for each VM that was on a host lost to the fault,
the time from the fault to its qemu process starting on a host (a failover); one later than
`--target` seconds (plus the leader election TTL when the fault took the leader's controller) is
counted late (never for `double-fault`). A VM restarted although its host was not lost, or
while the fault was undone, counts as an unneeded restart, except on a self-fencing host
surviving a `double-fault` (its agent cannot renew its lease without etcd's quorum, so it
destroys its VMs, as designed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.failover_bench import save_logs
from bench.soak_faults import (
    FAULTS,
    HOSTS,
    Faults,
    Injected,
    SoakError,
    eventually,
    leading_controller,
    retrying,
)
from bench.stats import nearest_rank
from controller.runtime.store import Store
from e2e.guest.build import ensure_guest_image
from e2e.harness.chaos import (
    PROFILES,
    ChaosCluster,
    TimingProfile,
    TwoCopiesChecker,
    guest_vm,
    ipmi_node,
    ipmi_secret,
    leader_host,
)
from e2e.harness.hosts import REPO_ROOT
from e2e.harness.topology import every_host_online, node_online, topology_chaos_cluster

SELF_FENCING = ("host3",)
VMS = {"soak-a": "host1", "soak-b": "host2", "soak-c": "host3"}
SETTLE = 2.0
"""After a cycle, how long every VM must keep running where it is before the next fault."""
DEFAULT_REPORT = REPO_ROOT / ".run" / "soak" / "report.json"
DEFAULT_LOGS = REPO_ROOT / ".run" / "soak" / "logs"


@dataclass
class Failover:
    fault: str
    host: str
    vm: str
    seconds: float
    late: bool


@dataclass
class Report:
    profile: str
    seed: int
    minutes_planned: float
    minutes_run: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    failovers: list[Failover] = field(default_factory=list)
    unneeded_restarts: list[str] = field(default_factory=list)
    etcd_rejoins: list[float] = field(default_factory=list)
    """Seconds each replaced etcd member (disk loss) took to be healthy."""
    two_copies_samples: int = 0
    lost_objects: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return self.two_copies_samples + len(self.lost_objects) + len(self.errors)

    def by_fault(self) -> dict[str, dict[str, Any]]:
        """Fault kind -> n, p50 and max of its failover times (kinds that moved no VM: none)."""
        times: dict[str, list[float]] = {}
        for failover in self.failovers:
            times.setdefault(failover.fault, []).append(failover.seconds)
        return {fault: _stats(times[fault]) for fault in FAULTS if fault in times}

    def summary(self) -> dict[str, Any]:
        times = [failover.seconds for failover in self.failovers]
        return {
            "topology": "three-hosts",
            "profile": self.profile,
            "seed": self.seed,
            "minutes_planned": self.minutes_planned,
            "minutes_run": round(self.minutes_run, 1),
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "failovers": len(times),
            "failover_p50": round(statistics.median(times), 2) if times else None,
            "failover_p99": round(nearest_rank(times, 0.99), 2) if times else None,
            "failover_max": round(max(times), 2) if times else None,
            "failovers_by_fault": self.by_fault(),
            "late_failovers": [asdict(f) for f in self.failovers if f.late],
            "unneeded_restarts": self.unneeded_restarts,
            "etcd_rejoins": _stats(self.etcd_rejoins) if self.etcd_rejoins else None,
            "two_copies_samples": self.two_copies_samples,
            "lost_objects": self.lost_objects,
            "errors": self.errors,
            "violations": self.violations,
        }


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


class Soak:
    def __init__(
        self,
        cluster: ChaosCluster,
        store: Store,
        report: Report,
        rng: random.Random,
        target: float,
        kinds: tuple[str, ...] = FAULTS,
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.report = report
        self.rng = rng
        self.target = target
        self.faults = Faults(cluster, store, rng)
        self.checker = TwoCopiesChecker(cluster)
        self.kinds = kinds
        self.deck: list[str] = []
        self.initial: dict[str, str] = {}
        """'Kind/name' -> its spec as JSON, for the lost-object check."""

    async def all_online(self) -> bool:
        return await every_host_online(self.cluster, self.store)

    async def each_vm_once(self, dead: frozenset[str]) -> bool:
        running = self.checker.running()
        return all(len(running.get(vm, ())) == 1 and running[vm][0] not in dead for vm in VMS)

    async def lost_seen(self, lost: frozenset[str]) -> bool:
        """The controller no longer counts the hosts Online (their leases expired)."""
        return not any([await node_online(self.store, name) for name in lost])

    async def new_leader(self, old: str) -> bool:
        return await leader_host(self.store) not in (None, old)

    async def set_up(self, power_wait: int | None) -> None:
        image = await asyncio.to_thread(ensure_guest_image)
        objects: list[Any] = [ipmi_secret(self.cluster.bmc_password)]
        objects += [
            ipmi_node(self.cluster, name, self_fence=name in SELF_FENCING, power_wait=power_wait)
            for name in HOSTS
        ]
        for obj in objects:
            await self.store.create(obj)
        await eventually(self.all_online, "every host Online")
        for vm, host in VMS.items():
            others = [name for name in HOSTS if name != host]
            objects.append(await self.store.create(guest_vm(vm, image, [host, *others])))
        self.initial = {f"{o.kind}/{o.metadata.name}": o.spec.model_dump_json() for o in objects}
        await eventually(partial(self.each_vm_once, frozenset()), "every VM running")

    async def check_objects(self) -> None:
        for key, spec in self.initial.items():
            kind, name = key.split("/")
            obj = await retrying(partial(self.store.try_get, kind, name), f"{key} read")
            if obj is None or obj.spec.model_dump_json() != spec:
                self.report.lost_objects.append(key)

    def next_fault(self) -> str:
        if not self.deck:
            self.deck = list(self.kinds)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    async def cycle(self) -> None:
        fault = self.next_fault()
        await eventually(self.faults.etcd_healthy, "every etcd member healthy, one leader")
        leader = await leading_controller(self.store)
        where = {vm: hosts[0] for vm, hosts in self.checker.running().items() if hosts}
        started = time.monotonic()
        injected = await self.faults.inject(fault, leader)
        self.report.faults[fault] += 1
        description = injected.description
        if injected.lost and injected.dead is None:
            await eventually(partial(self.lost_seen, injected.lost), f"{description} noticed")
        elif fault == "leader-kill":
            await eventually(partial(self.new_leader, leader), "another controller leading")

        def repairing(condition: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
            """`condition`, once the fault's hosts to repair found off are powered on again."""

            async def check() -> bool:
                await self.faults.power_on_dead(injected.repair)
                return await condition()

            return check

        back = partial(self.each_vm_once, injected.forbidden)
        await eventually(repairing(back), f"every VM once after {description}")
        self.account(fault, injected, where, started)
        repair = time.monotonic()
        rejoined = await self.faults.undo(injected)
        if rejoined is not None:
            self.report.etcd_rejoins.append(rejoined)
            print(f"  {description}: replaced, healthy after {rejoined:.1f} s", flush=True)
        online, healthy = repairing(self.all_online), repairing(self.faults.etcd_healthy)
        await eventually(online, f"every host Online after {description}")
        await eventually(healthy, f"every etcd member healthy after {description}")
        running = repairing(partial(self.each_vm_once, frozenset()))
        await eventually(running, "every VM running")
        await asyncio.sleep(SETTLE)
        for vm in VMS:  # no VM should start while the fault is undone (no failback here)
            for _, host in self.checker.appearances(vm, repair):
                restart = f"{vm} on {host} while undoing {description}"
                self.report.unneeded_restarts.append(restart)
                print(f"  {restart} (unneeded)", flush=True)
        await self.check_objects()

    def account(
        self, fault: str, injected: Injected, where: dict[str, str], started: float
    ) -> None:
        """Record the failovers (and unneeded restarts) of the fault; print its line."""
        leader_lost = injected.leader_lost
        allowance = self.target + (self.cluster.profile.election_ttl + 1.0 if leader_lost else 0.0)
        times = []
        for vm, old in where.items():
            (new,) = self.checker.where(vm)
            moved = self.checker.appearances(vm, started)
            if old in injected.lost:
                seconds = moved[0][0] - started if moved else math.nan
                late = fault != "double-fault" and not seconds <= allowance
                self.report.failovers.append(Failover(fault, old, vm, seconds, late))
                times.append(f"{vm} {old}->{new} {seconds:.2f}s{' LATE' if late else ''}")
            elif moved and fault == "double-fault" and old in SELF_FENCING:
                # Without quorum its agent cannot renew: it destroys its VMs (docs/ha.md).
                times.append(f"{vm} {old}->{new} (self-fenced: no etcd quorum)")
            elif moved:
                self.report.unneeded_restarts.append(f"{vm} on {new} after {injected.description}")
                times.append(f"{vm} restarted on {new} (unneeded)")
        elapsed = time.monotonic() - started
        moves = ", ".join(times) or "no VM moved"
        print(
            f"[{self.report.minutes_run:5.1f} min] {injected.description}: {moves} "
            f"(steady after {elapsed:.1f} s)",
            flush=True,
        )


async def soak(
    minutes: float,
    profile: TimingProfile,
    seed: int,
    target: float = 5.0,
    power_wait: int | None = None,
    logs: Path = DEFAULT_LOGS,
    kinds: tuple[str, ...] = FAULTS,
    keep_logs: bool = False,
) -> Report:
    """Run the soak; the report (also when the cluster failed to recover: see `errors`).
    When anything failed (or with `keep_logs`), every host's logs are copied into `logs`."""
    report = Report(profile.name, seed, minutes)
    cluster = topology_chaos_cluster("three-hosts", profile=profile, watchdog=True)
    await asyncio.to_thread(cluster.start)
    began = time.monotonic()
    save = True  # an exception also keeps the logs
    try:
        async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
            runner = Soak(cluster, store, report, random.Random(seed), target, kinds)
            with runner.checker:
                try:
                    await runner.set_up(power_wait)
                    while time.monotonic() - began < minutes * 60:
                        report.minutes_run = (time.monotonic() - began) / 60
                        await runner.cycle()
                except SoakError as error:
                    report.errors.append(str(error))
            report.two_copies_samples = len(runner.checker.violations)
        save = report.violations > 0 or keep_logs
    finally:
        report.minutes_run = (time.monotonic() - began) / 60
        if save:
            shutil.rmtree(logs, ignore_errors=True)
            save_logs(cluster, logs)
        await asyncio.to_thread(cluster.stop)
    return report


def print_by_fault(report: Report) -> None:
    print(f"{'fault':<28} {'n':>3} {'p50 s':>7} {'max s':>7}")
    for fault, stats in report.by_fault().items():
        print(f"{fault:<28} {stats['n']:>3} {stats['p50']:>7.2f} {stats['max']:>7.2f}")
    print(
        f"two-copies samples {report.two_copies_samples}, lost objects "
        f"{len(report.lost_objects)}, errors {len(report.errors)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--seed", type=int, help="random seed (default: time based, printed)")
    parser.add_argument("--target", type=float, default=5.0, help="failover target, s")
    parser.add_argument("--power-wait", type=int, help="fence_ipmilan power_wait, s")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--logs", type=Path, default=DEFAULT_LOGS, help="host logs on failure")
    parser.add_argument("--keep-logs", action="store_true", help="copy the logs on success too")
    parser.add_argument(
        "--faults", type=_kinds, default=FAULTS, help="comma-separated fault kinds (default: all)"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"soak: {args.minutes} min, profile {args.profile}, seed {seed}", flush=True)
    report = asyncio.run(
        soak(
            args.minutes,
            PROFILES[args.profile],
            seed,
            args.target,
            args.power_wait,
            args.logs,
            args.faults,
            args.keep_logs,
        )
    )
    summary = report.summary()
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print_by_fault(report)
    print(f"report: {args.report}")
    return 0 if report.violations == 0 else 1


def _kinds(value: str) -> tuple[str, ...]:
    kinds = tuple(value.split(","))
    if any(kind not in FAULTS for kind in kinds):
        raise argparse.ArgumentTypeError(f"faults must be among {', '.join(FAULTS)}: {value!r}")
    return kinds


if __name__ == "__main__":
    sys.exit(main())
