"""The LVM driver against real LVM on loop devices (metadata only: this kernel has no
device-mapper, so activation is off), each test with its own devices and lvm.conf."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from reconcilers.drivers.lvm import Lvm, LvmError

MIB = 1024 * 1024
EXTENT = 4 * MIB
"""LVM's default extent size."""

HAS_DEVICE_MAPPER = "device-mapper" in Path("/proc/misc").read_text()
"""/dev/mapper/control may exist without the kernel driver behind it."""
NO_ACTIVATION = "global {\n    activation = 0\n}\n"


def lvm_conf(directory: Path, text: str, local: str | None = None) -> Path:
    """A private LVM_SYSTEM_DIR holding `text` as lvm.conf (and `local` as lvmlocal.conf)."""
    directory.mkdir()
    (directory / "lvm.conf").write_text(text)
    if local is not None:
        (directory / "lvmlocal.conf").write_text(local)
    return directory


@pytest.fixture
def device(make_loop_device: Callable[[int], str]) -> str:
    return make_loop_device(256 * MIB)


@pytest.fixture
def lvm(device: str, tmp_path: Path) -> Lvm:
    return Lvm(lvm_conf(tmp_path / "lvm", NO_ACTIVATION), [device], activation=False)


@pytest.fixture
def vg_name() -> str:
    return f"vg_test_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def vg(lvm: Lvm, device: str, vg_name: str) -> str:
    await lvm.pvcreate(device)
    await lvm.vgcreate(vg_name, [device])
    return vg_name


async def test_pv_vg_and_lv_lifecycle(lvm: Lvm, device: str, vg_name: str) -> None:
    await lvm.pvcreate(device)
    [pv] = await lvm.pvs()
    assert (pv.name, pv.vg_name) == (device, None)

    await lvm.vgcreate(vg_name, [device])
    [pv] = await lvm.pvs()
    assert pv.vg_name == vg_name
    [vg] = await lvm.vgs()
    assert (vg.name, vg.pv_count, vg.lv_count, vg.system_id) == (vg_name, 1, 0, None)
    assert vg.extent_size_bytes == EXTENT
    assert 0 < vg.free_bytes == vg.size_bytes <= 256 * MIB

    await lvm.lvcreate(vg_name, "lv_vm1", 64 * MIB, tags=["kvmctl", "owner=vm1"])
    [lv] = await lvm.lvs(vg_name)
    assert (lv.vg_name, lv.name, lv.size_bytes) == (vg_name, "lv_vm1", 64 * MIB)
    assert lv.tags == ("kvmctl", "owner=vm1")
    assert lv.path == f"/dev/{vg_name}/lv_vm1"
    assert lv.active is None  # activation is off: LVM cannot tell
    [after_create] = await lvm.vgs()
    assert after_create.free_bytes == vg.free_bytes - 64 * MIB
    assert after_create.lv_count == 1

    await lvm.lvextend(vg_name, "lv_vm1", 100 * MIB)
    await lvm.add_tag(vg_name, "lv_vm1", "kvmctl_active_host1")
    await lvm.del_tag(vg_name, "lv_vm1", "owner=vm1")
    [lv] = await lvm.lvs(vg_name)
    assert lv.size_bytes == 100 * MIB
    assert lv.tags == ("kvmctl", "kvmctl_active_host1")

    await lvm.lvremove(vg_name, "lv_vm1")
    assert await lvm.lvs(vg_name) == []
    await lvm.vgremove(vg_name)
    assert await lvm.vgs() == []
    [pv] = await lvm.pvs()
    assert pv.vg_name is None


async def test_sizes_round_up_to_whole_extents(lvm: Lvm, vg: str) -> None:
    await lvm.lvcreate(vg, "tiny", 1000)
    await lvm.lvcreate(vg, "odd", 5 * MIB + 1)
    sizes = {lv.name: lv.size_bytes for lv in await lvm.lvs()}
    assert sizes == {"tiny": EXTENT, "odd": 2 * EXTENT}


async def test_an_lv_larger_than_the_free_space_is_refused(lvm: Lvm, vg: str) -> None:
    with pytest.raises(LvmError) as refused:
        await lvm.lvcreate(vg, "too_big", 1024 * MIB)
    assert refused.value.command == f"lvcreate {vg}/too_big"
    assert "insufficient free space" in refused.value.message
    assert "WARNING" not in str(refused.value)
    assert str(refused.value).startswith(f"lvcreate {vg}/too_big failed: Volume group")
    assert await lvm.lvs(vg) == []


async def test_shrinking_is_refused(lvm: Lvm, vg: str) -> None:
    await lvm.lvcreate(vg, "lv_vm1", 64 * MIB)
    with pytest.raises(LvmError, match="not larger than existing size"):
        await lvm.lvextend(vg, "lv_vm1", 32 * MIB)
    [lv] = await lvm.lvs(vg)
    assert lv.size_bytes == 64 * MIB


async def test_a_vg_with_lvs_is_not_removed(lvm: Lvm, vg: str) -> None:
    await lvm.lvcreate(vg, "lv_vm1", 8 * MIB)
    with pytest.raises(LvmError, match=f'Volume group "{vg}" not removed'):
        await lvm.vgremove(vg)
    assert [lv.name for lv in await lvm.lvs(vg)] == ["lv_vm1"]


