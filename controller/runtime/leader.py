"""Leader election on etcd, with fencing tokens.

The leader holds the key `<prefix>/leader/<name>`, bound to its lease, holding the JSON record
`{"identity": ..., "acquiredAt": ...}`. A campaign is one transaction: "the key does not exist
(create_revision == 0) -> put it with my lease". The key's create_revision is the **fencing
token**: it grows with every new term, and every safety-critical write (placing a VM, declaring
a node fenced) carries `guard_compare(client, key, token)` in its own transaction, so the write
of a deposed or paused leader fails in etcd itself, whatever that leader believes.

Timing (defaults, `ElectionTiming`):
- `ttl` 5 s: a dead leader is replaced within about ttl + 0.5 s. Smaller is allowed down to
  etcd's minimum of 2 s, but 5 s survives a 2-core machine under load and an etcd member
  election (about 2 s) without a spurious failover.
- `renew_period` 1 s: the leader refreshes its lease and re-reads its key this often.
- `renew_deadline` 3.5 s: measured on the local monotonic clock from the *sending* of the last
  successful renewal, so it ends before etcd can expire the lease (the server counts the TTL
  from when it received that renewal); leader-only work is cancelled when it passes. The 1.5 s
  margin under the TTL leaves time for that cancellation to take effect.
- `retry_period` 1 s: how often a follower re-campaigns when it sees no change; it also watches
  the key and campaigns at once when the leader resigns or its lease expires.

Takeover (`LeaderElector.take_over(token)`): a candidate that knows term `token`'s leader is
dead (the HA controller's standby, once the leader's host is confirmed powered off) replaces it
without waiting for the TTL. etcd refuses a delete and a put of the same key in one
transaction, and a put over the existing key would keep its create_revision (the token), so
it takes two steps. The decisive one is a single transaction: "if create_revision(key) ==
token: delete the key and put the claim key `<key>.takeover` with my lease". Exactly one
candidate passes that compare for a given term. Every campaign requires the claim key to be
absent, except the claimant's, which requires the claim to be its own; so the claimant wins
the next campaign, with a new token. A claimant that dies lets its claim expire with its lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aetcd

log = logging.getLogger(__name__)

Leading = Callable[[int], Coroutine[Any, Any, None]]


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


def leader_key(prefix: str, name: str) -> str:
    """The key of election `name` under the cluster's key prefix."""
    if not name or "/" in name:
        raise ValueError(f"leader election name must be non-empty and without '/', got {name!r}")
    return f"{prefix.rstrip('/')}/leader/{name}"


ELECTION_ERRORS = (TimeoutError, aetcd.ClientError)
"""What a call of the elector raises when etcd cannot be reached (callers outside the runtime
catch these, not aetcd's types)."""


def guard_compare(client: aetcd.Client, key: str, token: int) -> aetcd.transactions.Create:
    """The compare to add to a transaction so it succeeds only while term `token` leads."""
    return client.transactions.create(key.encode()) == token


async def current_leader(client: aetcd.Client, key: str) -> LeaderInfo | None:
    """Who holds the leader key `key`, since when and with which token; None if nobody."""
    kv = await client.get(key.encode())
    if kv is None:
        return None
    try:
        record = json.loads(kv.value)
        identity = record["identity"]
        since = datetime.fromisoformat(record["acquiredAt"])
        node = record.get("node")
        if not isinstance(identity, str):
            raise TypeError("identity is not a string")
        if node is not None and not isinstance(node, str):
            raise TypeError("node is not a string")
    except (ValueError, KeyError, TypeError) as error:
        raise LeaderRecordError(
            f"leader key {key} holds no valid leader record ({error}): {kv.value[:200]!r}"
        ) from None
    return LeaderInfo(identity=identity, since=since, token=kv.create_revision, node=node)


@dataclass
class _Term:
    """One period of leadership, as this elector holds it."""

    lease_id: int
    token: int
    deadline: float  # event-loop time after which the lease must be assumed lost
    seen_revision: int  # etcd revision at which the key was last seen to be ours
    took_over: int | None = None  # the token of the term this one replaced by take_over()


@dataclass(frozen=True)
class _Claim:
    """A won takeover: the claim key's lease and create_revision, and the term it ended."""

    lease_id: int
    granted_at: float
    revision: int
    replaced: int


