"""The work queue and the reconcile workers: pure asyncio, no external daemons needed.

Timing assertions are lower bounds only (a timer never fires early, however loaded the machine)
or orderings between timers of the same loop; waits use generous deadlines.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

from controller.runtime.reconcile import (
    Blocked,
    Result,
    RetryableError,
    TerminalError,
    run_workers,
)
from controller.runtime.store import Unavailable
from controller.runtime.workqueue import QueueShutDown, WorkQueue

DEADLINE = 10.0
# asyncio may run a timer up to its clock resolution early; allow for float rounding too.
EARLY = 0.005


async def get_within(queue: WorkQueue, deadline: float = DEADLINE) -> str:
    async with asyncio.timeout(deadline):
        return await queue.get()


async def timed_get(queue: WorkQueue) -> tuple[str, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    key = await get_within(queue)
    return key, loop.time() - start


async def test_duplicates_in_the_queue_coalesce() -> None:
    queue = WorkQueue()
    for key in ["a", "b", "a", "a", "b", "c"]:
        queue.add(key)
    assert len(queue) == 3
    assert [await get_within(queue) for _ in range(3)] == ["a", "b", "c"]
    assert len(queue) == 0


async def test_readds_while_processing_coalesce_into_one_more_pass() -> None:
    queue = WorkQueue()
    queue.add("a")
    assert await get_within(queue) == "a"
    for _ in range(5):
        queue.add("a")
    assert len(queue) == 0, "a key being processed must not be handed out again"
    queue.done("a")
    assert len(queue) == 1
    assert await get_within(queue) == "a"
    queue.done("a")
    assert len(queue) == 0


async def test_done_without_readd_does_not_requeue() -> None:
    queue = WorkQueue()
    queue.add("a")
    await get_within(queue)
    queue.done("a")
    assert len(queue) == 0


async def test_backoff_doubles_per_failure() -> None:
    base = 0.05
    queue = WorkQueue(base_delay=base, max_delay=10.0, rate=1000.0, burst=1000)
    for failures in range(4):
        assert queue.num_requeues("a") == failures
        queue.add_rate_limited("a")
        assert len(queue) == 0, "a rate-limited key must wait"
        key, waited = await timed_get(queue)
        queue.done(key)
        assert waited >= base * 2**failures - EARLY
    assert queue.num_requeues("a") == 4


async def test_forget_resets_backoff() -> None:
    queue = WorkQueue(base_delay=0.05, max_delay=60.0, rate=1000.0, burst=1000)
    for _ in range(6):
        queue.add_rate_limited("a")  # pending delay only shrinks: the first one (0.05 s) stays
    key = await get_within(queue)
    queue.done(key)
    # Without forget, the next delay would be 0.05 * 2**6 = 3.2 s.
    queue.forget("a")
    assert queue.num_requeues("a") == 0
    queue.add_rate_limited("a")
    queue.add_after("marker", 1.0)
    assert await get_within(queue) == "a"


async def test_backoff_is_capped() -> None:
    queue = WorkQueue(base_delay=0.01, max_delay=0.05, rate=1000.0, burst=1000)
    for _ in range(20):
        queue.add_rate_limited("a")
        queue.done(await get_within(queue))
    queue.add_rate_limited("a")  # uncapped this would be 0.01 * 2**20 s, about three hours
    queue.add_after("marker", 1.0)
    assert await get_within(queue) == "a"


async def test_overall_rate_limit_spaces_keys() -> None:
    queue = WorkQueue(base_delay=0.001, max_delay=1.0, rate=10.0, burst=1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for key in ["a", "b", "c"]:
        queue.add_rate_limited(key)
    got = [await get_within(queue) for _ in range(3)]
    assert got == ["a", "b", "c"]
    assert loop.time() - start >= 0.2 - EARLY  # the third token comes 2 / rate after the first


async def test_add_after_waits_then_adds() -> None:
    queue = WorkQueue()
    queue.add_after("a", 0.1)
    assert len(queue) == 0
    key, waited = await timed_get(queue)
    assert key == "a"
    assert waited >= 0.1 - EARLY


async def test_add_after_keeps_the_earliest_time() -> None:
    queue = WorkQueue()
    queue.add_after("late-then-early", 3600.0)
    queue.add_after("late-then-early", 0.05)
    queue.add_after("early-then-late", 0.05)
    queue.add_after("early-then-late", 3600.0)
    assert {await get_within(queue), await get_within(queue)} == {
        "late-then-early",
        "early-then-late",
    }


async def test_add_after_zero_adds_now() -> None:
    queue = WorkQueue()
    queue.add_after("a", 0)
    assert len(queue) == 1


async def test_shutdown_wakes_waiting_getters_and_ignores_adds() -> None:
    queue = WorkQueue()
    getters = [asyncio.create_task(queue.get()) for _ in range(3)]
    await asyncio.sleep(0)  # let the getters block (one loop iteration, not a wait for time)
    queue.add_after("delayed", 0.05)
    queue.shutdown()
    async with asyncio.timeout(DEADLINE):
        results = await asyncio.gather(*getters, return_exceptions=True)
    assert all(isinstance(result, QueueShutDown) for result in results)
    queue.add("a")
    queue.add_rate_limited("b")
    assert len(queue) == 0
    with pytest.raises(QueueShutDown):
        await get_within(queue)


async def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="base_delay"):
        WorkQueue(base_delay=0)
    with pytest.raises(ValueError, match="token bucket"):
        WorkQueue(rate=0)


# --- run_workers and the reconcile contract -----------------------------------------------


class Recorder:
    """A reconciler whose behaviour per call is scripted by the test."""

    def __init__(self, queue: WorkQueue) -> None:
        self.queue = queue
        self.calls: Counter[str] = Counter()
        self.requeues_seen: list[int] = []
        self.in_flight: set[str] = set()
        self.overlaps: list[str] = []
        self.changed = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.outcomes: dict[str, list[Exception | Result]] = {}

    async def reconcile(self, key: str) -> Result:
        if key in self.in_flight:
            self.overlaps.append(key)
        self.in_flight.add(key)
        try:
            self.calls[key] += 1
            self.requeues_seen.append(self.queue.num_requeues(key))
            self.changed.set()
            await self.release.wait()
            for _ in range(3):
                await asyncio.sleep(0)  # give other workers a chance to interleave
            script = self.outcomes.get(key)
            outcome = script.pop(0) if script else Result()
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        finally:
            self.in_flight.discard(key)

    async def wait_for(self, key: str, calls: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while self.calls[key] < calls:
                self.changed.clear()
                await self.changed.wait()


async def stop_workers(workers: asyncio.Task[None]) -> None:
    workers.cancel()
    await asyncio.wait({workers})


async def test_a_key_is_never_reconciled_by_two_workers() -> None:
    queue = WorkQueue()
    recorder = Recorder(queue)
    workers = asyncio.create_task(run_workers(queue, recorder, workers=4))
    try:
        keys = [f"vm-{index}" for index in range(5)]
        for _ in range(50):
            for key in keys:
                queue.add(key)
            await asyncio.sleep(0)
        queue.add("last")
        await recorder.wait_for("last", 1)
        for key in keys:
            await recorder.wait_for(key, 2)
    finally:
        await stop_workers(workers)
    assert recorder.overlaps == []


async def test_readds_during_reconcile_give_exactly_one_more_pass() -> None:
    queue = WorkQueue()
    recorder = Recorder(queue)
    recorder.release.clear()
    workers = asyncio.create_task(run_workers(queue, recorder, workers=1))
    try:
        queue.add("a")
        await recorder.wait_for("a", 1)
        for _ in range(5):
            queue.add("a")
        recorder.release.set()
        await recorder.wait_for("a", 2)
        queue.add("marker")  # one worker, FIFO: a third pass of "a" would come before it
        await recorder.wait_for("marker", 1)
    finally:
        await stop_workers(workers)
    assert recorder.calls["a"] == 2


async def test_requeue_after_reconciles_again_without_backoff() -> None:
    queue = WorkQueue()
    recorder = Recorder(queue)
    recorder.outcomes["a"] = [Result(requeue_after=0.05)]
    workers = asyncio.create_task(run_workers(queue, recorder, workers=2))
    try:
        queue.add("a")
        await recorder.wait_for("a", 2)
    finally:
        await stop_workers(workers)
    assert recorder.requeues_seen == [0, 0]


async def test_retryable_and_unexpected_errors_back_off_until_success() -> None:
    queue = WorkQueue(base_delay=0.001)
    recorder = Recorder(queue)
    recorder.outcomes["a"] = [
        RetryableError("etcd busy"),
        RuntimeError("a bug"),
        RetryableError("still busy"),
    ]
    workers = asyncio.create_task(run_workers(queue, recorder, workers=2))
    try:
        queue.add("a")
        await recorder.wait_for("a", 4)
        queue.add("a")  # after the success the backoff starts from zero again
        await recorder.wait_for("a", 5)
    finally:
        await stop_workers(workers)
    assert recorder.requeues_seen == [0, 1, 2, 3, 0]


async def test_terminal_error_is_recorded_once_and_not_retried() -> None:
    queue = WorkQueue(base_delay=0.001)
    recorder = Recorder(queue)
    recorder.outcomes["a"] = [TerminalError("NodeNotFound", "node host9 does not exist")]
    recorded: list[tuple[str, str, str]] = []

    async def on_terminal(key: str, error: TerminalError) -> None:
        recorded.append((key, error.reason, error.message))

    workers = asyncio.create_task(run_workers(queue, recorder, 1, on_terminal))
    try:
        queue.add("a")
        await recorder.wait_for("a", 1)
        queue.add_after("marker", 0.2)  # a retry of "a" would be due after 1 ms
        await recorder.wait_for("marker", 1)
    finally:
        await stop_workers(workers)
    assert recorder.calls["a"] == 1
    assert recorded == [("a", "NodeNotFound", "node host9 does not exist")]
    assert queue.num_requeues("a") == 0


async def test_failure_to_record_a_terminal_error_retries_the_key() -> None:
    queue = WorkQueue(base_delay=0.001)
    recorder = Recorder(queue)
    recorder.outcomes["a"] = [TerminalError("BadSpec", "x"), TerminalError("BadSpec", "x")]
    attempts: list[str] = []

    async def on_terminal(key: str, error: TerminalError) -> None:
        attempts.append(key)
        if len(attempts) == 1:
            raise ConnectionError("etcd unreachable")

    workers = asyncio.create_task(run_workers(queue, recorder, 1, on_terminal))
    try:
        queue.add("a")
        await recorder.wait_for("a", 2)
        queue.add("marker")
        await recorder.wait_for("marker", 1)
    finally:
        await stop_workers(workers)
    assert attempts == ["a", "a"]


async def test_blocked_is_recorded_and_looked_at_again_after_its_delay() -> None:
    queue = WorkQueue(base_delay=0.001)
    recorder = Recorder(queue)
    recorder.outcomes["a"] = [Blocked("VolumeActivationFailed", "claimed by host2", 0.05)]
    recorded: list[tuple[str, str]] = []

    async def on_blocked(key: str, blocked: Blocked) -> None:
        recorded.append((key, blocked.reason))

    workers = asyncio.create_task(run_workers(queue, recorder, 1, on_blocked=on_blocked))
    try:
        queue.add("a")
        await recorder.wait_for("a", 2)
    finally:
        await stop_workers(workers)
    assert recorded == [("a", "VolumeActivationFailed")]
    assert recorder.requeues_seen == [0, 0]  # after its delay, not with backoff


async def test_blocked_without_a_delay_backs_off() -> None:
    queue = WorkQueue(base_delay=0.001)
    recorder = Recorder(queue)
    recorder.outcomes["a"] = [Blocked("LvmFailed", "x"), Blocked("LvmFailed", "x")]
    workers = asyncio.create_task(run_workers(queue, recorder, 1))
    try:
        queue.add("a")
        await recorder.wait_for("a", 3)
    finally:
        await stop_workers(workers)
    assert recorder.requeues_seen == [0, 1, 2]


def test_terminal_error_reason_must_be_camel_case() -> None:
    with pytest.raises(ValueError, match="CamelCase"):
        TerminalError("not found", "x")


async def test_cancelling_workers_interrupts_reconcile_and_releases_the_key() -> None:
    queue = WorkQueue()
    recorder = Recorder(queue)
    recorder.release.clear()
    workers = asyncio.create_task(run_workers(queue, recorder, workers=2))
    queue.add("a")
    await recorder.wait_for("a", 1)
    await stop_workers(workers)
    assert workers.cancelled()
    assert recorder.in_flight == set()
    queue.add("a")
    assert len(queue) == 1, "the interrupted key must no longer count as processing"


async def test_shutdown_ends_the_workers() -> None:
    queue = WorkQueue()
    recorder = Recorder(queue)
    workers = asyncio.create_task(run_workers(queue, recorder, workers=3))
    queue.add("a")
    await recorder.wait_for("a", 1)
    queue.shutdown()
    async with asyncio.timeout(DEADLINE):
        await workers


async def test_unexpected_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    queue = WorkQueue(base_delay=0.001)
    recorder = Recorder(queue)
    recorder.outcomes["a"] = [RuntimeError("a bug")]
    workers = asyncio.create_task(run_workers(queue, recorder, workers=1))
    try:
        with caplog.at_level(logging.ERROR, logger="controller.runtime.reconcile"):
            queue.add("a")
            await recorder.wait_for("a", 2)
    finally:
        await stop_workers(workers)
    assert "failed unexpectedly" in caplog.text
    assert "a bug" in caplog.text


async def test_run_workers_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        await run_workers(WorkQueue(), Recorder(WorkQueue()), workers=0)


async def test_etcd_unavailable_is_retried_and_logged_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """etcd not answering in time is expected under load: backed off and retried like a
    RetryableError, logged as one warning without a traceback."""
    queue = WorkQueue(base_delay=0.001)
    recorder = Recorder(queue)
    recorder.outcomes["a"] = [Unavailable("etcd at m0 is unreachable: no answer in time")]
    workers = asyncio.create_task(run_workers(queue, recorder, workers=1))
    try:
        with caplog.at_level(logging.INFO, logger="controller.runtime.reconcile"):
            queue.add("a")
            await recorder.wait_for("a", 2)
    finally:
        await stop_workers(workers)
    assert recorder.requeues_seen == [0, 1]
    (record,) = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
