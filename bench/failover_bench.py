"""Failover time: from a host's power cut to the VM's qemu process running on another host.

Run: `python -m bench.failover_bench [--topology reference|three-hosts|lab] [--series
leader,etcd-leader,plain] [--runs 20] [--profile default|tuned] [--path ipmi|self-fence]
[--power-wait S]` as root. Prints the method, every run's step times and, per series, p50 /
p99 / max; nothing is asserted (figures live in docs/benchmarks.md).

Field topologies (`e2e.harness.topology`, as users run them): etcd's members and a `kvmctl
controller --node HOST` on the hosts themselves; `reference` is host1 and host2 (KVM) plus `storage`
(cordoned, tgtd), `three-hosts` is host1..host3. One TCG guest (96 MiB) restricted to the KVM hosts.
Before each kill the victim (the host running the guest) is given the roles of the run's series:
`leader` (it runs the leading controller and holds etcd's leader: the worst case), `etcd-leader`
(etcd's leader only), `plain` (neither), and on request `controller-leader` (the leading controller
only). Leading controllers are restarted until the wanted one leads (SIGTERM: a leader resigns),
etcd's leadership is moved with `etcdctl move-leader`, and the kill waits until the last controller
(re)start is `SETTLE` s old. Series are interleaved run by run. `lab` is the older, friendlier
setup: one etcd member outside the hosts, host1..host4, one controller on host1, which is never
killed; the guest on host2..host4.

Every run kills the victim (SIGKILL of its namespace init: every process dies at once, its etcd
member too) and times, on the bench's monotonic clock, when the bench saw each step through etcd
watches (`bench.failover_timeline`): the agent's heartbeat key deleted (lease expiry), the
leader key taken by another controller, the node Unknown, FencingStarted, the node Fenced, the
placement written, and the guest's qemu process on the other host (a scan of /proc every 20 ms,
which is also the two-copies checker, running throughout). The killed host is then powered on
again (its etcd member rejoins), and the next run starts once every host is Online.

Paths: `ipmi` fences through fence_ipmilan against the host's simulated BMC; `self-fence`
relies on the node's `selfFence` (recovery after the lease expired plus `recovery_grace`). p99
is nearest-rank (with 20 runs, the slowest run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from functools import partial
from pathlib import Path
from typing import Any

from bench.failover_summary import STEPS, VICTIM_STEPS, Run, print_summary, report
from bench.failover_timeline import Timeline
from controller.runtime.store import Store, Unavailable
from e2e.guest.build import ensure_guest_image
from e2e.harness import polling
from e2e.harness.chaos import (
    PROFILES,
    ChaosCluster,
    TwoCopiesChecker,
    guest_vm,
    ipmi_node,
    ipmi_secret,
    leader_host,
)
from e2e.harness.host_etcd import HostEtcdError
from e2e.harness.topology import (
    TOPOLOGIES,
    etcd_leader_host,
    every_host_online,
    hosts_not_online,
    lead_controllers_from,
    move_etcd_leader,
    storage_node,
    topology_chaos_cluster,
)

VM = "bench"
VICTIMS = ("host2", "host3", "host4")
CONTROLLER_HOST = "host1"
"""The lab topology: the controller's host (never killed) and the hosts the guest may run on."""
ROLES = {
    "leader": (True, True),
    "etcd-leader": (False, True),
    "plain": (False, False),
    "controller-leader": (True, False),
}
"""Series -> whether the victim runs the leading controller, whether it holds etcd's leader."""
SERIES = ("leader", "etcd-leader", "plain")
"""The default series (the issue's); `controller-leader` tells the two roles of `leader` apart."""
DEADLINE = 120.0
SAMPLE_PERIOD = 0.02
SETTLE = 5.0
"""Seconds between a controller's (re)start and the next kill: a cluster that has settled."""
ARRANGE_ATTEMPTS = 5
RUN_DEADLINE = 4 * DEADLINE
"""A run (arranging, the kill, the failover, the power-on) that takes longer is stuck."""


class BenchError(RuntimeError):
    """A run did not reach a step within the deadline."""


eventually = partial(
    polling.eventually,
    timeout=DEADLINE,
    error=BenchError,
    retry_on=(Unavailable, HostEtcdError),
)
"""The bench's own reads ride out etcd's election when the victim held etcd's leader."""


