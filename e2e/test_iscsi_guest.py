"""End to end: the agent's storage loop serves a LUN from the tgtd of its supervisor, a QEMU (TCG)
guest uses the LUN as its virtio disk, the target's status shows the guest's session, deletion waits
for the guest to let go, and data written through the LUN reads back through another initiator.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from controller.runtime.events import EventRecorder
from controller.runtime.store import Store
from crds import IscsiTarget, ObjectMeta
from crds.iscsitarget import IscsiTargetSpec
from e2e.guest.build import ensure_guest_image
from e2e.harness.tgtd import start_supervised_tgtd, storage_node
from reconcilers.drivers.tgt import TgtAdm
from reconcilers.storage import StorageSettings, run_storage_reconcilers
from reconcilers.tgtd_supervisor import TgtdSupervisor

NODE = "storage1"
IQN = "iqn.2024-01.org.example:storage.guest-disk"
DEADLINE = 120.0
PATTERN = "0x6b"


async def poll(describe: str, check: Callable[[], Awaitable[bool]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {describe}"
        await asyncio.sleep(0.2)


async def run(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), DEADLINE)
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"{args[0]} failed: {text}"
    return text


@contextlib.asynccontextmanager
async def guest_with_iscsi_disk(url: str, serial_log: Path) -> AsyncIterator[None]:
    """The tiny test guest under QEMU TCG with `url` as its virtio disk; killed by PID."""
    image = await asyncio.to_thread(ensure_guest_image)
    process = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64",
        "-machine",
        "pc,accel=tcg",
        "-m",
        "128",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        "console=ttyS0 panic=-1",
        "-serial",
        f"file:{serial_log}",
        "-drive",
        f"file={url},format=raw,if=none,id=lun1,cache=none",
        "-device",
        "virtio-blk-pci,drive=lun1",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "guest-disk.img"
    with open(path, "wb") as file:
        file.truncate(32 << 20)
    return path


@pytest.fixture
async def tgtd() -> AsyncIterator[TgtdSupervisor]:
    """The agent's supervisor, its tgtd started on a free control port and portal."""
    supervisor = await start_supervised_tgtd()
    try:
        yield supervisor
    finally:
        await supervisor.stop()


@pytest.mark.slow
@pytest.mark.timeout(1500)  # when it runs first, it downloads the guest kernel
async def test_a_guest_uses_a_lun_served_by_the_storage_loop(
    etcd_endpoints: list[str], key_prefix: str, tmp_path: Path, disk: Path, tgtd: TgtdSupervisor
) -> None:
    portal = tgtd.portal
    settings = StorageSettings(tgtd_control_port=tgtd.control_port, resync_period=None)
    adm = TgtAdm(settings.tgtd_control_port)
    url = f"iscsi://{portal}/{IQN}/1"
    async with Store(etcd_endpoints, prefix=key_prefix) as store:
        recorder = EventRecorder(store, "agent", NODE)
        loop_task = asyncio.create_task(
            run_storage_reconcilers(store, NODE, recorder, settings, tgtd)
        )
        try:
            await store.create(storage_node(NODE, disk.parent))
            await store.create(
                IscsiTarget(
                    metadata=ObjectMeta(name="guest-disk"),
                    spec=IscsiTargetSpec.model_validate(
                        {
                            "node": NODE,
                            "iqn": IQN,
                            "portal": portal,
                            "luns": [{"lun": 1, "backingStore": str(disk)}],
                            "acl": {"allowAll": True},
                        }
                    ),
                )
            )

            async def target() -> IscsiTarget:
                obj = await store.get("IscsiTarget", "guest-disk")
                assert isinstance(obj, IscsiTarget)
                return obj

            async def serving() -> bool:
                condition = (await target()).status.condition("Ready")
                return condition is not None and condition.reason == "Serving"

            await poll("the target to serve", serving)
            await run("qemu-io", "-f", "raw", "-c", f"write -P {PATTERN} 0 65536", url)

            async with guest_with_iscsi_disk(url, tmp_path / "serial.log"):

                async def guest_logged_in() -> bool:
                    shown = await adm.show()
                    return bool(shown) and len(shown[0].sessions) == 1

                await poll("the guest's iSCSI session", guest_logged_in)
                await store.delete("IscsiTarget", "guest-disk")

                async def delete_blocked() -> bool:
                    condition = (await target()).status.condition("Ready")
                    return condition is not None and condition.reason == "DeleteBlocked"

                await poll("deletion to wait for the guest", delete_blocked)
                assert len(await adm.show()) == 1
                # The guest's disk is still readable through a second session meanwhile.
                output = await run("qemu-io", "-f", "raw", "-c", f"read -P {PATTERN} 0 65536", url)
                assert "read 65536/65536" in output

            async def deleted() -> bool:
                return await store.try_get("IscsiTarget", "guest-disk") is None

            await poll("deletion once the guest is gone", deleted)
            assert await adm.show() == []
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
