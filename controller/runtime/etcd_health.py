"""What `kvmctl status` and the dashboard ask etcd itself: each member's health, the quorum,
the controllers' leader, heartbeat ages.

A member is healthy when a linearizable read through it answers in time (as `etcdctl endpoint
health` checks): that needs the member up and a quorum behind it. So the cluster has a quorum
exactly when at least one member is healthy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from controller.runtime import layout_keys
from controller.runtime.etcd_transport import StoreError, TlsFiles
from controller.runtime.leader_record import CONTROLLER_ELECTION, LeaderInfo, parse_leader
from controller.runtime.store import Store

MEMBER_TIMEOUT = 2.0
"""Seconds one member gets to answer: a dead one must not make `status` hang."""


@dataclass(frozen=True)
class MemberHealth:
    name: str
    endpoint: str
    healthy: bool
    leader: bool = False
    version: str | None = None
    raft_term: int | None = None
    db_size: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class EtcdHealth:
    members: list[MemberHealth]

    @property
    def quorum(self) -> bool:
        return any(member.healthy for member in self.members)


async def _members(store: Store) -> list[tuple[str, str]]:
    """(name, first client URL) of each member; the configured endpoints if etcd cannot say."""

    async def listed() -> list[tuple[str, str]]:
        return [
            (member.name or hex(member.id), member.client_urls[0])
            async for member in store.client.members()
            if member.client_urls
        ]

    try:
        found: list[tuple[str, str]] = await store.call(listed())
    except StoreError:
        found = []
    return found or [(endpoint, endpoint) for endpoint in store.endpoints]


async def _probe(name: str, endpoint: str, prefix: str, tls: TlsFiles | None) -> MemberHealth:
    member = Store([endpoint], prefix=prefix, timeout=MEMBER_TIMEOUT, tls=tls)
    try:
        await member.connect(check_layout=False)  # connect() does a linearizable read
        status = await member.call(member.client.status())
        leader = status.leader is not None and endpoint in status.leader.client_urls
        return MemberHealth(
            name,
            endpoint,
            healthy=True,
            leader=leader,
            version=status.version,
            raft_term=status.raft_term,
            db_size=status.db_size,
        )
    except StoreError as error:
        return MemberHealth(name, endpoint, healthy=False, error=str(error))
    finally:
        await member.close()


async def etcd_health(store: Store, tls: TlsFiles | None) -> EtcdHealth:
    """Every member, probed in parallel through a connection of its own."""
    members = await _members(store)
    probes = [_probe(name, url, store.prefix, tls) for name, url in members]
    return EtcdHealth(list(await asyncio.gather(*probes)))


async def read_leader(store: Store) -> LeaderInfo | None:
    """The leader of the controllers' election, its term the leader key's create revision."""
    key = layout_keys.absolute(store.prefix, layout_keys.leader(CONTROLLER_ELECTION))
    kv = await store.keys.get(key)
    return None if kv is None else parse_leader(key, kv.value, kv.create_revision)


async def heartbeat_ages(store: Store, nodes: Sequence[str]) -> dict[str, float | None]:
    """Seconds since each node's agent last renewed its heartbeat lease; None: no heartbeat.

    etcd resets a lease's remaining TTL at each renewal, so granted - remaining is the age
    (to etcd's whole-second resolution).
    """
    ages: dict[str, float | None] = {}
    for node in nodes:
        kv = await store.call(store.client.get(store.raw_key(layout_keys.heartbeat(node))))
        if kv is None:
            ages[node] = None
            continue
        if not kv.lease:
            ages[node] = 0.0
            continue
        info = await store.call(store.client.get_lease_info(kv.lease, keys=False))
        ages[node] = None if info.TTL < 0 else float(max(info.grantedTTL - info.TTL, 0))
    return ages
