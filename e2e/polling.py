"""Waiting for a condition: poll it with a generous deadline, never sleep a fixed time.

Shared by the tests, the e2e suite, the demo and the benches. A loaded 2-core machine can be
many times slower than a quiet one, so deadlines are generous and only bound a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from controller.store import Store
from crds import Event


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


async def recorded_events(store: Store, involved: str, reason: str) -> list[Event]:
    """The Events of object `involved` with `reason`, waiting until there is one: components
    record an event just after the status change a test usually waits for."""

    async def matching() -> list[Event]:
        objects, _ = await store.list_objects("Event")
        return [
            event
            for event in objects
            if isinstance(event, Event)
            and event.spec.involved_object.name == involved
            and event.spec.reason == reason
        ]

    found: list[Event] = await eventually(matching, f"a {reason} event of {involved}")
    return found
