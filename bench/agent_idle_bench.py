"""An idle agent's CPU: one real agent in a process of its own, a 3-member etcd, a rack's VMs.

Run: `python -m bench.agent_idle_bench [--nodes 10] [--vms 250] [--own 25] [--idle 60]
[--storage-watch 5] [--libvirtd] [--profile FILE]`.
Prints the method and the figures; nothing is asserted (figures live in docs/benchmarks.md).

Topology (all on this machine): a 3-member etcd on /dev/shm; `--nodes` ClusterNodes; a
stand-in elected controller in this process (`e2e/harness/standin.py`) that places `--own` VMs
on node h01 and the others on h02... in turn (no agent runs there: they stay placed, not
running); the agent of h01 in a process of its own, as the rack bench's lone agent runs
(`tests.support.rack.start_rack_agent`: a libvirt test-driver host of 256 CPUs, the rack's
heartbeat timing, renewal every second, informer resync every 30 s, no direct heartbeats) and
with the storage-path watch every `--storage-watch` s (0: off, as in the rack bench), over
file disks that exist (one small file per VM under the bench's directory, so every path
reads healthy). Every VM has 1 vcpu, 64 MiB and one file disk. The test host runs inside the
agent's process (libvirt's test driver is a library); with `--libvirtd` it runs in a libvirtd
of its own (a simulated host's, `e2e/harness/hosts.py`, reached at `test+unix://...`), so the
agent's calls cross a socket and the domains' XML is written in another process, as on a real
host where libvirtd does that work: the agent's figure then leaves out what libvirtd spends,
printed next to it.

Steps: create the nodes and VMs, wait until h01's VMs run there, wait `SETTLE` s, then measure
the agent's CPU time over `--idle` s from /proc/PID/stat (utime + stime), per thread from
/proc/PID/task (the event loop's thread, gRPC's, the executor's). With `--profile FILE`,
py-spy (if on PATH) samples the agent over the same window (200 Hz, idle frames left out) and
writes its collapsed stacks to FILE; the bench prints what the busy samples were running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.rack_bench import CLOCK_TICKS, child, cpu_seconds, until_sigterm
from controller.runtime.store import Store
from crds import VirtualMachine
from e2e.harness.etcd import EtcdCluster
from e2e.harness.hosts import SimulatedHost
from e2e.harness.lab import Lab
from e2e.harness.polling import eventually
from e2e.harness.private_host import host_uri
from tests.support.agents import Cluster, vm_object
from tests.support.ha import node_object
from tests.support.rack import HOST_CPUS, HOST_MEMORY_MIB, RACK_TIMINGS
from tests.support.rack import host_name as node_name

SETTLE = 10.0
"""After the agent's VMs run, how long before the idle window opens."""
DEADLINE = 300.0
AGENT = "h01"
CREATE_BATCH = 50
TOP = 20
IDLE_FRAMES = {"EpollSelector.select", "_worker", "Thread.run"}


