"""Storage-path loss on real parts: the path checks (a real filesystem, a real TCP portal, a
FIFO whose read really blocks, a sysfs-shaped tree for iSCSI sessions: this kernel has no
iSCSI), the agent's report in its ClusterNode status on a real etcd, and the HA controller
fencing (fence_dummy) the node that lost a VM's image before recovering the VM elsewhere.

The real open-iscsi session drop is in the kernel lab (e2e/lab_tests/test_storage_path_lab.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from controller.ha.storage_watch import StorageSources, StorageWatch
from controller.runtime.layout import node_writer
from controller.runtime.manager import Manager
from controller.runtime.store import Store
from crds import IscsiTarget, ObjectMeta, VirtualMachine, VolumeGroup
from crds.iscsitarget import IscsiTargetSpec
from crds.volumegroup import VolumeGroupSpec
from e2e.harness.etcd import free_port
from e2e.harness.polling import eventually
from reconcilers.drivers.storage_paths import FileCheck, check_portal, iscsi_sessions
from tests.support.ha import (
    Leases,
    get_node,
    node_object,
    placed_on,
    power_fenced_node,
    recorded,
    report_running,
    vm_object,
)

BLOCKED_READ_CHILD = Path(__file__).with_name("blocked_read_child.py")
IQN = "iqn.2024-01.org.example:storage.vg-cluster"


def sysfs_session(sysfs: Path, number: int, iqn: str, state: str) -> None:
    """One session as the kernel's iscsi transport class shows it."""
    session = sysfs / "class" / "iscsi_session" / f"session{number}"
    session.mkdir(parents=True, exist_ok=True)
    (session / "targetname").write_text(f"{iqn}\n")
    (session / "state").write_text(f"{state}\n")


def test_iscsi_sessions_are_read_from_sysfs(tmp_path: Path) -> None:
    assert iscsi_sessions(tmp_path) == []
    sysfs_session(tmp_path, 1, IQN, "LOGGED_IN")
    sysfs_session(tmp_path, 2, "iqn.2024-01.org.example:other", "FAILED")
    assert [(s.name, s.target, s.state) for s in iscsi_sessions(tmp_path)] == [
        ("session1", IQN, "LOGGED_IN"),
        ("session2", "iqn.2024-01.org.example:other", "FAILED"),
    ]


async def test_a_file_check_reads_the_image_and_gives_up_on_a_blocked_read(
    tmp_path: Path,
) -> None:
    image = tmp_path / "vm1.img"
    image.write_bytes(b"\0" * 8192)
    files = FileCheck(timeout=0.5)
    assert await files.check(str(image)) is None
    image.unlink()
    problem = await files.check(str(image))
    assert problem is not None and "No such file" in problem

    fifo = tmp_path / "blocked"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a hung read
    first = await files.check(str(fifo))
    assert first == f"no answer reading {fifo} within 0.5 s"
    second = await files.check(str(fifo))
    assert second is not None and "blocked for more than 0.5 s" in second
    writer = await asyncio.to_thread(os.open, fifo, os.O_WRONLY)  # unblocks the thread
    os.close(writer)
    await eventually(lambda: not files.busy(str(fifo)), "the blocked read returned", timeout=30)


