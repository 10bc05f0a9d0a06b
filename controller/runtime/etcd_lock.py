"""A lock in etcd held for the length of a block, its lease refreshed while held.

Only a holder that dies loses the lock (after `ttl` seconds), never a slow one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aetcd

from . import layout_keys
from .reconcile import RetryableError
from .store import Store, StoreError

log = logging.getLogger(__name__)


class LockTimeout(RetryableError):
    """Another holder kept the lock for longer than the timeout."""


@contextlib.asynccontextmanager
async def held_lock(
    store: Store, key: str, ttl: int, timeout: int, what: str
) -> AsyncIterator[None]:
    """Hold the lock `key` (relative to the prefix, under `layout_keys.LOCKS`) for the block;
    `LockTimeout` ("`what` stayed taken for `timeout` s") when another holder kept it that
    long."""
    if not key.startswith(layout_keys.LOCKS):
        raise ValueError(f"lock key {key!r} is not under {layout_keys.LOCKS}")
    lock = store.client.lock(store.raw_key(key), ttl=ttl)
    acquired = await store.call(lock.acquire(timeout=timeout), waits=timeout)
    if not acquired:
        raise LockTimeout(f"{what} stayed taken for {timeout} s")
    keep_alive = asyncio.create_task(_refresh_forever(store, lock, ttl / 3))
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