class LeaderElector:
    """Campaigns for `<prefix>/leader/<name>` as `identity` and runs leader-only work.

    Use `run(leading)`: it calls `leading(token)` as a task while leader, cancels it the moment
    leadership is lost and campaigns again. Cancel `run` to shut down: it stops the work, then
    resigns so another candidate takes over at once.
    """

    def __init__(
        self,
        client: aetcd.Client,
        prefix: str,
        name: str,
        identity: str,
        timing: ElectionTiming | None = None,
        node: str | None = None,
    ) -> None:
        """`node` (the ClusterNode this candidate runs on) goes into the leader record, so
        standbys know which host to watch."""
        if not identity:
            raise ValueError("leader election identity must be non-empty")
        self._client = client
        self.key = leader_key(prefix, name)
        self._key_bytes = self.key.encode()
        self._claim_bytes = f"{self.key}.takeover".encode()
        self._claim: _Claim | None = None
        self.node = node
        self.identity = identity
        self.timing = timing or ElectionTiming()
        self._term: _Term | None = None
        self._work: asyncio.Task[None] | None = None  # the leader-only work of the last term

    @property
    def is_leader(self) -> bool:
        return self._term is not None

    @property
    def took_over(self) -> int | None:
        """While leading: the token of the term this one replaced by `take_over`, else None."""
        return None if self._term is None else self._term.took_over

    async def take_over(self, token: int) -> bool:
        """End term `token` now and make this candidate the next leader; False if that term
        is already over (or another candidate took over first).

        Only for a leader known to be dead (its host confirmed powered off): its lease may
        still be valid, its guarded writes fail from this transaction on. `run()` then wins
        the campaign at once (see the module docstring); raises one of `ELECTION_ERRORS`
        when etcd cannot be reached.
        """
        if self._term is not None:
            return False
        granted_at = asyncio.get_running_loop().time()
        claim = json.dumps({"identity": self.identity, "replaces": token}).encode()
        async with asyncio.timeout(self.timing.ttl):
            lease = await self._client.lease(self.timing.ttl)
        won = False
        try:
            async with asyncio.timeout(self.timing.ttl):
                won, responses = await self._client.transaction(
                    compare=[self._client.transactions.create(self._key_bytes) == token],
                    success=[
                        self._client.transactions.delete(self._key_bytes),
                        self._client.transactions.put(self._claim_bytes, claim, lease=lease.id),
                        self._client.transactions.get(self._claim_bytes),
                    ],
                    failure=[],
                )
        finally:
            if not won:
                await self._revoke_quietly(lease.id)
        if not won:
            log.info("%s: term %d of %s is already over", self.identity, token, self.key)
            return False
        kv = responses[-1][0][1]
        self._claim = _Claim(lease.id, granted_at, kv.create_revision, token)
        log.warning("%s ended term %d of %s: taking over", self.identity, token, self.key)
        return True

    async def current_leader(self) -> LeaderInfo | None:
        return await current_leader(self._client, self.key)

    async def run(self, leading: Leading) -> None:
        """Lead whenever possible; return (after resigning) when `leading` returns or raises."""
        while True:
            term = await self._acquire()
            work = asyncio.create_task(leading(term.token), name=f"leading {self.key}")
            self._work = work
            try:
                await self._hold(term, work)
                ended_by_itself = work.done() and self._term is term
            finally:
                resigned_meanwhile = self._term is not term
                self._term = None
                await _cancel_and_wait(work)
                if not resigned_meanwhile:
                    await self._release(term)
            if ended_by_itself:
                work.result()  # re-raises what `leading` raised
                return
            if resigned_meanwhile:
                # Stepping down must hand over: the other candidates watch the key and
                # campaign at once, so give them one retry period before campaigning again.
                await asyncio.sleep(self.timing.retry_period)

    async def resign(self) -> None:
        """Give up leadership if held: delete the key if still ours, then revoke the lease.

        `run()` does this itself when cancelled. Called while `run()` is active, it steps down
        now: it stops the leader-only work first, and `run()` campaigns again only after one
        retry period, so that another candidate takes over.
        Revoking alone would delete the key too; the guarded delete first makes the handover
        visible even if the revoke does not get through. Best effort: if etcd is unreachable,
        the lease expires by itself within the TTL.
        """
        term, self._term = self._term, None
        if term is None:
            return
        if self._work is not None:
            await _cancel_and_wait(self._work)
        await self._release(term)

    async def _release(self, term: _Term) -> None:
        try:
            async with asyncio.timeout(self.timing.renew_deadline):
                await self._client.transaction(
                    compare=[guard_compare(self._client, self.key, term.token)],
                    success=[self._client.transactions.delete(self._key_bytes)],
                    failure=[],
                )
                await self._client.revoke_lease(term.lease_id)
        except (TimeoutError, aetcd.ClientError) as error:
            log.warning(
                "releasing term %d of %s did not complete (%s); its lease expires within %d s",
                term.token,
                self.key,
                error,
                self.timing.ttl,
            )
        else:
            log.info("%s resigned leadership of %s (token %d)", self.identity, self.key, term.token)

    async def _acquire(self) -> _Term:
        """Campaign until this elector leads."""
        while True:
            try:
                outcome = await self._campaign()
            except (TimeoutError, aetcd.ClientError) as error:
                log.warning("campaign for %s failed, retrying: %s", self.key, error)
                await asyncio.sleep(self.timing.retry_period)
                continue
            if isinstance(outcome, _Term):
                self._term = outcome
                log.info("%s leads %s with token %d", self.identity, self.key, outcome.token)
                return outcome
            if outcome >= 0:
                await self._wait_for_change(outcome, self.timing.retry_period)

    async def _campaign(self) -> _Term | int:
        """Try once to create the key: our term if we won, else the revision we saw it at."""
        txn = self._client.transactions
        record: dict[str, str] = {
            "identity": self.identity,
            "acquiredAt": datetime.now(UTC).isoformat(),
        }
        if self.node is not None:
            record["node"] = self.node
        claim, self._claim = self._claim, None
        if claim is not None:  # ours: the claim's lease becomes the term's lease
            granted_at, lease_id = claim.granted_at, claim.lease_id
            claimed = [txn.create(self._claim_bytes) == claim.revision]
        else:
            granted_at = asyncio.get_running_loop().time()
            async with asyncio.timeout(self.timing.ttl):
                lease_id = (await self._client.lease(self.timing.ttl)).id
            claimed = [txn.create(self._claim_bytes) == 0]
        won = False
        try:
            async with asyncio.timeout(self.timing.ttl):
                won, responses = await self._client.transaction(
                    compare=[txn.create(self._key_bytes) == 0, *claimed],
                    success=[
                        txn.put(self._key_bytes, json.dumps(record).encode(), lease=lease_id),
                        txn.delete(self._claim_bytes),
                        txn.get(self._key_bytes),
                    ],
                    failure=[txn.get(self._key_bytes), txn.get(self._claim_bytes)],
                )
        finally:
            if not won:
                await self._revoke_quietly(lease_id)
        # The last operation of either branch is the get: a list of (value, rtypes.Get).
        if not won:
            # The header comes with a value: the leader key's, else the claim's. With neither
            # (our own claim expired), campaign again at once without it.
            found = [kvs[0][1] for kvs in responses if kvs]
            seen_revision: int = found[0].header.revision if found else -1
            return seen_revision
        kv = responses[-1][0][1]
        return _Term(
            lease_id=lease_id,
            token=kv.create_revision,
            deadline=granted_at + self.timing.renew_deadline,
            seen_revision=kv.header.revision,
            took_over=None if claim is None else claim.replaced,
        )

    async def _hold(self, term: _Term, work: asyncio.Task[None]) -> None:
        """Keep `term` alive until `work` ends or leadership is lost."""
        loop = asyncio.get_running_loop()
        while True:
            wait = max(0.0, min(self.timing.renew_period, term.deadline - loop.time()))
            change = asyncio.create_task(self._wait_for_change(term.seen_revision, wait))
            try:
                await asyncio.wait({work, change}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await _cancel_and_wait(change)
            if work.done() or self._term is not term or not await self._renew(term):
                return

    async def _renew(self, term: _Term) -> bool:
        """Refresh the lease and check the key is still ours; False once leadership is lost."""
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        try:
            async with asyncio.timeout_at(term.deadline):
                reply = await self._client.refresh_lease(term.lease_id)
                kv = await self._client.get(self._key_bytes)
        except (TimeoutError, aetcd.ClientError) as error:
            if loop.time() < term.deadline:
                log.warning("renewing leadership of %s failed, retrying: %s", self.key, error)
                return True
            log.error("%s lost %s: no renewal before the deadline", self.identity, self.key)
            return False
        if reply is None or reply.TTL <= 0:
            log.error("%s lost %s: its lease expired or was revoked", self.identity, self.key)
            return False
        if kv is None or kv.create_revision != term.token:
            log.error("%s lost %s: the key was deleted or replaced", self.identity, self.key)
            return False
        term.deadline = sent_at + self.timing.renew_deadline
        term.seen_revision = kv.header.revision
        return True

    async def _wait_for_change(self, after_revision: int, period: float) -> None:
        """Return early if the key may be deleted after `after_revision`, else after `period`.

        The watch only wakes us sooner; callers always re-read etcd before deciding anything.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + period
        try:
            async with asyncio.timeout_at(deadline):
                watch = await self._client.watch(
                    self._key_bytes,
                    start_revision=after_revision + 1,
                    kind=aetcd.EventKind.DELETE,
                )
                try:
                    async for _ in watch:
                        return
                finally:
                    await watch.cancel()
        except TimeoutError:
            return
        except aetcd.RevisionCompactedError:
            return  # history is gone: let the caller re-read the key
        except aetcd.ClientError as error:
            log.debug("watching %s failed, polling instead: %s", self.key, error)
        # The watch failed or ended without an event: wait out the period like a poll.
        await asyncio.sleep(max(0.0, deadline - loop.time()))

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            async with asyncio.timeout(self.timing.ttl):
                await self._client.revoke_lease(lease_id)
        except (TimeoutError, aetcd.ClientError) as error:
            log.debug("revoking unused lease %x failed; it expires by itself: %s", lease_id, error)


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it has finished, without swallowing our own cancellation."""
    task.cancel()
    await asyncio.wait({task})
