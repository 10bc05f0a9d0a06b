"""Chaos soak: random faults for a set time, checking that nothing runs twice and nothing is lost.

Run: `python -m bench.soak --minutes 30 [--profile default|tuned] [--seed N] [--report FILE]` as
root (`make soak`). Prints each fault as it goes and a summary; writes the report as JSON
(default `.run/soak/report.json`). Exits 1 if a VM ever ran on two hosts, an object was lost, or
a VM did not run again within the hard deadline.

The cluster (`e2e.harness.chaos.ChaosCluster`): a 3-member etcd, host1..host3 each with libvirtd,
`kvmctl agent --watchdog` (a watchdog stand-in per host), `kvmctl controller` (one leads) and a
simulated IPMI BMC; host1 and host2 are power-fenced (fence_ipmilan), host3 relies on
self-fencing. Three TCG guests, one preferring each host (unrestricted failover domains).

Each cycle injects one fault, chosen at random, then waits until every VM runs exactly once on
a live host, then undoes the fault (`restore`: power on, reconnect, restart the killed agent or
controller; restart the etcd member) and waits until every node is Online:

- `power-cut`: SIGKILL of a host's namespace init (every process of the host);
- `network-cut`: the host's link down (IPMI hosts are powered off by their BMC; host3
  self-fences its guests and stays up);
- `agent-kill`: SIGKILL of the agent alone (guests keep running; the watchdog resets the host,
  or IPMI fences it);
- `agent-hang`: SIGSTOP of the agent alone (likewise);
- `leader-kill`: SIGKILL of the leading controller (nothing should move);
- `etcd-member-kill`: SIGKILL of one of the three etcd members (nothing should move).

Checked throughout: the two-copies checker (every 100 ms, every host's qemu processes); after
every cycle, every object created at the start (Secret, ClusterNodes, VirtualMachines) is still
in etcd with its spec unchanged. Measured: for each VM that was on a host lost to the fault,
the time from the fault to its qemu process on another host (a failover); a failover later than
`--target` seconds (plus the leader election TTL when the fault took the leader's controller) is
counted late. A VM restarted although its host was not lost counts as an unneeded restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aetcd

from controller.runtime.heartbeat import heartbeat_key
from controller.runtime.store import Store, StoreError
from crds import ClusterNode
from e2e.guest.build import ensure_guest_image
from e2e.harness import polling
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

HOSTS = ("host1", "host2", "host3")
SELF_FENCING = ("host3",)
VMS = {"soak-a": "host1", "soak-b": "host2", "soak-c": "host3"}
FAULTS = (
    "power-cut",
    "network-cut",
    "agent-kill",
    "agent-hang",
    "leader-kill",
    "etcd-member-kill",
)
HARD_DEADLINE = 120.0
"""A VM not running again this long after a fault is a failure, not a late failover."""
SETTLE = 2.0
"""After a cycle, how long every VM must keep running where it is before the next fault."""
DEFAULT_REPORT = REPO_ROOT / ".run" / "soak" / "report.json"


class SoakError(RuntimeError):
    """The cluster did not get back to a steady state within the hard deadline."""


TRANSIENT = (StoreError, aetcd.ClientError)
"""What the harness's own etcd reads may raise while the soak has an etcd member down."""
eventually = partial(
    polling.eventually, timeout=HARD_DEADLINE, interval=0.1, error=SoakError, retry_on=TRANSIENT
)
retrying = partial(polling.retrying, timeout=HARD_DEADLINE, error=SoakError, retry_on=TRANSIENT)


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
    two_copies_samples: int = 0
    lost_objects: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return self.two_copies_samples + len(self.lost_objects) + len(self.errors)

    def summary(self) -> dict[str, Any]:
        times = [failover.seconds for failover in self.failovers]
        return {
            "profile": self.profile,
            "seed": self.seed,
            "minutes_planned": self.minutes_planned,
            "minutes_run": round(self.minutes_run, 1),
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "failovers": len(times),
            "failover_p50": round(statistics.median(times), 2) if times else None,
            "failover_p99": round(_nearest_rank(times, 0.99), 2) if times else None,
            "failover_max": round(max(times), 2) if times else None,
            "late_failovers": [asdict(f) for f in self.failovers if f.late],
            "unneeded_restarts": self.unneeded_restarts,
            "two_copies_samples": self.two_copies_samples,
            "lost_objects": self.lost_objects,
            "errors": self.errors,
            "violations": self.violations,
        }


