"""The etcd member probe (`controller/runtime/etcd_members.py`) on a real 3-member etcd, counted by
the member's own metrics: a member in use is probed while it is silent, not while it answers, and
no sooner than its client's probe interval."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator

import pytest

from controller.runtime.store import Store
from e2e.harness.etcd import EtcdCluster, EtcdMember
from e2e.harness.polling import eventually
from tests.support.etcd import three_members

cluster = three_members
BUSY_WINDOW = 2.5
"""Seconds of back-to-back reads: five probe intervals."""
SILENT_WINDOW = 3.0
"""Seconds without a request: six default probe intervals."""
_STATUS_HANDLED = re.compile(r'^grpc_server_handled_total\{[^}]*grpc_method="Status"[^}]*\} (\S+)$')


@pytest.fixture
async def store(cluster: EtcdCluster) -> AsyncIterator[Store]:
    """A store on every member: the first one listed is the one in use."""
    async with Store(cluster.endpoints, prefix="/probe") as store:
        yield store


def _read_status_count(member: EtcdMember) -> int:
    with urllib.request.urlopen(f"http://{member.endpoint}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        int(float(match.group(1)))
        for line in text.splitlines()
        if (match := _STATUS_HANDLED.match(line))
    )


async def status_requests(member: EtcdMember) -> int:
    """The Status requests `member` has answered so far (every probe is one)."""
    return await asyncio.to_thread(_read_status_count, member)


async def test_a_silent_member_in_use_is_probed(cluster: EtcdCluster, store: Store) -> None:
    start = await status_requests(cluster.members[0])

    async def probed_four_times() -> bool:
        return await status_requests(cluster.members[0]) >= start + 4

    await eventually(probed_four_times, "the member in use is probed while nothing else runs")


async def test_a_member_answering_requests_is_not_probed_in_between(
    cluster: EtcdCluster, store: Store
) -> None:
    await store.revision()
    start = await status_requests(cluster.members[0])
    loop = asyncio.get_running_loop()
    end = loop.time() + BUSY_WINDOW
    reads = 0
    while loop.time() < end:
        await store.revision()
        reads += 1
    probes = await status_requests(cluster.members[0]) - start
    # Probing regardless of the replies would send one every half second (five in the window);
    # one may still go out if a single read took half a second on a loaded machine.
    assert probes <= 2, f"{probes} probes while {reads} reads were answered"


async def test_a_longer_probe_interval_probes_a_silent_member_less_often(
    cluster: EtcdCluster, store: Store
) -> None:
    store.client.probe_after_silence(SILENT_WINDOW)
    await store.revision()
    start = await status_requests(cluster.members[0])
    loop = asyncio.get_running_loop()
    end = loop.time() + SILENT_WINDOW
    while loop.time() < end:
        await asyncio.sleep(0.1)  # a window measured, not a condition waited for
    probes = await status_requests(cluster.members[0]) - start
    # The default interval would send six; after SILENT_WINDOW of silence at most one is due.
    assert probes <= 2, f"{probes} probes in {SILENT_WINDOW} s of silence"
