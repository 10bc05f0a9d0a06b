"""The one reconcile contract every kvmctl controller follows, and the workers that drive it.

A reconciler is level-based: given a key it reads the current world, converges one step and
says what should happen next:
- return `Result()`: converged, nothing to do until the key is added again;
- return `Result(requeue_after=T)`: look again in T seconds (polling something external);
- raise `RetryableError` (or any unexpected exception): retry with per-key exponential backoff;
- raise `TerminalError`: retrying cannot help (bad spec, missing referent); it is handed to
  `on_terminal` to be recorded (condition and Warning event) and the key is not retried;
- raise `Blocked`: converging waits on something outside this reconciler (an LV claimed
  elsewhere, a device not attached yet): it is handed to `on_blocked`, which sets the condition
  and warns once (`record_not_ready`), and the key is looked at again later.

`record_not_ready` is the one way to record either: `Ready=False` with the reason, and a Warning
event (for `Blocked` only when Ready newly turns False with this reason: no event storm while a
VM waits for its volume).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from controller.runtime.events import EventRecorder
from controller.runtime.store import Compare, NotFound, Store, Unavailable
from controller.runtime.workqueue import QueueShutDown, WorkQueue
from crds.meta import ConditionStatus

log = logging.getLogger(__name__)

_CAMEL_CASE = re.compile(r"[A-Z][A-Za-z0-9]*")
MAX_CONDITION_MESSAGE = 4096


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


class Blocked(Exception):
    """Converging waits on something outside: set `Ready=False reason`, warn once, look again
    after `retry_after` seconds (None: with the key's exponential backoff)."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        if not _CAMEL_CASE.fullmatch(reason):
            raise ValueError(f"Blocked reason must be one CamelCase word, got {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class Reconciler(Protocol):
    async def reconcile(self, key: str) -> Result: ...


OnTerminal = Callable[[str, TerminalError], Awaitable[None]]
OnBlocked = Callable[[str, Blocked], Awaitable[None]]
OnNotReady = Callable[[str, TerminalError | Blocked], Awaitable[None]]
"""Records both: the condition and Warning a terminal error or a `Blocked` outcome calls for."""
_Recorded = TypeVar("_Recorded", TerminalError, Blocked)


def set_ready(
    status: Any, value: ConditionStatus, reason: str, message: str, generation: int | None = None
) -> bool:
    """Set the `Ready` condition of `status`; True when it newly turns False with `reason`
    (the moment to warn: once per new reason, not at every look)."""
    old = status.condition("Ready")
    status.set_condition("Ready", value, reason, message, generation)
    return value == "False" and (old is None or (old.status, old.reason) != ("False", reason))


async def record_not_ready(
    store: Store,
    recorder: EventRecorder,
    kind: str,
    key: str,
    error: TerminalError | Blocked,
    guard: Sequence[Compare] = (),
    owned: Callable[[Any], bool] = lambda obj: True,
) -> None:
    """Record `error` on the object `kind/key`: `Ready=False` with its reason and a Warning
    event (a `Blocked` one only when Ready newly turned False with this reason). Nothing is
    written to an object that is gone or that `owned(obj)` says this process does not own."""
    message = error.message[:MAX_CONDITION_MESSAGE]
    warn = isinstance(error, TerminalError)

    def mark(obj: Any) -> bool:
        nonlocal warn
        if not owned(obj):
            return False
        before = obj.status.model_dump()
        warn |= set_ready(obj.status, "False", error.reason, message, obj.metadata.generation)
        return bool(obj.status.model_dump() != before)

    try:
        obj = await store.patch_status(kind, key, mark, guard=guard)
    except NotFound:
        log.info("%s %s is gone; %s not recorded", kind, key, error.reason)
        return
    if warn and owned(obj):
        await recorder.record(obj, "Warning", error.reason, "%s", message)


async def run_workers(
    queue: WorkQueue,
    reconciler: Reconciler,
    workers: int,
    on_terminal: OnTerminal | None = None,
    on_blocked: OnBlocked | None = None,
) -> None:
    """Run `workers` concurrent workers until the queue shuts down or this task is cancelled.

    The queue guarantees a key is never reconciled by two workers at once. On cancellation each
    worker stops at its next await (inside `reconcile` too) and releases its key.
    """
    if workers < 1:
        raise ValueError(f"run_workers needs at least one worker, got {workers}")
    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(_work(queue, reconciler, on_terminal, on_blocked))


async def _work(
    queue: WorkQueue,
    reconciler: Reconciler,
    on_terminal: OnTerminal | None,
    on_blocked: OnBlocked | None,
) -> None:
    while True:
        try:
            key = await queue.get()
        except QueueShutDown:
            return
        try:
            await _reconcile_once(queue, reconciler, key, on_terminal, on_blocked)
        finally:
            queue.done(key)


async def _reconcile_once(
    queue: WorkQueue,
    reconciler: Reconciler,
    key: str,
    on_terminal: OnTerminal | None,
    on_blocked: OnBlocked | None,
) -> None:
    try:
        result = await reconciler.reconcile(key)
    except TerminalError as error:
        queue.forget(key)
        log.warning("reconcile of %s failed for good: %s", key, error)
        if on_terminal is not None:
            await _record(queue, key, error, on_terminal)
        return
    except Blocked as blocked:
        log.info("reconcile of %s is blocked: %s", key, blocked)
        if on_blocked is not None:
            await _record(queue, key, blocked, on_blocked)
        if blocked.retry_after is None:
            queue.add_rate_limited(key)
        else:
            queue.forget(key)
            queue.add_after(key, blocked.retry_after)
        return
    except RetryableError as error:
        log.info("reconcile of %s will be retried: %s", key, error)
        queue.add_rate_limited(key)
        return
    except Unavailable as error:
        # Expected while etcd elects or is overloaded: one line, no traceback (formatting
        # thousands of them is what a loaded agent can least afford).
        log.warning("reconcile of %s will be retried: %s", key, error)
        queue.add_rate_limited(key)
        return
    except Exception:
        log.exception("reconcile of %s failed unexpectedly; it will be retried", key)
        queue.add_rate_limited(key)
        return
    queue.forget(key)
    if result.requeue_after is not None:
        queue.add_after(key, result.requeue_after)


async def _record(
    queue: WorkQueue,
    key: str,
    error: _Recorded,
    record: Callable[[str, _Recorded], Awaitable[None]],
) -> None:
    """Hand `error` to its recorder; if recording fails, retry the key so it recurs."""
    try:
        await record(key, error)
    except Exception:
        log.exception("recording %s of %s failed; it will be retried", error.reason, key)
        queue.add_rate_limited(key)
