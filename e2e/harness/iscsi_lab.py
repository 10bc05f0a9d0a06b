"""Shared by the kernel lab's iSCSI tests (e2e/lab_tests): a tgtd and an open-iscsi initiator of
the test's own, a LUN on a file, a login, the node's LVM settings and the target served by the
IscsiTarget reconciler. Fixtures are bound in each test module (`store = iscsi_lab.store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from controller.runtime.events import EventRecorder
from controller.runtime.store import Store
from crds import IscsiTarget, ObjectMeta, VolumeGroup
from crds.iscsitarget import IscsiTargetSpec
from crds.volumegroup import VolumeGroupSpec
from e2e.harness.etcd import free_port
from e2e.harness.polling import eventually
from e2e.harness.tgtd import storage_node
from reconcilers.drivers.tgt import TgtAdm
from reconcilers.iscsitarget import IscsiTargetReconciler
from reconcilers.lv_claim import active_tag
from reconcilers.lvm_lock import LvmSettings
from reconcilers.tgtd_supervisor import TgtdSupervisor
from reconcilers.volumegroup import VolumeGroupReconciler

STORAGE_NODE = "storage1"
NODE = "host1"
IQN = "iqn.2024-01.org.example:storage.vg-cluster"
INITIATOR = "iqn.2024-01.org.example:host1"
LUN = 1
LV = "lv_vm1"
MIB = 1 << 20
LUN_BYTES = 32 * MIB
DEADLINE = 120.0
"""Generous: Python and the iSCSI login are slow under TCG."""
COMMAND_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
PACKAGES = "Debian packages open-iscsi, tgt, lvm2"
ISCSI_ERR_NO_OBJS_FOUND = 21
"""iscsiadm's exit status for "no sessions": iscsid answered."""


async def run(*argv: str) -> tuple[int, str]:
    """Run a command; its exit status and output (stdout and stderr)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError:
        raise AssertionError(f"{argv[0]} is not installed ({PACKAGES})") from None
    try:
        output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{' '.join(argv)}: no answer within {COMMAND_TIMEOUT} s") from None
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def check(*argv: str) -> str:
    code, output = await run(*argv)
    assert code == 0, f"{' '.join(argv)} exited with {code}: {output}"
    return output


@pytest.fixture
async def store(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Store]:
    async with Store(etcd_endpoints, prefix=key_prefix) as connected:
        yield connected


@pytest.fixture
async def tgtd() -> AsyncIterator[TgtdSupervisor]:
    """A tgtd of the test's own (free portal on loopback, random control port <= 32767)."""
    supervisor = TgtdSupervisor(
        portal=f"127.0.0.1:{free_port()}", control_port=random.randint(20000, 32000)
    )
    try:
        assert await supervisor.ensure_running(), "a tgtd already answers on the control port"
        yield supervisor
    finally:
        await supervisor.stop()


@pytest.fixture
def initiator_name_file(tmp_path: Path) -> Path:
    path = tmp_path / "initiatorname.iscsi"
    path.write_text(f"InitiatorName={INITIATOR}\n")
    return path


@pytest.fixture
def iscsid_log(tmp_path: Path) -> Iterator[BinaryIO]:
    with open(tmp_path / "iscsid.log", "w+b") as log:
        yield log


@pytest.fixture
async def iscsid(
    initiator_name_file: Path, iscsid_log: BinaryIO
) -> AsyncIterator[asyncio.subprocess.Process]:
    """open-iscsi's daemon with an initiator name of the test's own, stopped by its PID."""
    # No udev in the lab to load sd_mod when the LUN appears.
    await check("modprobe", "-a", "iscsi_tcp", "sd_mod")
    # iscsiadm locks its node database there (systemd-tmpfiles makes it on a real host).
    await asyncio.to_thread(Path("/run/lock/iscsi").mkdir, parents=True, exist_ok=True)
    await check("iscsid", "--version")
    # Its own session: on SIGTERM iscsid -f signals its whole process group (pytest's too).
    process = await asyncio.create_subprocess_exec(
        "iscsid",
        "-f",
        "-c",
        "/etc/iscsi/iscsid.conf",
        "-i",
        str(initiator_name_file),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=iscsid_log,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )

    async def answers() -> bool:
        if process.returncode is not None:
            log = await asyncio.to_thread(Path(iscsid_log.name).read_text, errors="replace")
            raise AssertionError(f"iscsid exited with {process.returncode}: {log}")
        code, _ = await run("iscsiadm", "-m", "session")
        return code in (0, ISCSI_ERR_NO_OBJS_FOUND)

    try:
        await eventually(answers, "iscsid answers iscsiadm", timeout=DEADLINE, interval=0.2)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.fixture
