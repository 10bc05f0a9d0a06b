"""A won takeover survives etcd not answering: on a real 3-member etcd that loses quorum right
after the claim was won, the claimant keeps its claim through the failed campaigns and, once
etcd answers again, leads the term that replaced the dead one (`took_over`), with a renew
deadline counted from then (the term is not lost at once)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import aetcd
import pytest

from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import ElectionTiming
from controller.runtime.store import Store
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually
from tests.support.etcd import three_members

TIMING = ElectionTiming(ttl=6, renew_period=0.5, renew_deadline=2.0, retry_period=0.5)
"""A claim lease (the TTL) longer than the outage, a renew deadline shorter: the old code lost
the claim at the first failed campaign, and a term's deadline counted from the takeover."""
PREFIX = "/claim"


cluster = three_members


@pytest.fixture
async def stores(cluster: EtcdCluster) -> AsyncIterator[tuple[Store, Store]]:
    async with (
        Store(cluster.endpoints, PREFIX) as dead,
        Store(cluster.endpoints, PREFIX) as standby,
    ):
        yield dead, standby


async def etcd_followers(cluster: EtcdCluster) -> list[int]:
    """The members that are not etcd's leader."""
    host, port = cluster.endpoints[0].rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    try:
        status = await client.status()
    finally:
        await client.close()
    assert status.leader is not None
    urls = " ".join(status.leader.client_urls)
    return [i for i, endpoint in enumerate(cluster.endpoints) if endpoint not in urls]


def pause_members(cluster: EtcdCluster, sig: signal.Signals, indexes: list[int]) -> None:
    """SIGSTOP or SIGCONT: followers only, so no paused etcd leader resumes and expires leases
    by its clock (a dead host's member never comes back; a paused leader would)."""
    for index in indexes:
        process = cluster.members[index].process
        assert process is not None
        process.send_signal(sig)


async def test_a_claim_survives_a_quorum_outage_and_becomes_the_term(
    cluster: EtcdCluster, stores: tuple[Store, Store], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.runtime.leader")
    dead_store, standby_store = stores
    tokens: list[int] = []
    lost: list[int] = []

    async def lead(token: int) -> None:
        tokens.append(token)
        try:
            await asyncio.Event().wait()
        finally:
            lost.append(token)

    dead = LeaderElector(dead_store.client, PREFIX, "controller", "dead", TIMING)
    dead_run = asyncio.create_task(dead.run(lead))
    standby = LeaderElector(standby_store.client, PREFIX, "controller", "standby", TIMING)
    standby_run: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: bool(tokens), "the first leader")
        dead_token = tokens[0]
        assert await standby.take_over(dead_token)
        dead_run.cancel()  # the dead leader's process is gone (its release finds the key gone)
        await asyncio.wait({dead_run})

        followers = await etcd_followers(cluster)
        pause_members(cluster, signal.SIGSTOP, followers)  # quorum lost before the campaign
        claimed_at = asyncio.get_running_loop().time()
        standby_run = asyncio.create_task(standby.run(lead))

        def outage_done() -> bool:
            failed = [r for r in caplog.records if "campaign for" in r.getMessage()]
            late = asyncio.get_running_loop().time() > claimed_at + TIMING.renew_deadline + 0.5
            return bool(failed) and late

        await eventually(outage_done, "a failed campaign, past the claim's first deadline")
        assert standby.is_leader is False
        pause_members(cluster, signal.SIGCONT, followers)

        await eventually(lambda: standby.is_leader, "the claimant leads")
        assert standby.took_over == dead_token
        new_token = tokens[-1]
        assert new_token > dead_token
        # The term holds past the claim's original deadline: it was counted from the refresh
        # just before the campaign. Two full renew deadlines of leading prove it renews.
        renewals = asyncio.get_running_loop().time() + 2 * TIMING.renew_deadline
        await eventually(
            lambda: asyncio.get_running_loop().time() > renewals or bool(lost[1:]),
            "two renew deadlines of leading",
        )
        assert lost == [dead_token], "the claimant's term was lost"
        assert standby.is_leader
    finally:
        for task in (dead_run, standby_run):
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
