"""LVM activation under Debian's kernel (device-mapper present), as the activation contract
uses it: an LV is activated only on the node whose `kvmctl_active_<node>` tag it carries.

Each node's lvm.conf sets `activation/volume_list = ["@kvmctl_active_<node>"]`, so LVM itself
refuses to activate an LV claimed for another node, even by hand. The etcd claim around it is
tested on the host and, with a real etcd in the lab, in test_vm_activation_lab.py.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from e2e.harness.lvm_lab import is_active, lvm_conf
from reconcilers.drivers.lvm import Lvm
from reconcilers.lv_claim import active_tag

MIB = 1 << 20


@pytest.fixture
def loop_device(make_loop_device: Callable[[int], str]) -> str:
    return make_loop_device(24 * MIB)


def node_lvm(tmp_path: Path, node: str, device: str) -> Lvm:
    system_dir = tmp_path / f"lvm-{node}"
    system_dir.mkdir()
    (system_dir / "lvm.conf").write_text(lvm_conf(node))
    return Lvm(system_dir, [device])


async def test_an_lv_activates_only_on_the_node_it_is_tagged_for(
    tmp_path: Path, loop_device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DM_DISABLE_UDEV", "1")  # no udev in the lab
    host1 = node_lvm(tmp_path, "host1", loop_device)
    host2 = node_lvm(tmp_path, "host2", loop_device)
    vg = f"vg_lab_{uuid.uuid4().hex[:6]}"
    await host1.pvcreate(loop_device)
    await host1.vgcreate(vg, [loop_device])
    await host1.lvcreate(vg, "lv_vm1", 8 * MIB)
    try:
        assert not await is_active(host1, vg, "lv_vm1")

        await host1.add_tag(vg, "lv_vm1", active_tag("host1"))
        # Filtered out by host2's volume_list: lvchange succeeds, the LV stays inactive.
        await host2.lvchange_activate(vg, "lv_vm1", exclusive=True)
        assert not await is_active(host2, vg, "lv_vm1")
        assert not await asyncio.to_thread(os.path.exists, f"/dev/mapper/{vg}-lv_vm1")

        await host1.lvchange_activate(vg, "lv_vm1", exclusive=True)
        assert await is_active(host1, vg, "lv_vm1")
        assert await asyncio.to_thread(os.path.exists, f"/dev/mapper/{vg}-lv_vm1")

        await host1.lvchange_deactivate(vg, "lv_vm1")
        assert not await is_active(host1, vg, "lv_vm1")
        await host1.del_tag(vg, "lv_vm1", active_tag("host1"))
        await host2.add_tag(vg, "lv_vm1", active_tag("host2"))
        await host2.lvchange_activate(vg, "lv_vm1", exclusive=True)
        assert await is_active(host2, vg, "lv_vm1")
        await host2.lvchange_deactivate(vg, "lv_vm1")
    finally:
        remove = await asyncio.create_subprocess_exec(
            "dmsetup",
            "remove",
            f"{vg}-lv_vm1",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await remove.wait()
