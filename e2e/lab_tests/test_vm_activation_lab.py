"""The activation contract as the VM lifecycle drives it, with real device-mapper and a real etcd.

Two "nodes" share one loop device, each with its own LVM_SYSTEM_DIR whose lvm.conf only lets
LVs tagged for it activate (`volume_list = ["@kvmctl_active_<node>"]`), exactly as
test_lvm_lab.py sets them up; the claims live in a real etcd (the lab has the memory for it
since it boots with 768 MiB). The steps are the ones `reconcilers/virtualmachine.py` and
`reconcilers/migration.py` take: start (activate), stop (deactivate), the live-migration
hand-over (the target takes over from the source, the source deactivates) and its failure (the
source takes the claim back, the target deactivates).

Both nodes run in one kernel, so they share one device-mapper table: an LV active "on host1"
is also active "on host2", and a deactivation on one removes the other's device too. The test
therefore checks per step what each node's own LVM decides (claims, tags, the volume_list
filter) and never that two copies can be open at once, which needs two kernels.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from controller.runtime.store import Store
from e2e.harness.lvm_lab import is_active, lvm_conf
from reconcilers.drivers.lvm import LvmError
from reconcilers.lv_claim import (
    ActivationConflict,
    activate_for_vm,
    active_on,
    active_tag,
    deactivate,
)
from reconcilers.lvm_lock import LvmSettings

MIB = 1 << 20
LV = "lv_vm1"


@pytest.fixture
def loop_device(make_loop_device: Callable[[int], str]) -> str:
    return make_loop_device(24 * MIB)


@pytest.fixture
async def store(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Store]:
    async with Store(etcd_endpoints, prefix=key_prefix) as connected:
        yield connected


def node_settings(tmp_path: Path, node: str, device: str) -> LvmSettings:
    system_dir = tmp_path / f"lvm-{node}"
    system_dir.mkdir()
    (system_dir / "lvm.conf").write_text(lvm_conf(node))
    return LvmSettings(str(system_dir), (device,), lock_ttl=10, lock_timeout=60)


async def mapped(vg: str) -> bool:
    return await asyncio.to_thread(os.path.exists, f"/dev/mapper/{vg}-{LV}")


async def tags(settings: LvmSettings, vg: str) -> tuple[str, ...]:
    [lv] = await settings.driver().lvs(vg)
    return lv.tags


async def test_vm_start_stop_and_migration_hand_over_of_an_lv(
    tmp_path: Path, loop_device: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DM_DISABLE_UDEV", "1")  # no udev in the lab
    host1 = node_settings(tmp_path, "host1", loop_device)
    host2 = node_settings(tmp_path, "host2", loop_device)
    vg = f"vg_lab_{uuid.uuid4().hex[:6]}"
    await host1.driver().pvcreate(loop_device)
    await host1.driver().vgcreate(vg, [loop_device])
    await host1.driver().lvcreate(vg, LV, 8 * MIB)
    try:
        # Start on host1: claimed, tagged, really active.
        await activate_for_vm(store, host1, vg, LV, "host1")
        assert await active_on(store, vg, LV) == "host1"
        assert await tags(host1, vg) == (active_tag("host1"),)
        assert await is_active(host1.driver(), vg, LV) and await mapped(vg)

        # host2 can neither claim it nor take it over from a node that is not its source.
        with pytest.raises(ActivationConflict, match="is active on host1"):
            await activate_for_vm(store, host2, vg, LV, "host2")
        with pytest.raises(ActivationConflict):
            await activate_for_vm(store, host2, vg, LV, "host2", take_over_from="host3")
        assert await active_on(store, vg, LV) == "host1"

        # Stop on host1: deactivated, claim and tag gone.
        await deactivate(store, host1, vg, LV, "host1")
        assert await active_on(store, vg, LV) is None
        assert await tags(host1, vg) == ()
        assert not await mapped(vg)

        # An unclaimed LV: host2's own LVM refuses to activate it by hand (volume_list).
        await host2.driver().lvchange_activate(vg, LV, exclusive=True)
        assert not await mapped(vg)

        # A node whose lvm.conf does not admit its tag: activation is refused by LVM and the
        # claim and the tag are rolled back (host2's lvm.conf, claimed as "host3").
        with pytest.raises(LvmError, match="not active on host3"):
            await activate_for_vm(store, host2, vg, LV, "host3")
        assert await active_on(store, vg, LV) is None
        assert await tags(host1, vg) == ()

        # Start on host2 now that it is free.
        await activate_for_vm(store, host2, vg, LV, "host2")
        assert await active_on(store, vg, LV) == "host2"
        assert await is_active(host2.driver(), vg, LV) and await mapped(vg)
        await deactivate(store, host2, vg, LV, "host2")
        assert not await mapped(vg)

        # Live migration host1 -> host2. The VM runs on host1; the target takes over from its
        # source right before the migration starts.
        await activate_for_vm(store, host1, vg, LV, "host1")
        await activate_for_vm(store, host2, vg, LV, "host2", take_over_from="host1")
        assert await active_on(store, vg, LV) == "host2"
        assert await tags(host2, vg) == (active_tag("host2"),)
        assert await is_active(host2.driver(), vg, LV)
        # After the success the source deactivates: the target's claim and tag stay.
        await deactivate(store, host1, vg, LV, "host1")
        assert await active_on(store, vg, LV) == "host2"
        assert await tags(host1, vg) == (active_tag("host2"),)
        # (One kernel: that also removed "host2's" device.) Only host2's LVM activates it now.
        await host1.driver().lvchange_activate(vg, LV, exclusive=True)
        assert not await mapped(vg)
        await activate_for_vm(store, host2, vg, LV, "host2")
        assert await mapped(vg)

        # A migration back to host1 that fails: host1 took the LV over, then the source host2
        # takes it back and host1 deactivates; the claim ends with host2.
        await activate_for_vm(store, host1, vg, LV, "host1", take_over_from="host2")
        assert await active_on(store, vg, LV) == "host1"
        await activate_for_vm(store, host2, vg, LV, "host2", take_over_from="host1")
        await deactivate(store, host1, vg, LV, "host1")
        assert await active_on(store, vg, LV) == "host2"
        assert await tags(host2, vg) == (active_tag("host2"),)

        # The VM stops on host2.
        await activate_for_vm(store, host2, vg, LV, "host2")  # (one kernel, see above)
        await deactivate(store, host2, vg, LV, "host2")
        assert await active_on(store, vg, LV) is None
        assert await tags(host2, vg) == ()
        assert not await mapped(vg)
    finally:
        remove = await asyncio.create_subprocess_exec(
            "dmsetup",
            "remove",
            f"{vg}-{LV}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await remove.wait()
