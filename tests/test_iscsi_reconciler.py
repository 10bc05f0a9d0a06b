"""The IscsiTarget reconciler against a real tgtd and etcd, checked with libiscsi initiators
(`iscsi-ls`, `iscsi-inq`) and a long-lived `qemu-io` session."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.runtime.events import EventRecorder
from controller.runtime.store import Store
from crds import Event, IscsiTarget, ObjectMeta, Secret
from crds.iscsitarget import IscsiTargetSpec
from crds.secret import SecretSpec
from e2e.harness.tgtd import TgtDaemon, start_supervised_tgtd, storage_node
from reconcilers.drivers.tgt import TgtAdm
from reconcilers.iscsitarget import FINALIZER, FORCE_DELETE, IscsiTargetReconciler
from reconcilers.tgtd_supervisor import CONTROL_SOCKET_DIR

NODE = "storage1"
IQN = "iqn.2024-01.org.example:storage.vg-cluster"
INITIATOR = "iqn.2024-01.org.example:host1"
STRANGER = "iqn.2024-01.org.example:stranger"
DEADLINE = 30.0
LUN_BYTES = 8 << 20


@pytest.fixture
def tgtd() -> Iterator[TgtDaemon]:
    with TgtDaemon() as daemon:  # it picks free ports, again if one is taken at start-up
        yield daemon


@pytest.fixture
def disks(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"lun{n}.img" for n in (1, 2, 3)]
    for path in paths:
        with open(path, "wb") as file:
            file.truncate(LUN_BYTES)
    return paths


@pytest.fixture
async def reconciler(store: Store, tgtd: TgtDaemon, tmp_path: Path) -> IscsiTargetReconciler:
    await store.create(storage_node(NODE, tmp_path))  # the disks may be exported
    return IscsiTargetReconciler(
        store, NODE, EventRecorder(store, "agent", NODE), TgtAdm(tgtd.control_port)
    )


def target(name: str = "vg-cluster", iqn: str = IQN, **spec: object) -> IscsiTarget:
    fields: dict[str, object] = {"node": NODE, "iqn": iqn}
    fields.update(spec)
    return IscsiTarget(metadata=ObjectMeta(name=name), spec=IscsiTargetSpec.model_validate(fields))


async def converge(store: Store, reconciler: IscsiTargetReconciler, name: str) -> IscsiTarget:
    await reconciler.reconcile(name)
    obj = await store.get("IscsiTarget", name)
    assert isinstance(obj, IscsiTarget)
    return obj


def ready(obj: IscsiTarget) -> tuple[str, str, str]:
    condition = obj.status.condition("Ready")
    assert condition is not None
    return condition.status, condition.reason, condition.message


async def warnings(store: Store) -> list[tuple[str, str]]:
    objects, _ = await store.list_objects("Event")
    return [
        (e.spec.reason, e.spec.message)
        for e in objects
        if isinstance(e, Event) and e.spec.type == "Warning"
    ]


async def initiator(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), DEADLINE)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def lun_url(tgtd: TgtDaemon, lun: int, credentials: str = "") -> str:
    host = f"{credentials}@{tgtd.portal}" if credentials else tgtd.portal
    return f"iscsi://{host}/{IQN}/{lun}"


async def test_target_with_luns_open_to_all(
    store: Store, reconciler: IscsiTargetReconciler, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    luns = [{"lun": 1, "backingStore": str(disks[0])}, {"lun": 2, "backingStore": str(disks[1])}]
    await store.create(target(luns=luns, acl={"allowAll": True}))
    obj = await converge(store, reconciler, "vg-cluster")

    assert ready(obj)[:2] == ("True", "Serving")
    assert obj.status.tid == 1
    assert [(lun.lun, lun.size_bytes) for lun in obj.status.luns] == [
        (1, LUN_BYTES),
        (2, LUN_BYTES),
    ]
    assert FINALIZER in obj.metadata.finalizers
    code, output = await initiator("iscsi-ls", "-s", "-i", INITIATOR, f"iscsi://{tgtd.portal}")
    assert code == 0, output
    assert f"Target:{IQN}" in output
    assert "Lun:1" in output and "Lun:2" in output

    again = await converge(store, reconciler, "vg-cluster")
    assert again.metadata.resource_version == obj.metadata.resource_version  # nothing changed


async def test_only_named_initiators_get_in(
    store: Store, reconciler: IscsiTargetReconciler, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    await store.create(
        target(
            luns=[{"lun": 1, "backingStore": str(disks[0])}],
            acl={"initiatorNames": [INITIATOR]},
        )
    )
    assert ready(await converge(store, reconciler, "vg-cluster"))[0] == "True"
    code, output = await initiator("iscsi-inq", "-i", INITIATOR, lun_url(tgtd, 1))
    assert code == 0, output
    assert "IET" in output or "VIRTUAL-DISK" in output
    code, output = await initiator("iscsi-inq", "-i", STRANGER, lun_url(tgtd, 1))
    assert code != 0, output


async def test_an_initiator_outside_the_address_acl_is_refused(
    store: Store, reconciler: IscsiTargetReconciler, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    await store.create(
        target(
            luns=[{"lun": 1, "backingStore": str(disks[0])}],
            acl={"initiatorAddresses": ["192.0.2.50"]},
        )
    )
    assert ready(await converge(store, reconciler, "vg-cluster"))[0] == "True"
    code, output = await initiator("iscsi-inq", "-i", INITIATOR, lun_url(tgtd, 1))
    assert code != 0, output

    obj = await store.get("IscsiTarget", "vg-cluster")
    assert isinstance(obj, IscsiTarget)
    obj.spec = target(
        luns=[{"lun": 1, "backingStore": str(disks[0])}],
        acl={"initiatorAddresses": ["127.0.0.1"]},
    ).spec
    await store.update(obj)
    await converge(store, reconciler, "vg-cluster")
    code, output = await initiator("iscsi-inq", "-i", INITIATOR, lun_url(tgtd, 1))
    assert code == 0, output
    [shown] = await TgtAdm(tgtd.control_port).show()
    assert shown.acl_addresses == ("127.0.0.1",)


async def test_chap_from_a_secret_wrong_secret_refused(
    store: Store, reconciler: IscsiTargetReconciler, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    await store.create(
        Secret(metadata=ObjectMeta(name="chap"), spec=SecretSpec(data={"password": "s3cret-pass1"}))
    )
    await store.create(
        target(
            luns=[{"lun": 1, "backingStore": str(disks[0])}],
            acl={"allowAll": True},
            chap={"username": "host1", "secretRef": {"name": "chap", "key": "password"}},
        )
    )
    assert ready(await converge(store, reconciler, "vg-cluster"))[0] == "True"
    url = lun_url(tgtd, 1, "host1%s3cret-pass1")
    code, output = await initiator("iscsi-inq", "-i", INITIATOR, url)
    assert code == 0, output
    code, output = await initiator("iscsi-inq", "-i", INITIATOR, lun_url(tgtd, 1, "host1%wrong"))
    assert code != 0, output
    code, output = await initiator("iscsi-inq", "-i", INITIATOR, lun_url(tgtd, 1))
    assert code != 0, output

    # A rotated secret replaces the account's password.
    secret = await store.get("Secret", "chap")
    assert isinstance(secret, Secret)
    secret.spec.data["password"] = "rotated-pass2"
    await store.update(secret)
    await converge(store, reconciler, "vg-cluster")
    code, output = await initiator("iscsi-inq", "-i", INITIATOR, url)
    assert code != 0, output
    url = lun_url(tgtd, 1, "host1%rotated-pass2")
    code, output = await initiator("iscsi-inq", "-i", INITIATOR, url)
    assert code == 0, output


async def test_a_missing_backing_store_changes_nothing(
    store: Store, reconciler: IscsiTargetReconciler, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    missing = disks[0].parent / "absent.img"
    luns = [{"lun": 1, "backingStore": str(disks[0])}, {"lun": 2, "backingStore": str(missing)}]
    await store.create(target(luns=luns, acl={"allowAll": True}))
    obj = await converge(store, reconciler, "vg-cluster")
    status, reason, message = ready(obj)
    assert (status, reason) == ("False", "BackingStoreMissing")
    assert str(missing) in message
    assert ("BackingStoreMissing", message) in await warnings(store)
    assert await TgtAdm(tgtd.control_port).show() == []


@pytest.mark.parametrize("outside", ["/etc/shadow", "link-to-shadow", "../elsewhere.img"])
async def test_a_backing_store_outside_the_export_roots_exports_nothing(
    store: Store,
    reconciler: IscsiTargetReconciler,
    tgtd: TgtDaemon,
    disks: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
    outside: str,
) -> None:
    root = disks[0].parent  # the only export root of NODE (the reconciler fixture)
    if outside == "link-to-shadow":  # inside the root by name, /etc/shadow once resolved
        (root / outside).symlink_to("/etc/shadow")
        outside = str(root / outside)
    elif outside.startswith(".."):
        elsewhere = tmp_path_factory.mktemp("elsewhere") / "elsewhere.img"
        elsewhere.write_bytes(b"\0" * 4096)
        outside = str(elsewhere)
    luns = [{"lun": 1, "backingStore": str(disks[0])}, {"lun": 2, "backingStore": outside}]
    await store.create(target(luns=luns, acl={"allowAll": True}))
    obj = await converge(store, reconciler, "vg-cluster")
    status, reason, message = ready(obj)
    assert (status, reason) == ("False", "BackingStoreNotAllowed")
    assert outside in message and "spec.storage" in message and "\n" not in message
    assert ("BackingStoreNotAllowed", message) in await warnings(store)
    assert await TgtAdm(tgtd.control_port).show() == []  # not even the allowed LUN


async def test_without_export_roots_a_node_exports_nothing(
    store: Store, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    other = IscsiTargetReconciler(
        store, "storage2", EventRecorder(store, "agent", "storage2"), TgtAdm(tgtd.control_port)
    )  # no ClusterNode storage2 at all
    luns = [{"lun": 1, "backingStore": str(disks[0])}]
    await store.create(target(luns=luns, node="storage2"))
    obj = await converge(store, other, "vg-cluster")
    assert ready(obj)[:2] == ("False", "BackingStoreNotAllowed")
    assert await TgtAdm(tgtd.control_port).show() == []


async def test_an_iqn_taken_by_a_foreign_target_is_a_conflict(
    store: Store, reconciler: IscsiTargetReconciler, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    adm = TgtAdm(tgtd.control_port)
    await adm.new_target(1, IQN)
    await store.create(target(luns=[{"lun": 1, "backingStore": str(disks[0])}]))
    obj = await converge(store, reconciler, "vg-cluster")
    status, reason, message = ready(obj)
    assert (status, reason) == ("False", "IqnConflict")
    assert "does not own" in message
    [foreign] = await adm.show()
    assert [lun.number for lun in foreign.luns] == [0]  # untouched

    # Objects created in the same second are ordered by name: "x-second" is the younger one.
    await store.create(target(name="x-second", luns=[{"lun": 1, "backingStore": str(disks[1])}]))
    second = await converge(store, reconciler, "x-second")
    assert ready(second)[1] == "IqnConflict"
    assert "IscsiTarget vg-cluster" in ready(second)[2]


@contextlib.asynccontextmanager
async def qemu_io_session(url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A qemu-io process holding an iSCSI session open; killed by its PID at the end."""
    process = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "raw",
        url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def qemu_io(process: asyncio.subprocess.Process, command: str, expect: str) -> None:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"{command}\n".encode())
    await process.stdin.drain()
    seen = b""
    while expect.encode() not in seen:
        chunk = await asyncio.wait_for(process.stdout.read(4096), DEADLINE)
        assert chunk, f"qemu-io ended: {seen.decode(errors='replace')}"
        seen += chunk


