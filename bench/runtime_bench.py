"""Controller runtime benchmark (issue 3): a manager with a no-op reconciler over 10,000 objects.

Run: `python -m bench.runtime_bench [--objects N] [--samples N] [--idle-seconds S]`. Starts its
own etcd (data on /dev/shm) and prints the figures and the method. Nothing here is asserted:
numbers live in docs/benchmarks.md.

1. apply -> all reconciled: the manager runs and has synced (empty store); a separate writer
   process creates N VirtualMachines, 64 in flight. Measured from the writer's first write to
   the manager's first reconcile of the last object (both on CLOCK_MONOTONIC, which the two
   processes share).
2. event -> reconcile start: with all N cached and the queue idle, one spec update at a time
   from the manager's process; from just before the update call to the start of the reconcile
   of that key (so the etcd round trip of the write is included).
3. idle: utime + stime from /proc/self/stat over a quiet window, and VmRSS, of the process
   holding the manager (10k objects cached, leader election renewing every second).

`--telemetry prometheus` runs the same with a span and metrics recorded per reconcile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from bench.stats import nearest_rank
from controller.runtime.controller import Controller
from controller.runtime.manager import Manager
from controller.runtime.reconcile import Result
from controller.runtime.store import Store
from controller.runtime.telemetry import Exporter, setup_telemetry
from crds import ObjectMeta, VirtualMachine
from crds.virtualmachine import VirtualMachineSpec
from e2e.harness.etcd import EtcdCluster

PREFIX = "/bench-runtime"
IN_FLIGHT = 64


class FirstSeen:
    """A no-op reconciler noting when each key was first reconciled, and waking waiters."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.first: dict[str, float] = {}
        self.all_seen = asyncio.Event()
        self.waiters: dict[str, asyncio.Future[float]] = {}

    async def reconcile(self, key: str) -> Result:
        started = time.monotonic()
        self.first.setdefault(key, started)
        if len(self.first) >= self.expected:
            self.all_seen.set()
        waiter = self.waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(started)
        return Result()


def vm(name: str, memory: int = 128) -> VirtualMachine:
    return VirtualMachine(
        metadata=ObjectMeta(name=name), spec=VirtualMachineSpec(memory_mib=memory)
    )


async def write_objects(endpoint: str, count: int) -> None:
    """The writer process: create `count` VMs, print the monotonic start and end times."""
    async with Store([endpoint], prefix=PREFIX) as store:
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def create(index: int) -> None:
            async with limit:
                await store.create(vm(f"vm-{index:05d}"))

        started = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(count)))
        print(started, time.monotonic(), flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process, from /proc/self/stat."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def bench(objects: int, samples: int, idle_seconds: float, exporter: Exporter) -> None:
    setup_telemetry("kvmctl-bench", exporter)
    baseline_rss = rss_mib()
    with EtcdCluster() as etcd:
        endpoint = etcd.endpoints[0]
        reconciler = FirstSeen(objects)
        manager_store = Store([endpoint], prefix=PREFIX)
        await manager_store.connect()
        manager = Manager(
            manager_store,
            [Controller("noop", "VirtualMachine", reconciler, workers=4, leader_only=True)],
            http_port=None,
        )
        running = asyncio.create_task(manager.run(handle_signals=False))
        try:
            async with asyncio.timeout(60):
                while not manager.is_leader:
                    await asyncio.sleep(0.05)

            writer = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.runtime_bench", "--write", endpoint, str(objects),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            output, _ = await writer.communicate()
            if writer.returncode != 0:
                raise RuntimeError(f"the writer process failed with status {writer.returncode}")
            write_start, write_end = (float(word) for word in output.split())
            async with asyncio.timeout(300):
                await reconciler.all_seen.wait()
            last_reconciled = max(reconciler.first.values())
            print(f"objects: {objects}, telemetry exporter: {exporter}")
            print(
                f"writes alone (writer process, {IN_FLIGHT} in flight): "
                f"{write_end - write_start:.2f} s"
            )
            print(f"apply -> all reconciled: {last_reconciled - write_start:.2f} s")

            latencies = []
            async with Store([endpoint], prefix=PREFIX) as writer_store:
                loop = asyncio.get_running_loop()
                for index in range(samples):
                    name = f"vm-{index % objects:05d}"
                    current = await writer_store.get("VirtualMachine", name)
                    current.spec.memory_mib += 1
                    waiter: asyncio.Future[float] = loop.create_future()
                    reconciler.waiters[name] = waiter
                    before = time.monotonic()
                    await writer_store.update(current)
                    async with asyncio.timeout(30):
                        started = await waiter
                    latencies.append((started - before) * 1000)
            print(
                f"event -> reconcile start over {samples} updates: "
                f"p50 {statistics.median(latencies):.2f} ms, "
                f"p99 {nearest_rank(latencies, 0.99):.2f} ms, max {max(latencies):.2f} ms"
            )

            await asyncio.sleep(1.0)  # let the last writes settle before measuring idle
            cpu_before, wall_before = cpu_seconds(), time.monotonic()
            await asyncio.sleep(idle_seconds)
            cpu = cpu_seconds() - cpu_before
            wall = time.monotonic() - wall_before
            print(
                f"idle with {len(manager.informers.informer('VirtualMachine'))} objects cached: "
                f"{100 * cpu / wall:.2f}% of a core over {wall:.1f} s; "
                f"RSS {rss_mib():.0f} MiB (process before the manager: {baseline_rss:.0f} MiB)"
            )
        finally:
            manager.stop()
            await running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--objects", type=int, default=10000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--telemetry", choices=["none", "prometheus"], default="none")
    parser.add_argument("--write", nargs=2, metavar=("ENDPOINT", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        asyncio.run(write_objects(args.write[0], int(args.write[1])))
    else:
        asyncio.run(bench(args.objects, args.samples, args.idle_seconds, args.telemetry))


if __name__ == "__main__":
    main()
