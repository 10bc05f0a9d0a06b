"""Blocking system calls that may never return, run so that the process never waits for them.

A `statvfs` or `read` on a stalled FUSE or NFS mount, or on a dead disk, can block in the kernel
for minutes. Run with `asyncio.to_thread`, such a call keeps the process alive at exit: the
loop's default executor is shut down by waiting for its threads (`asyncio.run`), and
`concurrent.futures` joins its workers again at interpreter exit. `start(function, *args)` runs
the call in a daemon thread of its own instead, which the interpreter leaves behind at exit;
`outcome(future, timeout)` waits for it without cancelling it (a thread cannot be cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def start(function: Callable[[*Ts], T], *args: *Ts) -> asyncio.Future[T]:
    """Run `function(*args)` in a new daemon thread; its result or exception in the future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while the call blocked
            loop.call_soon_threadsafe(_settle, future, setter, value)

    def run() -> None:
        try:
            result = function(*args)
        except Exception as error:  # handed to the awaiting coroutine
            deliver(future.set_exception, error)
        else:
            deliver(future.set_result, result)

    name = f"blocked call {getattr(function, '__name__', 'call')}"
    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _settle(future: asyncio.Future[Any], setter: Callable[[Any], None], value: object) -> None:
    if not future.done():  # not cancelled meanwhile
        setter(value)


async def outcome(future: asyncio.Future[T], timeout: float) -> T:
    """The call's result within `timeout` s, or TimeoutError (the call goes on in its thread)."""
    return await asyncio.wait_for(asyncio.shield(future), timeout)
