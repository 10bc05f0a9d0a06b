"""The tgtadm driver against a real tgtd on loopback; libiscsi tools and qemu-io as initiators."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from e2e.harness.polling import eventually
from e2e.harness.tgtd import TgtDaemon
from reconcilers.drivers.tgt import Target, TgtAdm, TgtError, TgtUnavailable, parse_targets
from reconcilers.tgtd_supervisor import CONTROL_SOCKET_DIR as SOCKET_DIR

MIB = 1024 * 1024
DEADLINE = 60.0
"""Seconds to wait for a condition; generous because the machine is shared and slow."""


@pytest.fixture
def tgtd() -> Iterator[TgtDaemon]:
    with TgtDaemon() as daemon:
        yield daemon


@pytest.fixture
def adm(tgtd: TgtDaemon) -> TgtAdm:
    return TgtAdm(tgtd.control_port)


@pytest.fixture
def iqn() -> str:
    return f"iqn.2024-01.org.kvmctl.test:{uuid.uuid4().hex[:8]}"


def backing_file(directory: Path, name: str, size: int) -> Path:
    """A sparse file of `size` bytes, as `truncate -s` makes it."""
    path = directory / name
    with open(path, "wb") as file:
        file.truncate(size)
    return path


async def initiator(*args: str) -> tuple[int, str]:
    """Run a libiscsi tool; its exit status and output (stdout and stderr together)."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), DEADLINE)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def only_target(adm: TgtAdm) -> Target:
    targets = await adm.show()
    assert len(targets) == 1
    return targets[0]


@pytest.fixture
async def exported(adm: TgtAdm, iqn: str, tmp_path: Path) -> AsyncIterator[Path]:
    """Target 1 with a 64 MiB file as LUN 1, open to all initiators."""
    disk = backing_file(tmp_path, "lun1.img", 64 * MIB)
    await adm.new_target(1, iqn)
    await adm.add_lun(1, 1, disk)
    await adm.bind_address(1, "ALL")
    yield disk


async def test_portals_are_the_ones_tgtd_listens_on(adm: TgtAdm, tgtd: TgtDaemon) -> None:
    assert await adm.portals() == [tgtd.portal]


async def test_target_and_lun_are_visible_to_an_initiator(
    adm: TgtAdm, tgtd: TgtDaemon, iqn: str, exported: Path
) -> None:
    target = await only_target(adm)
    assert (target.tid, target.iqn, target.state) == (1, iqn, "ready")
    assert [lun.number for lun in target.luns] == [0, 1]
    controller, disk = target.luns
    assert controller.type == "controller"
    assert controller.backing_store_path is None
    assert disk.type == "disk"
    assert disk.backing_store_path == str(exported)
    assert disk.size_mb == 67  # 64 MiB in tgtd's decimal megabytes
    assert disk.block_size == 512
    assert disk.online and not disk.readonly
    assert target.acl_addresses == ("ALL",)
    assert target.sessions == ()

    status, listing = await initiator("iscsi-ls", "-s", tgtd.url())
    assert status == 0, listing
    assert f"Target:{iqn}" in listing
    assert "Lun:1" in listing and "DIRECT_ACCESS" in listing

    status, inquiry = await initiator("iscsi-inq", tgtd.url(iqn, 1))
    assert status == 0, inquiry
    assert "Peripheral Device Type:DIRECT_ACCESS" in inquiry


async def test_luns_and_targets_are_removed(adm: TgtAdm, exported: Path, tmp_path: Path) -> None:
    await adm.add_lun(1, 2, backing_file(tmp_path, "lun2.img", 8 * MIB))
    assert [lun.number for lun in (await only_target(adm)).luns] == [0, 1, 2]

    await adm.delete_lun(1, 1)
    assert [lun.number for lun in (await only_target(adm)).luns] == [0, 2]

    await adm.delete_target(1)
    assert await adm.show() == []


