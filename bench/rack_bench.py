"""A rack at scale: many hosts, thousands of VMs, a 3-member etcd; one host loses power.

Run: `python -m bench.rack_bench [--hosts 50] [--vms 2000] [--on-victim 100] [--idle 60]
[--resync 30] [--agent-processes 0] [--vm-workers 16] [--create-rate N]`.
Prints the method and the figures; nothing is asserted (figures live in docs/benchmarks.md).

Topology (all on this machine): a 3-member etcd on /dev/shm (`--metrics=extensive`, nice -10);
the real HA controller in a process of its own (fence_dummy allowed,
`tests.support.rack.RACK_TIMINGS`: 5 s heartbeat leases); the last host's agent in a process of
its own (informer resync every 30 s, the default); the victim's agent in this process; the other
hosts' agents in this process too, on one event loop, or spread over `--agent-processes`
processes (resync every `--resync` s; an agent reconciles only the VMs that concern its node,
controller/agent_vms.py). Each host is a private libvirt test-driver host of 256 CPUs and 64 GiB
(`tests/support/rack.py`). An observer in a process of its own stamps, on the system-wide
monotonic clock, when it sees each of the victim's VMs placed elsewhere and running there. Host
h00 (the victim, fenced by fence_dummy) gets `--on-victim` VMs, the rest are spread over the
other hosts; every VM has 1 vcpu and 64 MiB.

Steps: create the VMs (50 at a time, or `--create-rate` a second) and time until every one runs
as placed; idle for `--idle` s and measure the CPU time of the controller, of the lone agent, of
each process of agents (divided by their number for a per-agent mean) and of each etcd member,
from /proc/PID/stat, plus each member's unary gRPC request latency histogram over that window (a
request "over 100 ms" is one outside the 0.1 s bucket; streams are left out); check that the
victim still runs all its VMs (on a loaded machine its lease may lapse during the apply and its
VMs be recovered before the cut: the bench then says so and stops); then cut the victim's
power (its agent stops: its lease lapses, its test host and domains go), and report the
detection time (cut to first placement) and the spreads of the victim's VMs' placements and
starts from the first placement (also per host). During the failover the bench waits on the
observer's lines: nothing lists the VMs on the in-process agents' loop. A two-copies checker
samples the in-process hosts' active domains (one listing each, no XML) throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from controller.agent import AgentSettings
from controller.runtime.informer import SharedInformers
from controller.runtime.store import Store
from crds import VirtualMachine
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually
from tests.support.agents import Cluster
from tests.support.ha import start_controller, stop_controller
from tests.support.rack import RACK_TIMINGS, FailoverChecker, Rack, runs_as_placed, start_rack_agent

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ETCD_NICE = -10
"""etcd's members run at this nice value (the agents and the controller at 0): on one machine
the dozens of agents would otherwise starve etcd of CPU, which hosts of their own would not."""
SETTLE = 10.0
"""After every VM runs, how long before the idle window opens."""
DEADLINE = 900.0
POLL = 5.0
"""How often the bench lists every VM to see whether all run, before the failover (during it,
the observer's process tells: nothing polls etcd on the agents' loop). Parsing 2,000 VMs takes
the victim's agent's loop, in this process, long enough on a loaded machine that polling every
second made the victim miss its renewals and be fenced before the cut; "all Running after" is
within this much of the truth."""
CHECK_INTERVAL = 0.5
"""The two-copies checker's period: it shares the in-process agents' loop (one listing of the
active domains per host, no XML)."""


# -- the child processes -----------------------------------------------------------------------


async def until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()


async def run_controller(endpoints: list[str], prefix: str) -> None:
    manager, task = await start_controller(endpoints, prefix, "ctl-1", RACK_TIMINGS)
    await until_sigterm()
    await stop_controller(manager, task)


async def run_agents(
    endpoints: list[str],
    prefix: str,
    directory: str,
    resync: float,
    workers: int,
    names: list[str],
) -> None:
    store = Store(endpoints, prefix)
    await store.connect()
    cluster = Cluster(store, Path(directory))
    for name in names:
        await start_rack_agent(cluster, name, resync, workers)
    await until_sigterm()
    await cluster.close()


async def run_observer(endpoints: list[str], prefix: str, victim: str) -> None:
    """Print `placed NAME T NODE` and `running NAME T NODE` for each VM seen moving off
    `victim`."""
    store = Store(endpoints, prefix)
    await store.connect()
    informers = SharedInformers(store, None)
    vms = informers.informer(VirtualMachine)
    on_victim: set[str] = set()
    placed: set[str] = set()
    running: set[str] = set()

    def seen(_type: object, vm: VirtualMachine) -> None:
        name, placement = vm.metadata.name, vm.status.placement
        if placement is None:
            return
        if placement.node == victim:
            on_victim.add(name)
            return
        if name in on_victim and name not in placed:
            placed.add(name)
            print(f"placed {name} {time.monotonic()} {placement.node}", flush=True)
        if name in placed and name not in running and runs_as_placed(vm):
            running.add(name)
            print(f"running {name} {time.monotonic()} {placement.node}", flush=True)

    vms.add_handler(seen)
    informers.start()
    await informers.wait_for_sync()
    await until_sigterm()
    await informers.stop()


def child_main(role: str, args: list[str]) -> None:
    endpoints = args[0].split(",")
    if role == "controller":
        asyncio.run(run_controller(endpoints, args[1]))
    elif role == "agents":
        asyncio.run(run_agents(endpoints, args[1], args[2], float(args[3]), int(args[4]), args[5:]))
    else:
        asyncio.run(run_observer(endpoints, args[1], args[2]))


@asynccontextmanager
async def child(
    *args: str, module: str = "bench.rack_bench"
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`module` run as a child (`--child ROLE ARGS`), ready; SIGTERM-ed by PID on the way out."""
    command = [sys.executable, "-m", module, "--child", *args]
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    try:
        line = await output(process).readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"{args[0]} child did not start: {line!r}")
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()


