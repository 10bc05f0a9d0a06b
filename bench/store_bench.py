"""Store benchmarks (issue 2): apply of 1,000 VMs, list of 10,000 objects, watch latency.

Run: `python -m bench.store_bench`. Starts its own etcd (data on /dev/shm) and prints the
figures and the method. Nothing here is asserted: numbers live in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.stats import nearest_rank
from controller.runtime.store import Store
from crds import VirtualMachine, parse_object
from e2e.harness.etcd import EtcdCluster


def vm_documents(count: int, prefix: str = "bench") -> list[dict[str, object]]:
    return [
        {
            "apiVersion": "kvmctl.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": f"{prefix}-{i:05d}", "labels": {"bench": "yes"}},
            "spec": {
                "memoryMiB": 128,
                "disks": [{"volume": f"vg_cluster/lv_{i}"}],
                "nics": [{"bridge": "br0"}],
            },
        }
        for i in range(count)
    ]


def bench_apply(endpoint: str, count: int = 1000) -> float:
    """Wall time of one `kvmctl apply -f` of `count` VMs (process start included)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vms.yaml"
        path.write_text(yaml.safe_dump_all(vm_documents(count)))
        env = {
            **os.environ,
            "KVMCTL_ETCD": endpoint,
            "KVMCTL_PREFIX": "/bench-apply",
            "KVMCTL_CONFIG": "",
        }
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "controller.cli", "apply", "-f", str(path)],
            env=env,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started


async def bench_list(endpoint: str, count: int = 10000) -> tuple[float, float]:
    """(seconds to load 10k objects, seconds of one `get vm` listing them, process included)."""
    async with Store([endpoint], prefix="/bench-list") as store:
        limit = asyncio.Semaphore(64)

        async def create(document: dict[str, object]) -> None:
            async with limit:
                obj = parse_object(document)
                await store.create(obj)

        started = time.perf_counter()
        await asyncio.gather(*(create(d) for d in vm_documents(count)))
        load = time.perf_counter() - started
    env = {
        **os.environ,
        "KVMCTL_ETCD": endpoint,
        "KVMCTL_PREFIX": "/bench-list",
        "KVMCTL_CONFIG": "",
    }
    started = time.perf_counter()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controller.cli", "get", "vm"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    listed = time.perf_counter() - started
    assert len(result.stdout.splitlines()) == count + 1
    return load, listed


async def bench_watch(endpoint: str, samples: int = 500) -> list[float]:
    """Milliseconds from the start of a put to the watch event arriving, per sample."""
    async with Store([endpoint], prefix="/bench-watch") as store:
        _, revision = await store.list_objects("VirtualMachine")
        sent: dict[str, float] = {}
        latencies: list[float] = []
        done = asyncio.Event()

        async def watch() -> None:
            async for event in store.watch("VirtualMachine", revision + 1):
                latencies.append((time.perf_counter() - sent[event.object.metadata.name]) * 1000)
                if len(latencies) == samples:
                    done.set()
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        for document in vm_documents(samples, "watch"):
            obj = parse_object(document)
            assert isinstance(obj, VirtualMachine)
            sent[obj.metadata.name] = time.perf_counter()
            await store.create(obj)
        await asyncio.wait_for(done.wait(), 60)
        watcher.cancel()
        return latencies


def main() -> int:
    with EtcdCluster() as etcd:
        endpoint = etcd.endpoints[0]
        apply_seconds = bench_apply(endpoint)
        load_seconds, list_seconds = asyncio.run(bench_list(endpoint))
        latencies = asyncio.run(bench_watch(endpoint))
    p50, p99 = statistics.median(latencies), nearest_rank(latencies, 0.99)
    print("kvmctl store benchmarks (one etcd 3.4 member on loopback, data on /dev/shm)")
    print(f"apply 1,000 VMs (one kvmctl apply -f process): {apply_seconds:.2f} s", end="")
    print(f" = {1000 / apply_seconds:.0f} objects/s")
    print(f"create 10,000 VMs through the store (64 in flight): {load_seconds:.2f} s", end="")
    print(f" = {10000 / load_seconds:.0f} objects/s")
    print(f"kvmctl get vm listing 10,000 VMs (whole process): {list_seconds:.2f} s")
    print(
        f"watch latency put->event over {len(latencies)} puts: p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
