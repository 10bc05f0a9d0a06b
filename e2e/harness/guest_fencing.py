"""Run the leader's guest-cluster fencing (controller/ha/guest_fence.py) beside a test's
stand-in controller, with informers of its own, for as long as a `with` block lasts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from controller.ha.guest_fence import GuestFenceController
from controller.runtime.informer import SharedInformers
from controller.runtime.store import Store

CANCEL_RETRY = 1.0


@contextlib.asynccontextmanager
async def guest_fencing(store: Store, token: int, guard: list[Any]) -> AsyncIterator[None]:
    """Serve fence_kvmctl's requests as the leader of term `token` (writes guarded by `guard`)."""
    informers = SharedInformers(store)
    service = GuestFenceController(store, informers)
    informers.start()
    task = asyncio.create_task(service.run(token, guard), name="guest fencing")
    try:
        yield
    finally:
        while not task.done():  # Python 3.11's wait_for can swallow one cancel
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_RETRY)
        await informers.stop()