async def test_missing_objects_and_bad_tags_give_lvm_reasons(lvm: Lvm, vg: str) -> None:
    with pytest.raises(LvmError, match='Volume group "vg_missing" not found'):
        await lvm.lvs("vg_missing")
    with pytest.raises(LvmError, match=f"lvremove {vg}/nope failed: .*nope"):
        await lvm.lvremove(vg, "nope")
    with pytest.raises(LvmError, match=r"lvcreate .* failed: .*tag"):
        await lvm.lvcreate(vg, "tagged", 8 * MIB, tags=["no spaces allowed"])
    assert await lvm.lvs(vg) == []


async def test_vgextend_adds_a_device(
    lvm: Lvm, vg: str, make_loop_device: Callable[[int], str], tmp_path: Path
) -> None:
    second = make_loop_device(128 * MIB)
    both = Lvm(lvm.system_dir, [*(lvm.devices or []), second], activation=False)
    [before] = await both.vgs()
    await both.pvcreate(second)
    await both.vgextend(vg, [second])
    [after] = await both.vgs()
    assert after.pv_count == 2
    assert after.size_bytes > before.size_bytes
    assert {pv.name: pv.vg_name for pv in await both.pvs()} == {
        (lvm.devices or [""])[0]: vg,
        second: vg,
    }
    await both.lvcreate(vg, "spans_both", before.size_bytes + 64 * MIB)


async def test_devices_outside_the_list_are_out_of_reach(
    lvm: Lvm, make_loop_device: Callable[[int], str]
) -> None:
    other = make_loop_device(64 * MIB)
    with pytest.raises(LvmError, match=f"pvcreate {other} failed: .*not in devices list"):
        await lvm.pvcreate(other)
    assert await lvm.pvs() == []


async def test_activation_flag_keeps_lvm_away_from_device_mapper(
    device: str, vg_name: str, tmp_path: Path
) -> None:
    """lvm.conf leaves activation on; `activation=False` alone makes metadata changes work."""
    system_dir = lvm_conf(tmp_path / "lvm-default", "")
    lvm = Lvm(system_dir, [device], activation=False)
    await lvm.pvcreate(device)
    await lvm.vgcreate(vg_name, [device])
    await lvm.lvcreate(vg_name, "lv_vm1", 8 * MIB)
    await lvm.lvchange_activate(vg_name, "lv_vm1", exclusive=True)
    await lvm.lvchange_deactivate(vg_name, "lv_vm1")
    [lv] = await lvm.lvs(vg_name)
    assert lv.active is None


@pytest.mark.skipif(HAS_DEVICE_MAPPER, reason="with device-mapper, activation works")
async def test_activation_without_device_mapper_fails_with_lvm_reason(
    device: str, vg_name: str, tmp_path: Path
) -> None:
    system_dir = lvm_conf(tmp_path / "lvm-default", "")
    metadata_only = Lvm(system_dir, [device], activation=False)
    await metadata_only.pvcreate(device)
    await metadata_only.vgcreate(vg_name, [device])
    await metadata_only.lvcreate(vg_name, "lv_vm1", 8 * MIB)
    with_activation = Lvm(system_dir, [device], activation=True)
    with pytest.raises(LvmError, match=f"lvchange {vg_name}/lv_vm1 failed: .*device-mapper"):
        await with_activation.lvchange_activate(vg_name, "lv_vm1", exclusive=True)


async def test_system_id_gives_the_vg_to_one_host_and_take_over_moves_it(
    device: str, vg_name: str, tmp_path: Path
) -> None:
    def host(name: str) -> Lvm:
        conf = 'global {\n    activation = 0\n    system_id_source = "lvmlocal"\n}\n'
        local = f'local {{\n    system_id = "{name}"\n}}\n'
        return Lvm(lvm_conf(tmp_path / name, conf, local), [device], activation=False)

    host1, host2 = host("host1"), host("host2")
    assert await host1.local_system_id() == "host1"
    await host1.pvcreate(device)
    await host1.vgcreate(vg_name, [device])
    [vg] = await host1.vgs()
    assert vg.system_id == "host1"  # vgcreate gives a new VG to the local host

    assert await host2.vgs() == []
    [foreign] = await host2.vgs(include_foreign=True)
    assert (foreign.name, foreign.system_id) == (vg_name, "host1")
    with pytest.raises(LvmError, match=r"Cannot access VG .* with system ID host1"):
        await host2.lvcreate(vg_name, "lv_vm1", 8 * MIB)

    await host2.take_over(vg_name, "host1", "host2")
    [vg] = await host2.vgs()
    assert vg.system_id == "host2"
    await host2.lvcreate(vg_name, "lv_vm1", 8 * MIB)
    with pytest.raises(LvmError, match="Cannot access VG"):
        await host1.lvremove(vg_name, "lv_vm1")

    await host2.take_over(vg_name, "host1", "host2")  # already done: no-op
    await host2.set_system_id(vg_name, "host1")
    await host1.set_system_id(vg_name, "host1")  # already done: no-op
    assert [lv.name for lv in await host1.lvs(vg_name)] == ["lv_vm1"]
    await host1.set_system_id(vg_name, None)
    [vg] = await host2.vgs()
    assert vg.system_id is None


def test_errors_and_reprs_name_the_command(tmp_path: Path) -> None:
    error = LvmError("lvcreate vg/lv", 'Volume group "vg" not found')
    assert str(error) == 'lvcreate vg/lv failed: Volume group "vg" not found'
    lvm = Lvm(tmp_path, ["/dev/loop9"], activation=False)
    assert repr(lvm) == f"Lvm(system_dir={tmp_path}, devices=['/dev/loop9'], activation=False)"
