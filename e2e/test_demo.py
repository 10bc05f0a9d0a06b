"""`make demo` end to end: `python -m e2e.harness.demo up` twice (the second run removes the first
cluster), then `down`, which must leave no process, namespace, link, loop device or directory.
Each run uses its own `--run-dir`, so a demo a developer left running is not touched.

Also the harness's failure injection the chaos tests build on: a host cut off the network is
fenced through its simulated BMC by the elected controller, its guest recovered on the other
host, and `restore` powers it on again.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from controller.fencing import FENCING_USAGE, USAGE_LABEL
from controller.runtime import layout_keys
from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, Secret, VirtualMachine
from crds.clusternode import ClusterNodeSpec
from crds.secret import SecretSpec
from e2e.guest.build import ensure_guest_image
from e2e.harness import polling
from e2e.harness.chaos import guest_vm
from e2e.harness.cluster import Cluster
from e2e.harness.demo import STATE_FILE_NAME
from e2e.harness.detached import DetachedState, RecordedProcess
from e2e.harness.hosts import REPO_ROOT

DEADLINE = 120.0
eventually = partial(polling.eventually, timeout=DEADLINE)
DEMO_TIMEOUT = 400.0
"""The demo aims at under 3 minutes; a loaded 2-core machine gets slack."""


async def demo(run_dir: Path, action: str) -> tuple[int, str]:
    """Run `python -m e2e.harness.demo ACTION`; its exit status and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "e2e.harness.demo", action, "--run-dir", str(run_dir),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), DEMO_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, output.decode(errors="replace")


@pytest.fixture
async def run_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """The demo's state directory; whatever a failed test left up is removed."""
    directory = tmp_path / "demo"
    try:
        yield directory
    finally:
        if (directory / STATE_FILE_NAME).exists():
            await demo(directory, "down")


def is_alive(process: RecordedProcess) -> bool:
    """The recorded process still exists (same PID and start time) and is not a zombie."""
    try:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == process.start_time and fields[0] != "Z"


def leftovers(state: DetachedState) -> list[str]:
    found = [f"process {p.what} ({p.pid})" for p in state.processes if is_alive(p)]
    existing = netns.listnetns()
    found += [f"netns {name}" for name in state.network_namespaces if name in existing]
    with IPRoute() as ipr:
        found += [f"link {name}" for name in state.links if ipr.link_lookup(ifname=name)]
    for device in state.loop_devices:
        backing = Path(f"/sys/block/{Path(device).name}/loop/backing_file")
        if backing.exists() and any(d in backing.read_text() for d in state.directories):
            found.append(f"loop device {device}")
    found += [f"directory {d}" for d in state.directories if os.path.exists(d)]
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_demo_runs_end_to_end_reruns_and_down_removes_everything(run_dir: Path) -> None:
    status, output = await demo(run_dir, "up")
    assert status == 0, output
    for milestone in (
        "vmstore   storage",  # the IscsiTarget is listed
        "BondingUnsupported",
        "vm1 migrated to host",
        "without a gap",
        "NodeFenced",
        "Every VM runs again",
        "The cluster keeps running",
    ):
        assert milestone in output, f"{milestone!r} missing from the demo's output:\n{output}"
    first = DetachedState.load(run_dir / STATE_FILE_NAME)
    assert any(is_alive(p) for p in first.processes), "the cluster should outlive `up`"

    status, output = await demo(run_dir, "up")
    assert status == 0, output
    assert "A previous demo is still up: removing it first" in output
    assert await asyncio.to_thread(leftovers, first) == []
    second = DetachedState.load(run_dir / STATE_FILE_NAME)

    status, output = await demo(run_dir, "down")
    assert status == 0, output
    assert await asyncio.to_thread(leftovers, second) == []
    assert not await asyncio.to_thread(run_dir.exists)
    status, output = await demo(run_dir, "down")
    assert (status, output.strip()) == (0, "No demo cluster is up.")


def ipmi_fenced_node(cluster: Cluster, name: str) -> ClusterNode:
    bmc = cluster.bmc(name)
    device = {
        "agent": "fence_ipmilan",
        "parameters": {
            "ip": bmc.address,
            "ipport": str(bmc.port),
            "username": bmc.user,
            "lanplus": "1",
        },
        "secretParameters": {"password": {"name": "ipmi", "key": "password"}},
    }
    spec = {
        "addresses": {"cluster": cluster.host(name).address},
        "libvirtUri": cluster.host(name).libvirt_tcp_uri,
        "fencing": {"methods": [{"name": "ipmi", "devices": [device]}]},
    }
    return ClusterNode(metadata=ObjectMeta(name=name), spec=ClusterNodeSpec.model_validate(spec))


@pytest.mark.slow
async def test_a_cut_off_host_is_fenced_through_its_bmc_and_restore_powers_it_on() -> None:
    image = await asyncio.to_thread(ensure_guest_image)
    cluster = Cluster(("host1", "host2"), storage_host=None)
    await asyncio.to_thread(cluster.start)
    try:
        async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
            secret = SecretSpec.model_validate({"data": {"password": cluster.bmc_password}})
            labels = {USAGE_LABEL: FENCING_USAGE}
            await store.create(Secret(metadata=ObjectMeta(name="ipmi", labels=labels), spec=secret))
            for name in cluster.kvm_hosts:
                await store.create(ipmi_fenced_node(cluster, name))

            async def heartbeat(node: str) -> bool:
                key = store.raw_key(layout_keys.heartbeat(node))
                return await store.client.get(key) is not None

            for name in cluster.kvm_hosts:
                await eventually(partial(heartbeat, name), f"{name} heartbeat")
            assert cluster.controllers.keys() == {"host1", "host2"}
            # A host running nothing is not fenced, only marked Offline: give host1 a guest.
            await store.create(guest_vm("guest", image, ["host1"]))

            async def guest_on(node: str) -> bool:
                vm = await store.get("VirtualMachine", "guest")
                assert isinstance(vm, VirtualMachine)
                return vm.status.state == "Running" and vm.status.node == node

            await eventually(partial(guest_on, "host1"), "the guest Running on host1")

            await asyncio.to_thread(cluster.cut_network, "host1")

            async def powered_off() -> bool:
                node = await store.get("ClusterNode", "host1")
                assert isinstance(node, ClusterNode)
                fence = node.status.fence
                return (
                    not cluster.host("host1").is_running()
                    and fence is not None
                    and fence.how == "PowerOff"
                )

            await eventually(powered_off, "host1 powered off by fence_ipmilan through its BMC")
            await eventually(partial(guest_on, "host2"), "the guest recovered on host2")
            assert "guest" in cluster.qemu_guests("host2")

            await asyncio.to_thread(cluster.restore, "host1")
            await eventually(partial(heartbeat, "host1"), "host1's agent back after power-on")
            assert cluster.host("host1").is_running()
    finally:
        await asyncio.to_thread(cluster.stop)
