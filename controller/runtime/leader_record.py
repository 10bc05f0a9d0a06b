"""The leader election's record and settings: the leader record, the fencing token's
guard and the timing (the elector itself is `controller/runtime/leader.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import aetcd


@dataclass(frozen=True)
class ElectionTiming:
    """Lease TTL (whole seconds, etcd's unit) and the periods derived from it, in seconds."""

    ttl: int = 5
    renew_period: float = 1.0
    renew_deadline: float = 3.5
    retry_period: float = 1.0

    @classmethod
    def for_ttl(cls, ttl: int) -> ElectionTiming:
        """Periods in the default proportions for a given TTL (5 s: renew 1 s, deadline 3.5 s)."""
        return cls(
            ttl=ttl, renew_period=ttl / 5, renew_deadline=ttl * 0.7, retry_period=min(1.0, ttl / 5)
        )

    def __post_init__(self) -> None:
        if self.ttl < 2:
            raise ValueError(f"leader election ttl must be at least 2 s (etcd), got {self.ttl}")
        if not 0 < self.renew_period < self.renew_deadline < self.ttl:
            raise ValueError(
                "leader election needs 0 < renew_period < renew_deadline < ttl, got "
                f"{self.renew_period}, {self.renew_deadline}, {self.ttl}"
            )
        if self.retry_period <= 0:
            raise ValueError(f"leader election retry_period must be > 0, got {self.retry_period}")


@dataclass(frozen=True)
class LeaderInfo:
    """The current leader, as `kvmctl get leader` shows it."""

    identity: str
    since: datetime
    token: int
    node: str | None = None
    """The ClusterNode the leader runs on, when its elector was told."""


class LeaderRecordError(ValueError):
    """The leader key holds something that is not a leader record."""


CONTROLLER_ELECTION = "controller"
"""The election the controllers run; its leader key's create revision is the current term."""


ELECTION_ERRORS = (TimeoutError, aetcd.ClientError)
"""What a call of the elector raises when etcd cannot be reached (callers outside the runtime
catch these, not aetcd's types)."""


def guard_compare(client: aetcd.Client, key: str, token: int) -> aetcd.transactions.Create:
    """The compare to add to a transaction so it succeeds only while term `token` leads."""
    return client.transactions.create(key.encode()) == token


async def current_leader(client: aetcd.Client, key: str) -> LeaderInfo | None:
    """Who holds the leader key `key`, since when and with which token; None if nobody."""
    kv = await client.get(key.encode())
    return None if kv is None else parse_leader(key, kv.value, kv.create_revision)


def parse_leader(key: str, value: bytes, create_revision: int) -> LeaderInfo:
    """The leader record `value` of the leader key `key`, created at `create_revision` (its
    token)."""
    try:
        record = json.loads(value)
        identity = record["identity"]
        since = datetime.fromisoformat(record["acquiredAt"])
        node = record.get("node")
        if not isinstance(identity, str):
            raise TypeError("identity is not a string")
        if node is not None and not isinstance(node, str):
            raise TypeError("node is not a string")
    except (ValueError, KeyError, TypeError) as error:
        raise LeaderRecordError(
            f"leader key {key} holds no valid leader record ({error}): {value[:200]!r}"
        ) from None
    return LeaderInfo(identity=identity, since=since, token=create_revision, node=node)