class Bench:
    def __init__(self, cluster: ChaosCluster, store: Store, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.store = store
        self.path: str = args.path
        self.power_wait: int | None = args.power_wait
        self.field = args.topology != "lab"
        self.domain = list(cluster.kvm_hosts) if self.field else list(VICTIMS)
        self.timeline = Timeline()
        self.checker = TwoCopiesChecker(cluster, SAMPLE_PERIOD)
        self.changed_at = time.monotonic()
        """When a controller last (re)started: the next kill waits `SETTLE` s after it."""
        self.stopped = ""
        self.incidents: list[str] = []
        """Hosts other than the victim found dead and powered on again (`back_online`)."""
        """Why the bench stopped before its last run (empty: it did not)."""

    async def all_online(self) -> bool:
        return await every_host_online(self.cluster, self.store)

    async def restore(self, name: str) -> None:
        await asyncio.to_thread(self.cluster.restore, name)
        self.changed_at = time.monotonic()
        try:
            await eventually(self.back_online, f"{name} back and every host Online")
        except BenchError as error:  # say which host: not always the one powered on
            missing = await hosts_not_online(self.cluster, self.store)
            raise BenchError(f"{error} (not Online: {', '.join(missing)})") from None

    async def back_online(self) -> bool:
        """Every host Online; a host found dead meanwhile (its watchdog reset it) is powered
        on again, as a real watchdog's reset reboots the machine, and reported."""
        for host in self.cluster.lab.hosts:
            if not self.cluster.lab[host].is_running():
                self.incidents.append(f"{host} found powered off after a run: powered on again")
                print(f"incident: {self.incidents[-1]}", flush=True)
                await asyncio.to_thread(self.cluster.restore, host)
        return await self.all_online()

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
        if self.cluster.storage_host is not None:
            await self.store.create(storage_node(self.cluster))
        await eventually(self.all_online, "every host Online")
        image = await asyncio.to_thread(ensure_guest_image)
        await self.store.create(guest_vm(VM, image, self.domain, restricted=True))

        async def running() -> bool:
            return len(self.checker.where(VM)) == 1

        await eventually(running, f"{VM} running")

    async def measure(self, count: int, series: list[str]) -> list[Run]:
        await self.set_up()
        runs = []
        header = "  ".join(f"{step:>14}" for step in STEPS)
        width = max(len(name) for name in series)
        print(f"run  {'series':<{width}}  victim->target  {header}", flush=True)
        for index in range(count):
            for name in series:  # interleaved: a drift in the machine's load hits every series
                try:
                    async with asyncio.timeout(RUN_DEADLINE):
                        run = await self.one_run(name)
                        runs.append(run)
                        cells = "  ".join(_cell(run.steps[step]) for step in STEPS)
                        row = f"{index + 1:3}  {name:<{width}}  {run.victim}->{run.target}  {cells}"
                        print(row, flush=True)
                        await self.restore(run.victim)
                except (BenchError, HostEtcdError, TimeoutError) as error:
                    # A host that does not come back (its etcd member not rejoining) ends the
                    # bench, clearly, with the runs measured so far.
                    self.stopped = f"run {index + 1} ({name}): {error or 'no progress in time'}"
                    print(f"stopping: {self.stopped}", flush=True)
                    return runs
        return runs

    async def arrange(self, series: str, victim: str) -> None:
        """Give the victim exactly the roles of `series` (field topologies only)."""
        others = [name for name in self.cluster.lab.hosts if name != victim]
        leads, holds_etcd = ROLES[series]
        before = await leader_host(self.store)
        await lead_controllers_from(self.cluster, self.store, [victim] if leads else others)
        if await leader_host(self.store) != before:
            self.changed_at = time.monotonic()
        etcd_leader = await eventually(
            partial(asyncio.to_thread, etcd_leader_host, self.cluster), "an etcd leader"
        )
        if holds_etcd:
            await move_etcd_leader(self.cluster, victim)
        elif etcd_leader == victim:
            await move_etcd_leader(self.cluster, next(h for h in others if h in self.etcd_hosts))

    @property
    def etcd_hosts(self) -> list[str]:
        return self.cluster.etcd_hosts

    async def holds(self, series: str, victim: str) -> bool:
        """Whether the victim holds the roles of `series` now, and no more."""
        leads = await leader_host(self.store) == victim
        etcd = await asyncio.to_thread(etcd_leader_host, self.cluster) == victim
        return (leads, etcd) == ROLES[series]

    async def one_run(self, series: str) -> Run:
        (victim,) = self.checker.where(VM)
        if self.field:
            for _ in range(ARRANGE_ATTEMPTS):
                await self.arrange(series, victim)
                settle = self.changed_at + SETTLE - time.monotonic()
                await asyncio.sleep(max(settle, 1.0))  # a settled cluster (see the module doc)
                if await self.holds(series, victim):
                    break
            else:
                raise BenchError(f"could not give {victim} the roles of series {series}")
        else:
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
        seen = {step: self.timeline.first(step, victim, killed_at) for step in VICTIM_STEPS}
        seen["leader moved"] = (
            self.timeline.first_other("leader", victim, killed_at) if ROLES[series][0] else None
        )
        seen["placed"] = self.timeline.first("placed", target, killed_at)
        steps = {step: None if at is None else at - killed_at for step, at in seen.items()}
        steps["qemu running"] = first_seen - killed_at
        return Run(series, victim, target, first_seen - killed_at, steps)


def make_cluster(args: argparse.Namespace) -> ChaosCluster:
    profile = PROFILES[args.profile]
    if args.topology == "lab":
        return ChaosCluster(
            (CONTROLLER_HOST, *VICTIMS),
            profile=profile,
            watchdog=True,
            controller_hosts=(CONTROLLER_HOST,),
        )
    return topology_chaos_cluster(args.topology, profile=profile, watchdog=True)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    cluster = make_cluster(args)
    await asyncio.to_thread(cluster.start)
    try:
        async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
            runner = Bench(cluster, store, args)
            with runner.checker:
                async with _background(runner.timeline.follow(store)):
                    series = args.series if runner.field else ["plain"]
                    runs = await runner.measure(args.runs, series)
            return report(
                runs, args, len(runner.checker.violations), runner.stopped, runner.incidents
            )
    finally:
        if args.logs:
            save_logs(cluster, Path(args.logs))
        await asyncio.to_thread(cluster.stop)


def save_logs(cluster: ChaosCluster, into: Path) -> None:
    """Copy every host's logs (agent, controller, etcd...) before the cluster is removed."""
    for name, host in cluster.lab.hosts.items():
        (into / name).mkdir(parents=True, exist_ok=True)
        for log in host.dir.glob("*.log"):
            shutil.copy(log, into / name / log.name)


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
    parser.add_argument("--topology", choices=("lab", *TOPOLOGIES), default="reference")
    parser.add_argument(
        "--series",
        type=_series,
        default=list(SERIES),
        help=f"comma-separated victim roles, field topologies only (default {','.join(SERIES)})",
    )
    parser.add_argument("--runs", type=int, default=20, help="runs per series")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--path", choices=("ipmi", "self-fence"), default="ipmi")
    parser.add_argument(
        "--power-wait", type=int, help="fence_ipmilan power_wait, s (default: kvmctl's, 0)"
    )
    parser.add_argument("--json", help="also write the summary to this file")
    parser.add_argument("--logs", help="copy every host's logs into this directory at the end")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    profile = PROFILES[args.profile]
    print(
        f"failover bench: topology {args.topology}, profile {profile.name} (lease "
        f"{profile.lease_ttl} s, renew {profile.renew_interval} s, grace "
        f"{profile.recovery_grace} s, election TTL {profile.election_ttl} s, etcd "
        f"{' '.join(profile.etcd_args) or 'default timers'}), path {args.path}, "
        f"power_wait {args.power_wait if args.power_wait is not None else 'default'}, "
        f"{args.runs} runs per series",
        flush=True,
    )
    summary = asyncio.run(bench(args))
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)
    if summary["stopped_early"]:
        print(f"stopped early: {summary['stopped_early']}")
        return 1
    return 0


def _series(value: str) -> list[str]:
    names = value.split(",")
    if any(name not in ROLES for name in names):
        raise argparse.ArgumentTypeError(f"series must be among {', '.join(ROLES)}: {value!r}")
    return names


if __name__ == "__main__":
    sys.exit(main())