async def test_a_read_blocked_for_ever_does_not_keep_the_process_from_exiting(
    tmp_path: Path,
) -> None:
    """The check's thread is still blocked on the FIFO when SIGTERM comes: the process exits
    (with `asyncio.to_thread` it waited for that thread for ever, at the loop's shutdown)."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BLOCKED_READ_CHILD),
        str(fifo),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(BLOCKED_READ_CHILD.parents[1])},  # this tree's code
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line.decode().strip() == f"no answer reading {fifo} within 0.2 s"
        child.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.wait(), 60) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_many_images_are_read_in_one_thread_and_a_blocked_one_does_not_stop_the_rest(
    tmp_path: Path,
) -> None:
    images = [tmp_path / f"vm{i}.img" for i in range(3)]
    for image in images:
        image.write_bytes(b"\0" * 8192)
    missing, fifo = tmp_path / "missing.img", tmp_path / "blocked"
    os.mkfifo(fifo)
    files = FileCheck(timeout=0.5)
    first, second, third = (str(image) for image in images)
    assert await files.check_many([first, str(missing), second]) == {
        first: None,
        str(missing): f"cannot read {missing}: No such file or directory",
        second: None,
    }

    # The batch's thread blocks on the FIFO: it is reported, the image after it still read.
    problems = await files.check_many([first, str(fifo), third])
    assert problems == {
        first: None,
        str(fifo): f"no answer reading {fifo} within 0.5 s",
        third: None,
    }
    assert files.busy(str(fifo))
    again = await files.check_many([str(fifo), third])
    blocked = f"a read of {fifo} has been blocked for more than 0.5 s"
    assert again == {str(fifo): blocked, third: None}
    writer = await asyncio.to_thread(os.open, fifo, os.O_WRONLY)  # unblocks the thread
    os.close(writer)
    await eventually(lambda: not files.busy(str(fifo)), "the blocked read returned", timeout=30)


async def test_a_portal_check_connects() -> None:
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await check_portal(f"127.0.0.1:{port}") is None
    finally:
        server.close()
        await server.wait_closed()
    closed = await check_portal(f"127.0.0.1:{free_port()}", timeout=5)
    assert closed is not None and "refused" in closed.lower()


def watch_of(node: str, vms: list[VirtualMachine], sysfs: Path) -> StorageWatch:
    target = IscsiTarget(
        metadata=ObjectMeta(name="vg-cluster"),
        spec=IscsiTargetSpec.model_validate(
            {"node": "storage1", "iqn": IQN, "luns": [{"lun": 1, "backingStore": "/srv/a.img"}]}
        ),
    )
    group = VolumeGroup(
        metadata=ObjectMeta(name="vg-cluster"),
        spec=VolumeGroupSpec.model_validate(
            {
                "vgName": "vg_cluster",
                "physicalVolumes": [{"iscsi": {"target": "vg-cluster", "lun": 1}}],
            }
        ),
    )
    sources = StorageSources(
        vms=lambda: vms,
        volume_groups=lambda: [group],
        iscsi_target=lambda name: target if name == "vg-cluster" else None,
        node=lambda _name: None,
    )
    return StorageWatch(node, sources, lvm=None, sysfs=sysfs, timeout=2)


async def test_a_vg_on_iscsi_is_lost_while_its_session_is_not_logged_in(tmp_path: Path) -> None:
    vm = vm_object("vm1", disks=[{"volume": "vg_cluster/lv_vm1"}])
    watch = watch_of("a", [vm], tmp_path)
    assert await watch.lost() == {
        "vg vg_cluster": f"iSCSI session to {IQN} (LUN 1 of IscsiTarget vg-cluster) is "
        "not logged in"
    }
    sysfs_session(tmp_path, 1, IQN, "LOGGED_IN")
    assert await watch.lost() == {}
    sysfs_session(tmp_path, 1, IQN, "FAILED")
    assert (await watch.lost())["vg vg_cluster"].endswith("is FAILED")


async def test_a_node_that_lost_a_vms_image_is_fenced_before_the_vm_is_recovered(
    store: Store, leases: Leases, controller: Manager, tmp_path: Path
) -> None:
    """The agent's watch reports the lost image in a's status; the controller (storageLoss
    fence) powers a off through fence_dummy, then places the VM on b (which reports nothing
    lost). The image back: the report is healthy again."""
    storage_loss = {"action": "fence", "graceSeconds": 0}
    power = await power_fenced_node(store, tmp_path, "a", "a", storage_loss)
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    image = tmp_path / "vm1.img"
    image.write_bytes(b"\0" * 4096)
    await store.create(vm_object("vm1", disks=[{"file": str(image)}]))
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    await report_running(store, "vm1", "a")

    vm = await store.get(VirtualMachine, "vm1")
    watch = watch_of("a", [vm], tmp_path)
    agent_store = store.as_writer(node_writer("a"))
    await watch.report(agent_store)
    node = await get_node(store, "a")
    condition = node.status.condition("StorageReachable")
    assert condition is not None and condition.status == "True", node.status
    assert node.status.storage_lost == []

    image.unlink()
    await watch.report(agent_store)
    node = await get_node(store, "a")
    assert [lost.path for lost in node.status.storage_lost] == [f"file {image}"]
    condition = node.status.condition("StorageReachable")
    assert condition is not None and condition.reason == "StoragePathLost", condition

    await eventually(lambda: placed_on(store, "vm1", "b"), "vm1 recovered on b")
    fenced = await get_node(store, "a")
    assert fenced.status.health == "Fenced" and power.read_text() == "off"
    lost = {"StorageLost", "NodeLost", "NodeFenced"}
    await eventually(lambda: recorded(store, "ClusterNode", "a", lost), "a's storage events")

    image.write_bytes(b"\0" * 4096)
    await watch.report(agent_store)
    node = await get_node(store, "a")
    assert node.status.storage_lost == []
    condition = node.status.condition("StorageReachable")
    assert condition is not None and condition.status == "True"
