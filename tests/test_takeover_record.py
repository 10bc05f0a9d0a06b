"""The standby takeover's fence record and its guard, on a real etcd with the agent's real
heartbeat: recorded although the victim's heartbeat key expired meanwhile (the host is off),
refused when an agent session started on the host after the standby read its session trace
(the host was powered on again, even if its agent took the old key over before it expired).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from controller.ha.production import EtcdEnvironment
from controller.ha.production_core import KINDS
from controller.migrations import Term
from controller.runtime import layout_keys
from controller.runtime.events import EventRecorder
from controller.runtime.heartbeat import Heartbeat, HeartbeatTiming
from controller.runtime.informer import SharedInformers
from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import guard_compare
from controller.runtime.store import Store
from e2e.harness.polling import eventually
from tests.support.ha import ELECTION, TIMINGS, get_node, node_object

HEARTBEAT = HeartbeatTiming(ttl=2, renew_interval=0.5, self_fence_margin=0.5)


async def _never_called() -> None:
    raise AssertionError("self-fencing is off")


@asynccontextmanager
async def agent_session(store: Store, node: str) -> AsyncIterator[Heartbeat]:
    """One agent session of `node`: the shipped heartbeat, stopped (not revoked) at the end,
    as when the host loses power."""
    heartbeat = Heartbeat(
        store.client, store.prefix, node, "test", HEARTBEAT, lambda: False, _never_called
    )
    task = asyncio.create_task(heartbeat.run())
    try:
        async with asyncio.timeout(30):
            await heartbeat.established.wait()
        yield heartbeat
    finally:
        task.cancel()
        await asyncio.wait({task})


async def session_revision(store: Store, node: str) -> int:
    kv = await store.client.get(store.raw_key(layout_keys.session(node)))
    assert kv is not None, "the heartbeat wrote no session trace"
    return int(kv.mod_revision)


async def heartbeat_gone(store: Store, node: str) -> bool:
    return await store.client.get(store.raw_key(layout_keys.heartbeat(node))) is None


@asynccontextmanager
async def leader_environment(store: Store) -> AsyncIterator[EtcdEnvironment]:
    """The production environment of a real, current term."""
    tokens: list[int] = []

    async def lead(token: int) -> None:
        tokens.append(token)
        await asyncio.Event().wait()

    elector = LeaderElector(store.client, store.prefix, "controller", "standby", ELECTION)
    leading = asyncio.create_task(elector.run(lead))
    informers = SharedInformers(store, None)
    for kind in KINDS:
        informers.informer(kind)
    informers.start()
    try:
        await eventually(lambda: bool(tokens), "the standby leads")
        await informers.wait_for_sync()
        term = Term(tokens[0], [guard_compare(store.client, elector.key, tokens[0])])
        recorder = EventRecorder(store, "test")
        env = EtcdEnvironment(store, informers, recorder, term, asyncio.Event(), TIMINGS)
        async with env:
            yield env
    finally:
        await informers.stop()
        leading.cancel()
        await asyncio.wait({leading})


async def test_recorded_although_the_heartbeat_key_expired_meanwhile(store: Store) -> None:
    await store.create(node_object("a"))
    async with agent_session(store, "a"):
        noted = await session_revision(store, "a")  # the standby's step 1
    await eventually(lambda: heartbeat_gone(store, "a"), "a's heartbeat key expired")
    async with leader_environment(store) as env:
        assert await env.record_takeover_fence("a", "ipmi", env.now(), noted)
    node = await get_node(store, "a")
    assert node.status.health == "Fenced"
    assert node.status.fence is not None and node.status.fence.how == "PowerOff"


async def test_refused_when_an_agent_session_started_after_the_note(store: Store) -> None:
    await store.create(node_object("a"))
    async with agent_session(store, "a"):
        noted = await session_revision(store, "a")
    # The host is powered on again, usually before its old key expired: the new agent then
    # takes the key over and its create_revision stays the same, which is why the guard
    # compares the session trace and not the heartbeat key.
    async with agent_session(store, "a"):
        assert await session_revision(store, "a") > noted
        async with leader_environment(store) as env:
            assert not await env.record_takeover_fence("a", "ipmi", env.now(), noted)
    assert (await get_node(store, "a")).status.health != "Fenced"