async def test_an_initiator_outside_the_address_acl_is_refused(
    adm: TgtAdm, tgtd: TgtDaemon, iqn: str, exported: Path
) -> None:
    await adm.unbind_address(1, "ALL")
    await adm.bind_address(1, "10.0.0.5")
    await adm.bind_address(1, "192.168.0.0/24")
    assert (await only_target(adm)).acl_addresses == ("10.0.0.5", "192.168.0.0/24")

    status, output = await initiator("iscsi-inq", tgtd.url(iqn, 1))
    assert status != 0
    assert "Login Failed" in output

    await adm.bind_address(1, "127.0.0.1")
    status, output = await initiator("iscsi-inq", tgtd.url(iqn, 1))
    assert status == 0, output


async def test_an_initiator_outside_the_name_acl_is_refused(
    adm: TgtAdm, tgtd: TgtDaemon, iqn: str, exported: Path
) -> None:
    allowed = "iqn.2024-01.org.kvmctl.test:host1"
    await adm.unbind_address(1, "ALL")
    await adm.bind_initiator_name(1, allowed)
    target = await only_target(adm)
    assert target.acl_initiator_names == (allowed,)
    assert target.acl_addresses == ()

    status, output = await initiator(
        "iscsi-inq", "-i", "iqn.2024-01.org.kvmctl.test:intruder", tgtd.url(iqn, 1)
    )
    assert status != 0
    assert "Login Failed" in output

    status, output = await initiator("iscsi-inq", "-i", allowed, tgtd.url(iqn, 1))
    assert status == 0, output

    await adm.unbind_initiator_name(1, allowed)
    assert (await only_target(adm)).acl_initiator_names == ()


async def test_chap_refuses_a_wrong_secret_and_accepts_the_right_one(
    adm: TgtAdm, tgtd: TgtDaemon, iqn: str, exported: Path
) -> None:
    password = "Right-Secret-" + uuid.uuid4().hex[:6]
    await adm.new_account("host1", password)
    await adm.bind_account(1, "host1")
    assert await adm.list_accounts() == ["host1"]
    assert (await only_target(adm)).accounts == ("host1",)

    def lun_url(credentials: str) -> str:
        return f"iscsi://{credentials}@{tgtd.portal}/{iqn}/1"

    status, output = await initiator("iscsi-inq", tgtd.url(iqn, 1))
    assert status != 0, "logged in without CHAP"
    status, output = await initiator("iscsi-inq", lun_url("host1%wrong-secret-123"))
    assert status != 0
    assert "Authentication failure" in output
    status, output = await initiator("iscsi-inq", lun_url(f"host1%{password}"))
    assert status == 0, output

    await adm.unbind_account(1, "host1")
    await adm.delete_account("host1")
    assert await adm.list_accounts() == []
    assert (await only_target(adm)).accounts == ()


async def test_outgoing_account_for_mutual_chap(adm: TgtAdm, exported: Path) -> None:
    await adm.new_account("target1", "Target-Secret-1")
    await adm.bind_account(1, "target1", outgoing=True)
    target = await only_target(adm)
    assert (target.accounts, target.outgoing_account) == ((), "target1")
    await adm.unbind_account(1, "target1", outgoing=True)
    assert (await only_target(adm)).outgoing_account is None


async def test_passwords_never_show_in_errors_or_logs(
    adm: TgtAdm, caplog: pytest.LogCaptureFixture
) -> None:
    password = "Never-Shown-" + uuid.uuid4().hex[:6]
    caplog.set_level(logging.DEBUG, logger="reconcilers.drivers.tgt")
    await adm.new_account("host1", password)
    with pytest.raises(TgtError) as refused:
        await adm.new_account("host1", password)
    assert "new account host1 failed" in str(refused.value)
    assert password not in str(refused.value)
    assert password not in repr(refused.value)
    assert password not in repr(adm)
    assert password not in caplog.text
    assert "new account host1" in caplog.text


