"""Failover time: from a host's power cut to the VM's qemu process running on another host.

Run: `python -m bench.failover_bench [--runs 20] [--profile default|tuned] [--path ipmi|self-fence]
[--power-wait S]` as root. Prints the method, every run's step times and the summary; nothing
is asserted (figures live in docs/benchmarks.md, `## Failover`).

Method. An `e2e.chaos.ChaosCluster`: one etcd member, host1..host4 (own namespaces and libvirtd
each, `kvmctl agent --watchdog` fed to a watchdog stand-in), IPMI BMCs, and one `kvmctl
controller`, on host1, which is never killed: the figures are for a host other than the leader's
(a leader-host failure adds the leader election, `--election-ttl`). One TCG guest (96 MiB) in a
failover domain restricted to host2..host4. Each run kills the host running the guest (SIGKILL
of its namespace init: every process dies at once) and times, on the bench's monotonic clock,
when the bench saw each step through etcd watches: the agent's heartbeat key deleted (lease
expiry), the node Unknown/Fencing, FencingStarted, the node Fenced, the placement written, and
the guest's qemu process on the other host (a scan of /proc every 20 ms). The killed host is
then powered on again, and the next run starts once it is Online.

Paths: `ipmi` fences through fence_ipmilan against the host's simulated BMC (`power_wait` as the
agent's default, 2 s, unless `--power-wait`); `self-fence` relies on the node's `selfFence`
(recovery after the lease expired plus `recovery_grace`). p99 is nearest-rank (with 20 runs,
the slowest run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aetcd

from controller.heartbeat import heartbeat_key
from controller.store import Store
from crds import ClusterNode, Event, VirtualMachine
from e2e import polling
from e2e.chaos import (
    PROFILES,
    ChaosCluster,
    TwoCopiesChecker,
    guest_vm,
    ipmi_node,
    ipmi_secret,
)
from e2e.guest.build import ensure_guest_image

VM = "bench"
VICTIMS = ("host2", "host3", "host4")
CONTROLLER_HOST = "host1"
DEADLINE = 120.0
SAMPLE_PERIOD = 0.02
STEPS = ("lease expired", "Unknown", "FencingStarted", "Fenced", "placed", "qemu running")
"""Step names in the order they happen; each run reports the time of each from the kill."""


class BenchError(RuntimeError):
    """A run did not reach a step within the deadline."""


eventually = partial(polling.eventually, timeout=DEADLINE, error=BenchError)


@dataclass
class Timeline:
    """What the bench saw through etcd watches, time-stamped on arrival (monotonic)."""

    marks: list[tuple[float, str, str]] = field(default_factory=list)
    """(time, step, node)"""

    def first(self, step: str, node: str, since: float) -> float | None:
        for at, name, where in self.marks:
            if at >= since and name == step and where == node:
                return at
        return None

    def mark(self, step: str, node: str) -> None:
        self.marks.append((time.monotonic(), step, node))

    async def follow(self, store: Store) -> None:
        revision = await store.revision() + 1
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeats(store, revision))
            group.create_task(self._nodes(store, revision))
            group.create_task(self._vms(store, revision))
            group.create_task(self._events(store, revision))

    async def _heartbeats(self, store: Store, revision: int) -> None:
        prefix = heartbeat_key(store.prefix, "x").encode()[:-1]  # {prefix}/heartbeats/
        stream = await store.client.watch_prefix(prefix, start_revision=revision)
        async for event in stream:
            if event.kind == aetcd.rtypes.EventKind.DELETE:
                self.mark("lease expired", event.kv.key.decode().rsplit("/", 1)[-1])

    async def _nodes(self, store: Store, revision: int) -> None:
        health: dict[str, str] = {}
        async for change in store.watch("ClusterNode", revision):
            node = change.object
            if isinstance(node, ClusterNode) and health.get(node.metadata.name) != (
                node.status.health
            ):
                health[node.metadata.name] = node.status.health
                self.mark(node.status.health, node.metadata.name)

    async def _vms(self, store: Store, revision: int) -> None:
        placed: str | None = None
        async for change in store.watch("VirtualMachine", revision):
            vm = change.object
            if not isinstance(vm, VirtualMachine) or vm.status.placement is None:
                continue
            if vm.status.placement.node != placed:
                placed = vm.status.placement.node
                self.mark("placed", placed)

    async def _events(self, store: Store, revision: int) -> None:
        async for change in store.watch("Event", revision):
            event = change.object
            if isinstance(event, Event) and change.type != "DELETED":
                self.mark(event.spec.reason, event.spec.involved_object.name)


@dataclass
class Run:
    victim: str
    target: str
    total: float
    steps: dict[str, float | None]


class Bench:
    def __init__(self, cluster: ChaosCluster, store: Store, path: str, power_wait: int | None):
        self.cluster = cluster
        self.store = store
        self.path = path
        self.power_wait = power_wait
        self.timeline = Timeline()
        self.checker = TwoCopiesChecker(cluster, SAMPLE_PERIOD)

    async def online(self, name: str) -> bool:
        if await self.store.client.get(heartbeat_key(self.store.prefix, name).encode()) is None:
            return False
        node = await self.store.get("ClusterNode", name)
        return isinstance(node, ClusterNode) and node.status.health == "Online"

    async def all_online(self) -> bool:
        return all([await self.online(name) for name in self.cluster.kvm_hosts])

    async def restore(self, name: str) -> None:
        await asyncio.to_thread(self.cluster.restore, name)
        await eventually(partial(self.online, name), f"{name} Online again")

    async def set_up(self) -> None:
        await self.store.create(ipmi_secret(self.cluster.bmc_password))
        for name in self.cluster.kvm_hosts:
            node = ipmi_node(
                self.cluster,
                name,
                self_fence=self.path == "self-fence",
                power_wait=self.power_wait,
            )
            await self.store.create(node)
        await eventually(self.all_online, "every host Online")
        image = await asyncio.to_thread(ensure_guest_image)
        await self.store.create(guest_vm(VM, image, list(VICTIMS), restricted=True))

        async def running() -> bool:
            return len(self.checker.where(VM)) == 1

        await eventually(running, f"{VM} running")

    async def measure(self, count: int) -> list[Run]:
        await self.set_up()
        runs = []
        header = "  ".join(f"{step:>14}" for step in STEPS)
        print(f"run  victim->target  {header}", flush=True)
        for index in range(count):
            run = await self.one_run()
            runs.append(run)
            cells = "  ".join(_cell(run.steps[step]) for step in STEPS)
            print(f"{index + 1:3}  {run.victim}->{run.target}  {cells}", flush=True)
            await self.restore(run.victim)
        return runs

    async def one_run(self) -> Run:
        (victim,) = self.checker.where(VM)
        await asyncio.sleep(1.0)  # a few lease renewals after the previous run's settling
        killed_at = time.monotonic()
        await asyncio.to_thread(self.cluster.kill_host, victim)
        target = ""

        async def moved() -> bool:
            nonlocal target
            hosts = self.checker.where(VM)
            if len(hosts) == 1 and hosts[0] != victim:
                target = hosts[0]
                return True
            return False

        await eventually(moved, f"{VM} running elsewhere than {victim}")
        first_seen = self.checker.first_seen(VM, target, killed_at)
        assert first_seen is not None
        steps: dict[str, float | None] = {}
        for step in STEPS[:-2]:
            at = self.timeline.first(step, victim, killed_at)
            steps[step] = None if at is None else at - killed_at
        placed = self.timeline.first("placed", target, killed_at)
        steps["placed"] = None if placed is None else placed - killed_at
        steps["qemu running"] = first_seen - killed_at
        return Run(victim, target, first_seen - killed_at, steps)


def nearest_rank(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def report(runs: list[Run], args: argparse.Namespace, violations: int) -> dict[str, Any]:
    totals = [run.total for run in runs]
    summary: dict[str, Any] = {
        "profile": args.profile,
        "path": args.path,
        "power_wait": args.power_wait,
        "runs": len(runs),
        "p50": statistics.median(totals),
        "p99": nearest_rank(totals, 0.99),
        "min": min(totals),
        "max": max(totals),
        "two_copies_samples": violations,
        "step_medians": {},
    }
    for step in STEPS:
        values = [value for run in runs if (value := run.steps[step]) is not None]
        summary["step_medians"][step] = statistics.median(values) if values else None
    return summary


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    profile = PROFILES[args.profile]
    cluster = ChaosCluster(
        (CONTROLLER_HOST, *VICTIMS),
        profile=profile,
        watchdog=True,
        controller_hosts=(CONTROLLER_HOST,),
    )
    await asyncio.to_thread(cluster.start)
    try:
        async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
            runner = Bench(cluster, store, args.path, args.power_wait)
            with runner.checker:
                async with _background(runner.timeline.follow(store)):
                    runs = await runner.measure(args.runs)
            return report(runs, args, len(runner.checker.violations))
    finally:
        await asyncio.to_thread(cluster.stop)


def _cell(value: float | None) -> str:
    return f"{'-':>14}" if value is None else f"{value:13.2f}s"


@contextlib.asynccontextmanager
async def _background(work: Awaitable[None]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover_bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--path", choices=("ipmi", "self-fence"), default="ipmi")
    parser.add_argument(
        "--power-wait", type=int, help="fence_ipmilan power_wait, s (default: the agent's, 2 s)"
    )
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    profile = PROFILES[args.profile]
    print(
        f"failover bench: profile {profile.name} (lease {profile.lease_ttl} s, renew "
        f"{profile.renew_interval} s, grace {profile.recovery_grace} s, etcd "
        f"{' '.join(profile.etcd_args) or 'default timers'}), path {args.path}, "
        f"power_wait {args.power_wait if args.power_wait is not None else 'default'}, "
        f"{args.runs} runs",
        flush=True,
    )
    summary = asyncio.run(bench(args))
    medians = ", ".join(
        f"{step} {value:.2f}s" for step, value in summary["step_medians"].items() if value
    )
    print(
        f"\nfailover (kill -> qemu on another host): p50 {summary['p50']:.2f} s, "
        f"p99 {summary['p99']:.2f} s, min {summary['min']:.2f} s, max {summary['max']:.2f} s "
        f"over {summary['runs']} runs; two-copies samples: {summary['two_copies_samples']}"
    )
    print(f"step medians from the kill: {medians}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