async def run_agent(
    endpoints: list[str], prefix: str, directory: str, storage_watch: float, uri: str
) -> None:
    """The child: h01's agent on libvirt `uri` until SIGTERM."""
    from controller.ha.agent_side import heartbeat_timing

    store = Store(endpoints, prefix)
    await store.connect()
    cluster = Cluster(store, Path(directory))
    await cluster.start_agent(
        AGENT,
        uri,
        heartbeat_timing(RACK_TIMINGS),
        direct_heartbeats=False,
        storage_check_interval=storage_watch or None,
    )
    await until_sigterm()
    await cluster.close()
    await store.close()


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of process `pid` (threads of one name added up)."""
    totals: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat.split("(", 1)[1].rsplit(")", 1)[0]
            fields = stat.rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            totals[name] = totals.get(name, 0.0) + used
    return totals


def breakdown(collapsed: Path) -> list[tuple[str, float]]:
    """py-spy's collapsed stacks by what runs: the two frames under the event loop's callback
    (`Handle._run`) or the executor's work item (`_WorkItem.run`), as shares of the samples.
    Samples of threads waiting in epoll or for work (py-spy's non-blocking mode counts some)
    are left out."""
    shares: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = [frame.split(" (", 1)[0] for frame in stack.split(";")]
        if frames[-1] in IDLE_FRAMES:
            continue
        anchor = next((a for a in ("Handle._run", "_WorkItem.run") if a in frames), None)
        if anchor is None:
            what = "elsewhere: " + " > ".join(frames[-2:])
        else:
            at = frames.index(anchor) + 1
            what = ("loop: " if anchor == "Handle._run" else "thread: ") + " > ".join(
                frames[at : at + 2]
            )
        shares[what] += int(samples)
    total = sum(shares.values())
    return [(what, n / total) for what, n in shares.most_common(TOP)] if total else []


async def own_vms_running(store: Store, own: int) -> bool:
    vms, _ = await store.list_objects("VirtualMachine")
    here = [vm for vm in vms if isinstance(vm, VirtualMachine) and vm.status.node == AGENT]
    return sum(1 for vm in here if vm.status.state == "Running") == own


def test_host_uri(directory: Path, daemon: SimulatedHost | None) -> str:
    """h01's test host: in the agent's process, or served by `daemon`'s libvirtd."""
    uri = host_uri(directory, AGENT, HOST_CPUS, HOST_MEMORY_MIB)
    if daemon is None:
        return uri
    return f"{uri.replace('test://', 'test+unix://', 1)}?socket={daemon.libvirt_socket}"


def libvirtd_pid(daemon: SimulatedHost) -> int:
    """The PID of the simulated host's libvirtd (`SimulatedHost.processes`: the host's PIDs)."""
    for pid in daemon.processes():
        with contextlib.suppress(OSError):  # gone meanwhile
            if Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd":
                return pid
    raise RuntimeError(f"no libvirtd runs on {daemon.name}")


async def bench(
    args: argparse.Namespace, etcd: EtcdCluster, directory: Path, daemon: SimulatedHost | None
) -> None:
    prefix = f"/kvmctl-idle-{uuid.uuid4().hex[:8]}"
    store = Store(etcd.endpoints, prefix)
    await store.connect()
    standin = Cluster(store, directory)
    await standin.lead()
    try:
        nodes = [node_name(i) for i in range(1, args.nodes + 1)]
        for name in nodes:
            await store.create(node_object(name))
        others = nodes[1:] or nodes
        wanted = [(f"v{i:04d}", AGENT if i < args.own else others[i % len(others)])
                  for i in range(args.vms)]  # fmt: skip
        disks = directory / "disks"
        disks.mkdir()
        for start in range(0, len(wanted), CREATE_BATCH):
            batch = wanted[start : start + CREATE_BATCH]
            await asyncio.gather(*(create_vm(store, disks, name, node) for name, node in batch))
            await asyncio.gather(*(standin.place(name, node) for name, node in batch))
        endpoints = ",".join(etcd.endpoints)
        module = "bench.agent_idle_bench"
        watch = str(args.storage_watch)
        uri = test_host_uri(directory, daemon)
        arguments = ("agent", endpoints, prefix, str(directory), watch, uri)
        async with child(*arguments, module=module) as agent:
            await eventually(
                lambda: own_vms_running(store, args.own),
                f"{args.own} VMs running on {AGENT}",
                timeout=DEADLINE,
                interval=1.0,
            )
            print(f"{args.vms} VMs in the store, {args.own} running on {AGENT}", flush=True)
            await asyncio.sleep(SETTLE)
            await measure(args, agent.pid, None if daemon is None else libvirtd_pid(daemon))
    finally:
        await standin.close()
        await store.close()


async def create_vm(store: Store, disks: Path, name: str, node: str) -> None:
    image = disks / f"{name}.img"
    image.write_bytes(b"\0" * 4096)
    domain = {"ordered": True, "nodes": [{"name": node}]}
    await store.create(
        vm_object(name, memoryMiB=64, failoverDomain=domain, disks=[{"file": str(image)}])
    )


async def measure(args: argparse.Namespace, pid: int, daemon_pid: int | None) -> None:
    profiler = shutil.which("py-spy") if args.profile else None
    sampling: asyncio.subprocess.Process | None = None
    if profiler is not None:
        command = [profiler, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
        command += ["--nonblocking"]
        command += ["--duration", str(int(args.idle)), "--output", str(args.profile)]
        sampling = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
    elif args.profile:
        print("py-spy is not on PATH: no profile", flush=True)
    before, threads = cpu_seconds(pid), thread_seconds(pid)
    daemon_before = None if daemon_pid is None else cpu_seconds(daemon_pid)
    began = time.monotonic()
    await asyncio.sleep(args.idle)
    window = time.monotonic() - began
    share = 100 * (cpu_seconds(pid) - before) / window
    load = os.getloadavg()
    print(f"agent idle CPU over {window:.0f} s: {share:.2f} % of a core "
          f"(load average {load[0]:.1f} at the end)")  # fmt: skip
    if daemon_pid is not None and daemon_before is not None:
        daemon_share = 100 * (cpu_seconds(daemon_pid) - daemon_before) / window
        print(f"libvirtd serving its test host over the same window: {daemon_share:.2f} %")
    for name, seconds in sorted(thread_seconds(pid).items(), key=lambda item: -item[1]):
        used = 100 * (seconds - threads.get(name, 0.0)) / window
        if used >= 0.01:
            print(f"  thread {name}: {used:.2f} %")
    if sampling is not None:
        await sampling.wait()
        print(f"py-spy over the window, shares of the busy samples ({args.profile}):")
        for what, part in breakdown(args.profile):
            print(f"  {100 * part:5.1f} %  {what}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        endpoints, prefix, directory, watch, uri = sys.argv[3:8]
        asyncio.run(run_agent(endpoints.split(","), prefix, directory, float(watch), uri))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--vms", type=int, default=250)
    parser.add_argument("--own", type=int, default=25)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--storage-watch", type=float, default=5.0)
    parser.add_argument("--libvirtd", action="store_true")
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    print(__doc__)
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(EtcdCluster(size=3))
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvmctl-idle-")))
        daemon = stack.enter_context(Lab((AGENT,))).hosts[AGENT] if args.libvirtd else None
        asyncio.run(bench(args, etcd, folder, daemon))


if __name__ == "__main__":
    main()
