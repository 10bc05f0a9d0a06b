"""The one reconcile contract every kvmctl controller follows, and the workers that drive it.

A reconciler is level-based: given a key it reads the current world, converges one step and
says what should happen next:
- return `Result()`: converged, nothing to do until the key is added again;
- return `Result(requeue_after=T)`: look again in T seconds (polling something external);
- raise `RetryableError` (or any unexpected exception): retry with per-key exponential backoff;
- raise `TerminalError`: retrying cannot help (bad spec, missing referent); it is handed to
  `on_terminal` to be recorded (condition and Warning event) and the key is not retried.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from controller.runtime.workqueue import QueueShutDown, WorkQueue

log = logging.getLogger(__name__)

_CAMEL_CASE = re.compile(r"[A-Z][A-Za-z0-9]*")


@dataclass(frozen=True)
class Result:
    """What the reconciler wants next: nothing, or another look after `requeue_after` seconds."""

    requeue_after: float | None = None


class RetryableError(Exception):
    """A temporary failure: the key is retried with backoff."""


class TerminalError(Exception):
    """A failure retrying cannot fix: recorded, not retried.

    `reason` is one CamelCase word (as in a condition or an event), `message` a human sentence.
    """

    def __init__(self, reason: str, message: str) -> None:
        if not _CAMEL_CASE.fullmatch(reason):
            raise ValueError(f"TerminalError reason must be one CamelCase word, got {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class Reconciler(Protocol):
    async def reconcile(self, key: str) -> Result: ...


OnTerminal = Callable[[str, TerminalError], Awaitable[None]]


async def run_workers(
    queue: WorkQueue,
    reconciler: Reconciler,
    workers: int,
    on_terminal: OnTerminal | None = None,
) -> None:
    """Run `workers` concurrent workers until the queue shuts down or this task is cancelled.

    The queue guarantees a key is never reconciled by two workers at once. On cancellation each
    worker stops at its next await (inside `reconcile` too) and releases its key.
    """
    if workers < 1:
        raise ValueError(f"run_workers needs at least one worker, got {workers}")
    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(_work(queue, reconciler, on_terminal))


async def _work(queue: WorkQueue, reconciler: Reconciler, on_terminal: OnTerminal | None) -> None:
    while True:
        try:
            key = await queue.get()
        except QueueShutDown:
            return
        try:
            await _reconcile_once(queue, reconciler, key, on_terminal)
        finally:
            queue.done(key)


async def _reconcile_once(
    queue: WorkQueue, reconciler: Reconciler, key: str, on_terminal: OnTerminal | None
) -> None:
    try:
        result = await reconciler.reconcile(key)
    except TerminalError as error:
        queue.forget(key)
        log.warning("reconcile of %s failed for good: %s", key, error)
        if on_terminal is not None:
            await _record_terminal(queue, key, error, on_terminal)
        return
    except RetryableError as error:
        log.info("reconcile of %s will be retried: %s", key, error)
        queue.add_rate_limited(key)
        return
    except Exception:
        log.exception("reconcile of %s failed unexpectedly; it will be retried", key)
        queue.add_rate_limited(key)
        return
    queue.forget(key)
    if result.requeue_after is not None:
        queue.add_after(key, result.requeue_after)


async def _record_terminal(
    queue: WorkQueue, key: str, error: TerminalError, on_terminal: OnTerminal
) -> None:
    """Hand a terminal error to `on_terminal`; if recording fails, retry the key so it recurs."""
    try:
        await on_terminal(key, error)
    except Exception:
        log.exception("recording the terminal error of %s failed; it will be retried", key)
        queue.add_rate_limited(key)
