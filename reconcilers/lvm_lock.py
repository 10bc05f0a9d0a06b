"""LVM on shared storage: a node's LVM settings and the per-VG metadata lock held in etcd.

One host at a time changes a VG's metadata (PVs, LVs, tags): `metadata_lock(store, vg, settings)`.
Every LVM command goes through `reconcilers/drivers/lvm.py` (`LvmSettings.driver()`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from controller.runtime import layout_keys
from controller.runtime.etcd_lock import held_lock
from controller.runtime.store import Store
from reconcilers.drivers.lvm import Lvm


@dataclass(frozen=True)
class LvmSettings:
    """How this node runs LVM."""

    system_dir: str | None = None
    """LVM_SYSTEM_DIR (a private lvm.conf); None: /etc/lvm."""
    devices: tuple[str, ...] = ()
    """Restrict LVM to these devices (`--devices`); empty: every device lvm.conf allows."""
    lock_ttl: int = 30
    """Seconds a metadata lock outlives a host that died holding it."""
    lock_timeout: int = 60
    by_path_dir: str = "/dev/disk/by-path"
    """Where open-iscsi's udev rules name attached LUNs."""

    def driver(self) -> Lvm:
        """The LVM driver for this node's configuration and devices."""
        system_dir = Path(self.system_dir) if self.system_dir is not None else None
        return Lvm(system_dir=system_dir, devices=self.devices)


@contextlib.asynccontextmanager
async def metadata_lock(store: Store, vg: str, settings: LvmSettings) -> AsyncIterator[None]:
    """Hold `{prefix}/locks/lvm/{vg}` in etcd: one host at a time changes the VG's metadata.

    The lock's lease is refreshed while held, so only a host that dies holding it loses it
    (after `lock_ttl` seconds), never a slow one; `LockTimeout` after `lock_timeout` s.
    """
    what, key = f"the metadata lock of VG {vg}", layout_keys.vg_metadata_lock(vg)
    async with held_lock(store, key, settings.lock_ttl, settings.lock_timeout, what):
        yield
