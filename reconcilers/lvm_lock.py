"""LVM on shared storage: a node's LVM settings and the per-VG metadata lock held in etcd.

One host at a time changes a VG's metadata (PVs, LVs, tags): `metadata_lock(store, vg, settings)`.
Every LVM command goes through `reconcilers/drivers/lvm.py` (`LvmSettings.driver()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aetcd

from controller.runtime.reconcile import RetryableError
from controller.runtime.store import Store, StoreError
from reconcilers.drivers.lvm import Lvm

log = logging.getLogger(__name__)


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


class LockTimeout(RetryableError):
    """Another host held the VG's metadata lock for longer than the timeout."""


@contextlib.asynccontextmanager
async def metadata_lock(store: Store, vg: str, settings: LvmSettings) -> AsyncIterator[None]:
    """Hold `{prefix}/locks/lvm/{vg}` in etcd: one host at a time changes the VG's metadata.

    The lock's lease is refreshed while held, so only a host that dies holding it loses it
    (after `lock_ttl` seconds), never a slow one.
    """
    lock = store.client.lock(f"{store.prefix}/locks/lvm/{vg}".encode(), ttl=settings.lock_ttl)
    acquired = await store.call(
        lock.acquire(timeout=settings.lock_timeout), waits=settings.lock_timeout
    )
    if not acquired:
        raise LockTimeout(
            f"the metadata lock of VG {vg} stayed taken for {settings.lock_timeout} s"
        )
    keep_alive = asyncio.create_task(_refresh_forever(store, lock, settings.lock_ttl / 3))
    try:
        yield
    finally:
        keep_alive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keep_alive
        with contextlib.suppress(Exception):
            await store.call(lock.release())
            if lock.lease is not None:
                await store.call(lock.lease.revoke())


async def _refresh_forever(store: Store, lock: aetcd.Lock, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            await store.call(lock.refresh())
        except StoreError as error:
            log.warning("refreshing the lease of %s failed: %s", lock.key.decode(), error)