async def test_luns_change_without_dropping_sessions_and_delete_waits_for_initiators(
    store: Store, reconciler: IscsiTargetReconciler, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    adm = TgtAdm(tgtd.control_port)
    await store.create(
        target(
            luns=[
                {"lun": 1, "backingStore": str(disks[0])},
                {"lun": 2, "backingStore": str(disks[1])},
            ],
            acl={"allowAll": True},
        )
    )
    await converge(store, reconciler, "vg-cluster")
    async with qemu_io_session(lun_url(tgtd, 1)) as session:
        await qemu_io(session, "write -P 0x5a 0 4096", "wrote 4096/4096")
        [before] = (await adm.show())[0].sessions
        obj = await converge(store, reconciler, "vg-cluster")
        assert len(obj.status.sessions) == 1 and obj.status.sessions[0].startswith("iqn.")

        obj.spec = target(
            luns=[
                {"lun": 1, "backingStore": str(disks[0])},
                {"lun": 3, "backingStore": str(disks[2])},
            ],
            acl={"allowAll": True},
        ).spec
        await store.update(obj)
        obj = await converge(store, reconciler, "vg-cluster")
        assert [lun.lun for lun in obj.status.luns] == [1, 3]
        [after] = (await adm.show())[0].sessions
        assert after.nexus_id == before.nexus_id
        await qemu_io(session, "read -P 0x5a 0 4096", "read 4096/4096")

        await store.delete("IscsiTarget", "vg-cluster")
        blocked = await converge(store, reconciler, "vg-cluster")
        status, reason, message = ready(blocked)
        assert (status, reason) == ("False", "DeleteBlocked")
        assert "1 initiator(s) connected" in message
        assert len(await adm.show()) == 1

        blocked.metadata.annotations[FORCE_DELETE] = "true"
        await store.update(blocked)
        await reconciler.reconcile("vg-cluster")
        assert await adm.show() == []
        assert await store.try_get("IscsiTarget", "vg-cluster") is None


async def test_tids_are_stable_and_distinct(
    store: Store, reconciler: IscsiTargetReconciler, tgtd: TgtDaemon, disks: list[Path]
) -> None:
    adm = TgtAdm(tgtd.control_port)
    await adm.new_target(1, "iqn.2024-01.org.example:by-hand")
    await store.create(target(name="a", iqn=f"{IQN}-a"))
    await store.create(target(name="b", iqn=f"{IQN}-b"))
    a = await converge(store, reconciler, "a")
    b = await converge(store, reconciler, "b")
    assert (a.status.tid, b.status.tid) == (2, 3)
    assert {(t.tid, t.iqn) for t in await adm.show()} == {
        (1, "iqn.2024-01.org.example:by-hand"),
        (2, f"{IQN}-a"),
        (3, f"{IQN}-b"),
    }
    assert (await converge(store, reconciler, "a")).status.tid == 2


async def test_supervisor_starts_tgtd_only_when_absent_and_stops_it_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = await start_supervised_tgtd()  # its first ensure_running() started tgtd
    port = supervisor.control_port
    try:
        assert not await supervisor.ensure_running()
        assert await supervisor.adm.is_running()
        assert (CONTROL_SOCKET_DIR / f"socket.{port}").exists()
        await supervisor.adm.new_target(1, IQN)  # tgtd only exits once its targets are gone
    finally:
        await supervisor.stop()
    assert not await supervisor.adm.is_running()
    assert "did not stop on request" not in caplog.text
    assert not (CONTROL_SOCKET_DIR / f"socket.{port}").exists()
    assert not (CONTROL_SOCKET_DIR / f"socket.{port}.lock").exists()