def output(process: asyncio.subprocess.Process) -> asyncio.StreamReader:
    assert process.stdout is not None
    return process.stdout


async def moves(observer: asyncio.subprocess.Process, count: int) -> list[list[str]]:
    """The observer's lines until it has seen `count` VMs running elsewhere."""
    lines: list[list[str]] = []
    running = 0
    while running < count:
        line = await output(observer).readline()
        if not line:
            raise RuntimeError("the observer ended early")
        lines.append(line.decode().split())
        running += lines[-1][0] == "running"
    return lines


# -- measuring ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def unary_latency(endpoint: str) -> dict[str, tuple[float, float]]:
    """Per unary gRPC method: (requests, requests within 0.1 s) so far, from /metrics."""
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
    counts: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("grpc_server_handling_seconds_bucket") or "unary" not in line:
            continue
        labels, value = line.rsplit(" ", 1)
        method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
        entry = counts.setdefault(method, [0.0, 0.0])
        if 'le="+Inf"' in labels:
            entry[0] = float(value)
        elif 'le="0.1"' in labels:
            entry[1] = float(value)
    return {method: (total, fast) for method, (total, fast) in counts.items()}


def latency_report(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> str:
    parts = []
    for method, (total, fast) in sorted(after.items()):
        old_total, old_fast = before.get(method, (0.0, 0.0))
        requests = total - old_total
        if requests:
            slow = requests - (fast - old_fast)
            parts.append(f"{method} {requests:.0f} ({slow:.0f} over 100 ms)")
    return ", ".join(parts) or "no unary requests"


def per_host(lines: list[list[str]], origin: float) -> str:
    """Per host: how many of the observer's `running` lines, and their first and last time."""
    hosts: dict[str, list[float]] = {}
    for what, _, moment, node in lines:
        if what == "running":
            hosts.setdefault(node, []).append(float(moment) - origin)
    return ", ".join(
        f"{node} {len(times)}: +{min(times):.2f}..+{max(times):.2f}"
        for node, times in sorted(hosts.items())
    )


def spread(times: list[float], origin: float) -> str:
    if not times:
        return "none"
    return f"first +{min(times) - origin:.2f} s, last +{max(times) - origin:.2f} s"


# -- the bench ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, etcd: EtcdCluster, directory: Path) -> None:
    for member in etcd.members:
        if member.process is not None:
            os.setpriority(os.PRIO_PROCESS, member.process.pid, ETCD_NICE)
    endpoints = ",".join(etcd.endpoints)
    prefix = f"/kvmctl-rack-{uuid.uuid4().hex[:8]}"
    store = Store(etcd.endpoints, prefix)
    await store.connect()
    rack = Rack(store, directory, args.hosts)
    lone = rack.hosts[-1]
    checker = FailoverChecker(rack, CHECK_INTERVAL)
    checking: asyncio.Task[None] | None = None
    try:
        await rack.create_nodes()
        async with contextlib.AsyncExitStack() as children:
            controller = await children.enter_async_context(child("controller", endpoints, prefix))
            workers = str(args.vm_workers)
            agent = await children.enter_async_context(
                child("agents", endpoints, prefix, str(directory), "30", workers, lone)
            )
            others = rack.hosts[1:-1]
            groups = [others[i :: args.agent_processes] for i in range(args.agent_processes)]
            agent_counts: dict[str, int] = {}
            pids: dict[str, int] = {}
            for index, group in enumerate(groups):
                process = await children.enter_async_context(
                    child(
                        "agents",
                        endpoints,
                        prefix,
                        str(directory),
                        str(args.resync),
                        workers,
                        *group,
                    )
                )
                pids[f"agents process {index}"] = process.pid
                agent_counts[f"agents process {index}"] = len(group)
            here = [rack.victim] + (others if not groups else [])
            for name in here:
                await start_rack_agent(rack.cluster, name, args.resync, args.vm_workers)
            in_process = len(here)
            agent_counts["this"] = in_process
            await eventually(rack.all_online, "every host Online", timeout=DEADLINE, interval=POLL)
            print(f"{args.hosts} hosts up ({in_process} agents in this process, the others in "
                  f"{len(groups)} processes, the lone agent in its own)", flush=True)  # fmt: skip

            start = time.monotonic()
            await rack.create_vms(args.on_victim, args.vms - args.on_victim, args.create_rate)
            created = time.monotonic() - start
            await eventually(rack.all_running, "every VM running", timeout=DEADLINE, interval=POLL)
            print(f"apply: {args.vms} VMs created in {created:.1f} s, all Running after "
                  f"{time.monotonic() - start:.1f} s", flush=True)  # fmt: skip

            await asyncio.sleep(SETTLE)
            pids |= {"controller": controller.pid, "lone agent": agent.pid, "this": os.getpid()}
            pids |= {m.name: m.process.pid for m in etcd.members if m.process is not None}
            cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
            latency = {m.name: unary_latency(m.endpoint) for m in etcd.members}
            began = time.monotonic()
            await asyncio.sleep(args.idle)
            window = time.monotonic() - began
            for name, pid in pids.items():
                share = 100 * (cpu_seconds(pid) - cpu[name]) / window
                count = agent_counts.get(name)
                per_agent = f" ({share / count:.2f} % per agent, {count})" if count else ""
                print(f"idle CPU over {window:.0f} s: {name} {share:.2f} % of a core{per_agent}")
            for member in etcd.members:
                after = unary_latency(member.endpoint)
                print(f"etcd {member.name} steady-state unary requests: "
                      f"{latency_report(latency[member.name], after)}")  # fmt: skip

            if not await rack.victims_at_home():
                print(f"{rack.victim} no longer runs all its VMs before the cut (it was lost "
                      "and fenced while the machine was loaded): no failover to measure; run "
                      "again on a quieter machine", flush=True)  # fmt: skip
                raise SystemExit(1)
            async with child("observer", endpoints, prefix, rack.victim) as observer:
                checking = asyncio.create_task(checker.run())
                cut = time.monotonic()
                await rack.cut_power()
                lines = await asyncio.wait_for(moves(observer, args.on_victim), DEADLINE)
                recovered = time.monotonic() - cut
                await checker.sample()
                checking.cancel()
                await eventually(rack.victims_moved, "victims moved", timeout=DEADLINE)
            placed = [float(t) for what, _, t, _ in lines if what == "placed"]
            started = [float(t) for what, _, t, _ in lines if what == "running"]
            first = min(placed) if placed else cut
            print(f"power cut of {rack.victim} ({args.on_victim} VMs): first placed elsewhere "
                  f"+{first - cut:.2f} s after the cut; every one running elsewhere (seen by "
                  f"the observer) +{recovered:.2f} s")  # fmt: skip
            print(f"  placed ({len(placed)}): {spread(placed, first)} from the first placement")
            print(f"  running ({len(started)}): {spread(started, first)} from the first placement")
            print(f"  running, per host (the lone agent's is {lone}): {per_host(lines, first)}")
            print(f"  two-copies checker: {checker.samples} samples, violations: "
                  f"{json.dumps(checker.violations[:5])}")  # fmt: skip
    finally:
        if checking is not None:
            checking.cancel()
        await rack.close()
        await store.close()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--vms", type=int, default=2000)
    parser.add_argument("--on-victim", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--resync", type=float, default=30.0)
    parser.add_argument("--agent-processes", type=int, default=0)
    parser.add_argument("--vm-workers", type=int, default=AgentSettings.vm_workers)
    parser.add_argument("--create-rate", type=float, default=None, help="VMs created a second")
    args = parser.parse_args()
    print(__doc__)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the children and etcd too
    with (
        EtcdCluster(size=3, extra_args=["--metrics=extensive"]) as etcd,
        tempfile.TemporaryDirectory(prefix="kvmctl-rack-") as directory,
    ):
        asyncio.run(bench(args, etcd, Path(directory)))


if __name__ == "__main__":
    main()
