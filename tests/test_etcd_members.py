"""`unless_lost`, the wrapper of every request to an etcd member: a request that does not end
when cancelled (a call stuck on a dead connection) must not hang its caller past its timeout."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from controller.runtime import etcd_members


async def test_a_request_that_ignores_its_cancel_does_not_hang_the_caller() -> None:
    release = asyncio.Event()
    cancels: list[int] = []

    async def stuck() -> str:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancels.append(1)  # swallowed, as a call stuck on a dead connection may
        return "late"

    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await etcd_members.unless_lost(asyncio.Event(), "member", stuck())
        # Reached only because the request was left behind after the grace: it never ends.
        assert cancels, "the request was cancelled"
    finally:
        release.set()
        await asyncio.sleep(0)


async def test_a_request_left_behind_that_fails_later_is_not_reported_as_unretrieved() -> None:
    """A left-behind request that ends with an error after its caller moved on: its error is
    taken (the rack bench printed hundreds of "Task exception was never retrieved")."""
    release = asyncio.Event()
    unretrieved: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))

    async def stuck_then_failing() -> str:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        raise RuntimeError("the stream ended with DEADLINE_EXCEEDED")

    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await etcd_members.unless_lost(asyncio.Event(), "member", stuck_then_failing())
        release.set()
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        assert unretrieved == []
    finally:
        release.set()
        loop.set_exception_handler(None)


async def test_a_request_failing_as_its_callers_timeout_cancels_it_is_not_unretrieved() -> None:
    """The caller's own timeout cancels `unless_lost`; the request, cancelled in turn, ends
    with an error of its own (as a gRPC call does): that error is taken too."""
    unretrieved: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))

    async def failing_when_cancelled() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("CANCELLED: the call was cancelled") from None
        return "never"

    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await etcd_members.unless_lost(asyncio.Event(), "member", failing_when_cancelled())
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        assert unretrieved == []
    finally:
        loop.set_exception_handler(None)
