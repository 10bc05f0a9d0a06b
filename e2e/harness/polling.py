"""Waiting for a condition: poll it with a generous deadline, never sleep a fixed time.

Shared by the tests, the e2e suite, the demo and the benches. A loaded 2-core machine can be
many times slower than a quiet one, so deadlines are generous and only bound a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from controller.runtime.store import Store
from crds import Event

T = TypeVar("T")


async def eventually(
    condition: Callable[[], Any],
    what: str,
    *,
    timeout: float = 60.0,
    interval: float = 0.05,
    error: type[Exception] = AssertionError,
    retry_on: tuple[type[Exception], ...] = (),
) -> Any:
    """Poll `condition` (sync or async) until it returns something truthy, and return that.

    An exception of a `retry_on` type counts as "not yet" (a harness that kills etcd members
    must ride out an election). Raises `error("not reached within N s: what")` once `timeout`
    seconds have passed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error = ""
    while True:
        try:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
        except retry_on as transient:
            value, last_error = None, f" (last error: {transient})"
        if value:
            return value
        if loop.time() > deadline:
            raise error(f"not reached within {timeout:.0f} s: {what}{last_error}")
        await asyncio.sleep(interval)


async def retrying(
    read: Callable[[], Awaitable[T]],
    what: str,
    *,
    retry_on: tuple[type[Exception], ...],
    timeout: float = 60.0,
    error: type[Exception] = AssertionError,
) -> T:
    """`read()`'s result, asking again while it raises one of `retry_on` (a transient fault)."""
    results: list[T] = []

    async def attempt() -> bool:
        results.append(await read())
        return True

    await eventually(attempt, what, timeout=timeout, error=error, retry_on=retry_on)
    return results[-1]


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
