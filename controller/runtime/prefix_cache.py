"""Every key under a prefix, kept in memory from a watch (the keys that are not objects:
requests, reports, heartbeats; objects have the informers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aetcd
import aetcd.rtypes
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from . import layout_keys
from .store import Store, StoreError

log = logging.getLogger(__name__)

RETRY_DELAY = 0.5
RETRY_MAX_DELAY = 5.0
STREAM_CANCEL_TIMEOUT = 1.0


OnChange = Callable[[str, bytes | None], None]


class PrefixCache:
    """Every key under `range_` (relative to the store's prefix, from `layout_keys`), by the
    name after it, kept current from a watch.

    `on_change(name, value)` runs on every change (value None: deleted), including the
    differences a relist finds after a lost watch. Run it as a task; cancel to stop.
    """

    def __init__(self, store: Store, range_: str, on_change: OnChange) -> None:
        self.store = store
        self.prefix = layout_keys.absolute(store.prefix, range_)
        """The watched range's full key."""
        self.values: dict[str, bytes] = {}
        self.synced = asyncio.Event()
        self._on_change = on_change

    def forget(self, name: str) -> None:
        """Drop `name` now (after deleting its key), before the watch reports it."""
        self.values.pop(name, None)

    async def run(self) -> None:
        while True:
            revision = await self._relist_when_reachable()
            try:
                await self._watch(revision)
            except (StoreError, aetcd.ClientError) as error:
                log.warning("watch of %s lost (%s); relisting", self.prefix, error)
            await asyncio.sleep(RETRY_DELAY)

    async def _relist_when_reachable(self) -> int:
        """`_relist`, retried while etcd does not answer: exponential backoff from RETRY_DELAY
        with full jitter, up to RETRY_MAX_DELAY apart (the caches of every controller do not
        return in step to a restarted etcd)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((StoreError, aetcd.ClientError)),
            wait=wait_random_exponential(multiplier=RETRY_DELAY, max=RETRY_MAX_DELAY),
            before_sleep=self._log_relist_failure,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                revision = await self._relist()
        return revision

    def _log_relist_failure(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("listing %s failed (%s); retrying", self.prefix, error)

    async def _relist(self) -> int:
        reply = await self.store.call(self.store.client.get_prefix(self.prefix.encode()))
        fresh = {kv.key.decode()[len(self.prefix) :]: bytes(kv.value) for kv in reply}
        for name in [name for name in self.values if name not in fresh]:
            del self.values[name]
            self._on_change(name, None)
        for name, value in fresh.items():
            if self.values.get(name) != value:
                self.values[name] = value
                self._on_change(name, value)
        self.synced.set()
        revision: int = reply.header.revision
        return revision

    async def _watch(self, revision: int) -> None:
        stream = await self.store.client.watch_prefix(
            self.prefix.encode(), start_revision=revision + 1
        )
        try:
            async for event in stream:
                name = event.kv.key.decode()[len(self.prefix) :]
                if event.kind == aetcd.rtypes.EventKind.DELETE:
                    if self.values.pop(name, None) is not None:
                        self._on_change(name, None)
                else:
                    self.values[name] = bytes(event.kv.value)
                    self._on_change(name, bytes(event.kv.value))
        finally:
            # aetcd's cancel waits for a lock its watcher can hold for long: bounded, best effort
            # (the server-side watch goes with the client otherwise).
            with contextlib.suppress(TimeoutError, aetcd.ClientError):
                async with asyncio.timeout(STREAM_CANCEL_TIMEOUT):
                    await stream.cancel()
