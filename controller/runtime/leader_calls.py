"""The leader elector's requests to etcd: the campaign transaction, renewal, release, the watch
on the key and revoking unused leases.

`ElectionCalls` is the base of `LeaderElector` (`leader.py`), which decides when to make them
and sets the attributes declared here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aetcd

from controller.runtime.leader_record import ElectionTiming, guard_compare

log = logging.getLogger("controller.runtime.leader")  # one logger for the whole elector


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


class ElectionCalls:
    """The requests of one candidate for one election key; see `LeaderElector`."""

    _client: aetcd.Client
    key: str
    _key_bytes: bytes
    _claim_bytes: bytes
    identity: str
    node: str | None
    timing: ElectionTiming

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

    async def _create_key(
        self, lease_id: int, create_revision_of_claim: int
    ) -> tuple[bool, list[Any]]:
        """The campaign transaction: create the key with `lease_id` if it is absent and the
        claim key's create_revision is `create_revision_of_claim` (0: no claim)."""
        txn = self._client.transactions
        record: dict[str, str] = {
            "identity": self.identity,
            "acquiredAt": datetime.now(UTC).isoformat(),
        }
        if self.node is not None:
            record["node"] = self.node
        async with asyncio.timeout(self.timing.ttl):
            won, responses = await self._client.transaction(
                compare=[
                    txn.create(self._key_bytes) == 0,
                    txn.create(self._claim_bytes) == create_revision_of_claim,
                ],
                success=[
                    txn.put(self._key_bytes, json.dumps(record).encode(), lease=lease_id),
                    txn.delete(self._claim_bytes),
                    txn.get(self._key_bytes),
                ],
                failure=[txn.get(self._key_bytes), txn.get(self._claim_bytes)],
            )
        return bool(won), list(responses)

    def _won(
        self, responses: list[Any], lease_id: int, granted_at: float, took_over: int | None
    ) -> _Term:
        # The last operation of the success branch is the get: a list of (value, rtypes.Get).
        return self._term_of(responses[-1][0][1], lease_id, granted_at, took_over)

    def _term_of(self, kv: Any, lease_id: int, granted_at: float, took_over: int | None) -> _Term:
        return _Term(
            lease_id=lease_id,
            token=kv.create_revision,
            deadline=granted_at + self.timing.renew_deadline,
            seen_revision=kv.header.revision,
            took_over=took_over,
        )

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


def _seen_revision(failure: list[Any]) -> int:
    """The revision a lost campaign saw: the header of the leader key's value, else the
    claim's; -1 with neither (a claim that expired: campaign again at once)."""
    found = [kvs[0][1] for kvs in failure if kvs]
    return int(found[0].header.revision) if found else -1