async def test_sessions_are_reported_and_survive_lun_changes(
    adm: TgtAdm, tgtd: TgtDaemon, iqn: str, exported: Path, tmp_path: Path
) -> None:
    """qemu-io keeps a session open for as long as its stdin is."""
    holder = "iqn.2024-01.org.kvmctl.test:holder"
    image = f"driver=iscsi,transport=tcp,portal={tgtd.portal},target={iqn},lun=1"
    qemu_io = await asyncio.create_subprocess_exec(
        "qemu-io",
        "--image-opts",
        f"{image},initiator-name={holder}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def connected() -> bool:
            return bool((await only_target(adm)).sessions)

        await eventually(connected, "qemu-io's session")
        (session,) = (await only_target(adm)).sessions
        assert session.initiator == holder
        assert session.alias is None
        assert session.addresses == ("127.0.0.1",)

        await adm.add_lun(1, 2, backing_file(tmp_path, "lun2.img", 8 * MIB))
        await adm.delete_lun(1, 2)
        assert (await only_target(adm)).sessions == (session,)

        with pytest.raises(TgtError, match="delete target 1 failed"):
            await adm.delete_target(1)
    finally:
        assert qemu_io.stdin is not None
        qemu_io.stdin.close()
        try:
            await asyncio.wait_for(qemu_io.wait(), DEADLINE)
        except TimeoutError:
            qemu_io.kill()
            await qemu_io.wait()

    async def disconnected() -> bool:
        return not (await only_target(adm)).sessions

    await eventually(disconnected, "the session to end")
    await adm.delete_target(1)
    assert await adm.show() == []


async def test_forced_delete_drops_connected_initiators(
    adm: TgtAdm, tgtd: TgtDaemon, iqn: str, exported: Path
) -> None:
    image = f"driver=iscsi,transport=tcp,portal={tgtd.portal},target={iqn},lun=1"
    qemu_io = await asyncio.create_subprocess_exec(
        "qemu-io",
        "--image-opts",
        image,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def connected() -> bool:
            return bool((await only_target(adm)).sessions)

        await eventually(connected, "qemu-io's session")
        await adm.delete_target(1, force=True)
        assert await adm.show() == []
    finally:
        qemu_io.kill()
        await qemu_io.wait()


async def test_refused_requests_raise_readable_errors(
    adm: TgtAdm, iqn: str, exported: Path, tmp_path: Path
) -> None:
    with pytest.raises(TgtError, match=r"^new target 1 \(.*\) failed: this target already exists$"):
        await adm.new_target(1, iqn)
    with pytest.raises(TgtError, match=r"^delete target 9 failed: can't find the target$"):
        await adm.delete_target(9)
    missing = tmp_path / "missing.img"
    with pytest.raises(TgtError, match=re.escape(f"backing store {missing} does not exist")):
        await adm.add_lun(1, 2, missing)
    with pytest.raises(TgtError, match="not an IP address"):
        await adm.bind_address(1, "host1")
    target = await only_target(adm)
    assert [lun.number for lun in target.luns] == [0, 1]
    assert target.acl_addresses == ("ALL",)


async def test_a_missing_daemon_is_unavailable(tgtd: TgtDaemon) -> None:
    unused = next(
        port
        for port in range(tgtd.control_port + 1, tgtd.control_port + 1000)
        if not (SOCKET_DIR / f"socket.{port}").exists()
    )
    nobody = TgtAdm(unused)
    assert not await nobody.is_running()
    with pytest.raises(TgtUnavailable, match=f"no tgtd on control port {unused}"):
        await nobody.show()

    adm = TgtAdm(tgtd.control_port)
    assert await adm.is_running()
    tgtd.stop()
    assert not await adm.is_running()


async def test_a_request_waits_for_a_tgtd_that_is_starting(
    iqn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No tgtd answers at first (the supervisor is starting it): the request is retried and
    goes through once it does. (Retried long enough here for the test's tgtd to start.)"""
    caplog.set_level(logging.INFO, logger="reconcilers.drivers.tgt")
    daemon = TgtDaemon()
    adm = TgtAdm(daemon.control_port, not_connected_retry=DEADLINE)
    request = asyncio.create_task(adm.new_target(1, iqn))
    try:

        def retried() -> bool:
            return any("no tgtd on control port" in r.getMessage() for r in caplog.records)

        await eventually(retried, "a retry of the request while no tgtd answers")
        assert not request.done()
        await asyncio.to_thread(daemon.start)
        await asyncio.wait_for(request, DEADLINE)
        assert [target.iqn for target in await adm.show()] == [iqn]
    finally:
        request.cancel()
        await asyncio.wait({request})
        daemon.close()


async def test_stop_daemon_once_its_targets_are_gone(
    adm: TgtAdm, tgtd: TgtDaemon, exported: Path
) -> None:
    with pytest.raises(TgtError, match=r"^stop tgtd failed: "):
        await adm.stop_daemon()
    await adm.delete_target(1)
    await adm.stop_daemon()

    async def exited() -> bool:
        return tgtd.process is not None and tgtd.process.poll() is not None

    await eventually(exited, "tgtd to exit")
    assert not await adm.is_running()


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of our own with loopback up."""
    name = f"kvmctl-tgt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


async def test_tgtd_in_a_network_namespace(netns: str, iqn: str, tmp_path: Path) -> None:
    """The portal lives in the namespace; the control socket stays reachable from here."""
    with TgtDaemon(portal="127.0.0.1:3260", netns=netns) as daemon:
        adm = TgtAdm(daemon.control_port)
        await adm.new_target(1, iqn)
        await adm.add_lun(1, 1, backing_file(tmp_path, "lun1.img", 8 * MIB))
        await adm.bind_address(1, "ALL")
        status, listing = await initiator(
            "ip", "netns", "exec", netns, "iscsi-ls", "-s", daemon.url()
        )
        assert status == 0, listing
        assert f"Target:{iqn}" in listing


def test_parse_targets_reads_every_section() -> None:
    output = """\
Target 3: iqn.2024-01.org.example:storage
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 7
            Initiator: iqn.2024-01.org.example:host1 alias: host1.example
            Connection: 0
                IP Address: 10.0.0.1
            Connection: 1
                IP Address: 10.0.1.1
    LUN information:
        LUN: 0
            Type: controller
            Size: 0 MB, Block size: 1
            Online: Yes
            Readonly: No
            Backing store type: null
            Backing store path: None
            Backing store flags:
        LUN: 1
            Type: disk
            Size: 53687 MB, Block size: 512
            Online: Yes
            Readonly: Yes
            Backing store type: rdwr
            Backing store path: /dev/vg: storage/lun1
            Backing store flags:
    Account information:
        host1
        host2
        storage (outgoing)
    ACL information:
        ALL
        10.0.0.0/24
        iqn.2024-01.org.example:host1
"""
    (target,) = parse_targets(output)
    assert (target.tid, target.iqn, target.state) == (3, "iqn.2024-01.org.example:storage", "ready")
    (session,) = target.sessions
    assert session.nexus_id == 7
    assert session.initiator == "iqn.2024-01.org.example:host1"
    assert session.alias == "host1.example"
    assert session.addresses == ("10.0.0.1", "10.0.1.1")
    lun = target.luns[1]
    assert (lun.number, lun.size_mb, lun.readonly) == (1, 53687, True)
    assert lun.backing_store_path == "/dev/vg: storage/lun1"
    assert target.accounts == ("host1", "host2")
    assert target.outgoing_account == "storage"
    assert target.acl_addresses == ("ALL", "10.0.0.0/24")
    assert target.acl_initiator_names == ("iqn.2024-01.org.example:host1",)
    assert parse_targets("") == []


def test_the_daemon_leaves_no_control_socket_behind() -> None:
    with TgtDaemon() as daemon:
        socket_path = SOCKET_DIR / f"socket.{daemon.control_port}"
        assert socket_path.exists()
        pid = daemon.process.pid if daemon.process else None
    assert pid is not None
    assert not socket_path.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
