"""Waiting for a condition: poll it with a generous deadline, never sleep a fixed time.

Shared by the tests, the e2e suite, the demo and the benches. A loaded 2-core machine can be
many times slower than a quiet one, so deadlines are generous and only bound a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def eventually(
    condition: Callable[[], Any],
    what: str,
    *,
    timeout: float = 60.0,
    interval: float = 0.05,
    error: type[Exception] = AssertionError,
) -> Any:
    """Poll `condition` (sync or async) until it returns something truthy, and return that.

    Raises `error("not reached within N s: what")` once `timeout` seconds have passed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise error(f"not reached within {timeout:.0f} s: {what}")
        await asyncio.sleep(interval)