def backing_store(tmp_path: Path) -> Path:
    path = tmp_path / "lun1.img"
    with open(path, "wb") as file:
        file.truncate(LUN_BYTES)
    return path


def attached_disk(iqn: str, lun: int) -> str | None:
    """The /dev/sdX the kernel gave LUN `lun` of a session to `iqn`, once its node exists."""
    for session in Path("/sys/class/iscsi_session").glob("session*"):
        if (session / "targetname").read_text().strip() != iqn:
            continue
        for block in (session / "device").glob(f"target*/*:*:*:{lun}/block/*"):
            device = Path("/dev") / block.name
            if device.exists():
                return str(device)
    return None


@contextlib.asynccontextmanager
async def logged_in(iqn: str, portal: str) -> AsyncIterator[str]:
    """A session to `iqn` at `portal` through iscsiadm; yields LUN 1's disk (/dev/sdX).
    Afterwards the session is logged out and the node record deleted."""
    node = ("iscsiadm", "-m", "node", "-T", iqn, "-p", portal)
    await check(*node, "-o", "new")
    try:
        await check(*node, "--login")
        try:
            yield await eventually(
                lambda: asyncio.to_thread(attached_disk, iqn, LUN),
                f"LUN {LUN} of {iqn} attached as a SCSI disk",
                timeout=DEADLINE,
                interval=0.2,
            )
        finally:
            await run(*node, "--logout")
    finally:
        await run(*node, "-o", "delete")


def lvm_settings(tmp_path: Path, by_path_link: str) -> LvmSettings:
    """Host1's LVM: real activation, only the iSCSI disk, only LVs tagged for host1."""
    by_path_dir = str(Path(by_path_link).parent)
    system_dir = tmp_path / "lvm-host1"
    system_dir.mkdir()
    # LVM accepts links only under the directories it scans; the real /dev/disk/by-path is
    # under /dev, which it scans by default.
    (system_dir / "lvm.conf").write_text(
        "global { activation = 1 }\n"
        "devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 "
        f'scan = [ "/dev", "{by_path_dir}" ] }}\n'
        "backup { backup = 0 archive = 0 }\n"
        "activation { udev_sync = 0 udev_rules = 0 "
        f'volume_list = [ "@{active_tag(NODE)}" ] }}\n'
    )
    return LvmSettings(
        str(system_dir),
        (by_path_link,),
        lock_ttl=10,
        lock_timeout=60,
        by_path_dir=by_path_dir,
    )


def volume_group(vg: str, lvs: dict[str, str]) -> VolumeGroup:
    return VolumeGroup(
        metadata=ObjectMeta(name="vg-cluster"),
        spec=VolumeGroupSpec.model_validate(
            {
                "vgName": vg,
                "nodes": [NODE],
                "physicalVolumes": [{"iscsi": {"target": "vg-cluster", "lun": LUN}}],
                "logicalVolumes": [{"name": name, "size": size} for name, size in lvs.items()],
            }
        ),
    )


async def converge(store: Store, reconciler: VolumeGroupReconciler) -> VolumeGroup:
    await reconciler.reconcile("vg-cluster")
    obj = await store.get("VolumeGroup", "vg-cluster")
    assert isinstance(obj, VolumeGroup)
    return obj


def ready(obj: VolumeGroup | IscsiTarget) -> tuple[str, str, str]:
    condition = obj.status.condition("Ready")
    assert condition is not None
    return condition.status, condition.reason, condition.message


def write_through(device: str, data: bytes) -> None:
    """Write `data` at the start of `device` and flush it to the target."""
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


async def serve_target(
    store: Store, tgtd: TgtdSupervisor, backing_store: Path
) -> IscsiTargetReconciler:
    """The IscsiTarget `vg-cluster` (LUN 1 on `backing_store`) served by `tgtd`; its reconciler."""
    await store.create(storage_node(STORAGE_NODE, backing_store.parent))
    await store.create(
        IscsiTarget(
            metadata=ObjectMeta(name="vg-cluster"),
            spec=IscsiTargetSpec.model_validate(
                {
                    "node": STORAGE_NODE,
                    "iqn": IQN,
                    "portal": tgtd.portal,
                    "luns": [{"lun": LUN, "backingStore": str(backing_store)}],
                    "acl": {"allowAll": True},
                }
            ),
        )
    )
    targets = IscsiTargetReconciler(
        store,
        STORAGE_NODE,
        EventRecorder(store, "agent", STORAGE_NODE),
        TgtAdm(tgtd.control_port),
    )
    await targets.reconcile("vg-cluster")
    target = await store.get("IscsiTarget", "vg-cluster")
    assert isinstance(target, IscsiTarget)
    assert ready(target)[:2] == ("True", "Serving"), ready(target)
    return targets
