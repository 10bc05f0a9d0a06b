"""Stopping tasks for good."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

CANCEL_RETRY = 0.5
"""Seconds to wait for cancelled tasks before cancelling those still running again."""


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again any that swallowed it.

    Python 3.11's `asyncio.wait_for` (under aetcd's calls, its watch creation among them) drops
    a cancellation that arrives as the inner call completes, so one cancel may not stop a task.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY)
