"""LVM in the kernel lab: an lvm.conf that activates only the LVs tagged for a node (no udev),
and whether an LV is active (e2e/lab_tests/)."""

from __future__ import annotations

from reconcilers.drivers.lvm import Lvm
from reconcilers.lv_claim import active_tag


def lvm_conf(node: str) -> str:
    return (
        "global { activation = 1 }\n"
        "devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }\n"
        "backup { backup = 0 archive = 0 }\n"
        "activation { udev_sync = 0 udev_rules = 0 "
        f'volume_list = [ "@{active_tag(node)}" ] }}\n'
    )


async def is_active(lvm: Lvm, vg: str, lv: str) -> bool:
    return any(found.name == lv and found.active is True for found in await lvm.lvs(vg))