def _nearest_rank(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class Soak:
    def __init__(
        self,
        cluster: ChaosCluster,
        store: Store,
        report: Report,
        rng: random.Random,
        target: float,
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.report = report
        self.rng = rng
        self.target = target
        self.checker = TwoCopiesChecker(cluster)
        self.initial: dict[str, str] = {}
        """'Kind/name' -> its spec as JSON, for the lost-object check."""

    async def all_online(self) -> bool:
        for name in HOSTS:
            if await self.store.client.get(heartbeat_key(self.store.prefix, name).encode()) is None:
                return False
            node = await self.store.get("ClusterNode", name)
            if not isinstance(node, ClusterNode) or node.status.health != "Online":
                return False
        return True

    async def each_vm_once(self, lost: set[str]) -> bool:
        running = self.checker.running()
        return all(len(running.get(vm, ())) == 1 and running[vm][0] not in lost for vm in VMS)

    async def lost_seen(self, lost: set[str]) -> bool:
        """The controller no longer counts the hosts Online (their leases expired)."""
        for name in lost:
            node = await self.store.get("ClusterNode", name)
            if isinstance(node, ClusterNode) and node.status.health == "Online":
                return False
        return True

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
        await eventually(partial(self.each_vm_once, set()), "every VM running")

    async def check_objects(self) -> None:
        for key, spec in self.initial.items():
            kind, name = key.split("/")
            obj = await retrying(partial(self.store.try_get, kind, name), f"{key} read")
            if obj is None or obj.spec.model_dump_json() != spec:
                self.report.lost_objects.append(key)

    async def cycle(self) -> None:
        fault = self.rng.choice(FAULTS)
        host = self.rng.choice(HOSTS)
        leader = await retrying(partial(leader_host, self.store), "the leader key read")
        where = {vm: hosts[0] for vm, hosts in self.checker.running().items() if hosts}
        started = time.monotonic()
        lost, leader_lost, member = await self.inject(fault, host, leader)
        self.report.faults[fault] += 1
        description = f"{fault} {f'member m{member}' if member >= 0 else host}"
        if lost:
            await eventually(partial(self.lost_seen, lost), f"{description} noticed")
        elif fault == "leader-kill" and leader is not None:
            await eventually(partial(self.new_leader, leader), "another controller leading")
        await eventually(partial(self.each_vm_once, lost), f"every VM once after {description}")
        allowance = self.target + (self.cluster.profile.election_ttl + 1.0 if leader_lost else 0.0)
        times = []
        for vm, old in where.items():
            (new,) = self.checker.where(vm)
            moved = self.checker.appearances(vm, started)
            if old in lost:
                seconds = moved[0][0] - started if moved else math.nan
                late = not seconds <= allowance
                self.report.failovers.append(Failover(fault, old, vm, seconds, late))
                times.append(f"{vm} {old}->{new} {seconds:.2f}s{' LATE' if late else ''}")
            elif moved:
                self.report.unneeded_restarts.append(f"{vm} on {new} after {description}")
                times.append(f"{vm} restarted on {new} (unneeded)")
        elapsed = time.monotonic() - started
        moves = ", ".join(times) or "no VM moved"
        print(
            f"[{self.report.minutes_run:5.1f} min] {description}: {moves} "
            f"(steady after {elapsed:.1f} s)",
            flush=True,
        )
        await self.undo(description, member)
        await self.check_objects()

    async def inject(self, fault: str, host: str, leader: str | None) -> tuple[set[str], bool, int]:
        """Apply the fault; the hosts whose VMs must move, whether the leading controller died,
        and the etcd member killed (-1 for none)."""
        cluster = self.cluster
        if fault == "power-cut":
            await asyncio.to_thread(cluster.kill_host, host)
            return {host}, host == leader, -1
        if fault == "network-cut":
            await asyncio.to_thread(cluster.cut_network, host)
            return {host}, host == leader, -1
        # A killed or hung agent stops feeding its watchdog, which resets the host.
        if fault == "agent-kill":
            cluster.kill_agent(host)
            return {host}, host == leader, -1
        if fault == "agent-hang":
            cluster.stop_agent(host)
            return {host}, host == leader, -1
        if fault == "leader-kill" and leader is not None:
            cluster.kill_controller(leader)
            return set(), True, -1
        if fault == "etcd-member-kill":
            member = self.rng.randrange(self.cluster.etcd_members)
            await asyncio.to_thread(cluster.kill_etcd_member, member)
            return set(), False, member
        return set(), False, -1

    async def undo(self, description: str, member: int) -> None:
        if member >= 0:
            await asyncio.to_thread(self.cluster.restart_etcd_member, member)
        for name in HOSTS:
            await asyncio.to_thread(self.cluster.restore, name)
        await eventually(self.all_online, f"every host Online after {description}")
        await eventually(partial(self.each_vm_once, set()), "every VM running")
        await asyncio.sleep(SETTLE)


async def soak(
    minutes: float,
    profile: TimingProfile,
    seed: int,
    target: float = 5.0,
    power_wait: int | None = None,
) -> Report:
    """Run the soak; the report (also when the cluster failed to recover: see `errors`)."""
    report = Report(profile.name, seed, minutes)
    cluster = ChaosCluster(HOSTS, profile=profile, etcd_members=3, watchdog=True)
    await asyncio.to_thread(cluster.start)
    began = time.monotonic()
    try:
        async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
            runner = Soak(cluster, store, report, random.Random(seed), target)
            with runner.checker:
                try:
                    await runner.set_up(power_wait)
                    while time.monotonic() - began < minutes * 60:
                        report.minutes_run = (time.monotonic() - began) / 60
                        await runner.cycle()
                except SoakError as error:
                    report.errors.append(str(error))
            report.two_copies_samples = len(runner.checker.violations)
    finally:
        report.minutes_run = (time.monotonic() - began) / 60
        await asyncio.to_thread(cluster.stop)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--seed", type=int, help="random seed (default: time based, printed)")
    parser.add_argument("--target", type=float, default=5.0, help="failover target, s")
    parser.add_argument("--power-wait", type=int, help="fence_ipmilan power_wait, s")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"soak: {args.minutes} min, profile {args.profile}, seed {seed}", flush=True)
    report = asyncio.run(
        soak(args.minutes, PROFILES[args.profile], seed, args.target, args.power_wait)
    )
    summary = report.summary()
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"report: {args.report}")
    return 0 if report.violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
