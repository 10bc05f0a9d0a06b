"""`unless_lost`, the wrapper of every request to an etcd member: a request that does not end
when cancelled (a call stuck on a dead connection) must not hang its caller past its timeout."""

from __future__ import annotations

import asyncio

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
