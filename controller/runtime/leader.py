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
The claimant campaigns as soon as it has won the claim (not after a retry period), refreshes the
claim's lease first (the term's renew deadline counts from that refresh, not from the takeover),
and keeps the claim through a campaign that fails without an answer (etcd electing its own
leader): only etcd's "no" ends a claim. A campaign whose reply was lost but that etcd applied is
recognised on the next try by the leader key's lease being the claim's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import aetcd

from controller.runtime import layout_keys
from controller.runtime.leader_calls import ElectionCalls, _Claim, _seen_revision, _Term
from controller.runtime.leader_record import ElectionTiming, LeaderInfo, current_leader
from controller.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Leading = Callable[[int], Coroutine[Any, Any, None]]


CLAIM_RETRY = 0.1
"""Seconds between campaigns of a claimant whose campaign got no answer (etcd electing)."""


class LeaderElector(ElectionCalls):
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
        self.key = layout_keys.absolute(prefix, layout_keys.leader(name))
        self._key_bytes = self.key.encode()
        self._claim_bytes = layout_keys.absolute(prefix, layout_keys.leader_takeover(name)).encode()
        self._claim: _Claim | None = None
        self._claimed = asyncio.Event()  # set by a won take_over: campaign now
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
        self._claimed.set()
        log.warning("%s ended term %d of %s: taking over", self.identity, token, self.key)
        return True

    async def current_leader(self) -> LeaderInfo | None:
        return await current_leader(self._client, self.key)

    async def run(self, leading: Leading) -> None:
        """Lead whenever possible; return (after resigning) when `leading` returns or raises."""
        while True:
            try:
                term = await self._acquire()
            except asyncio.CancelledError:
                await self._drop_claim()
                raise
            work = asyncio.create_task(leading(term.token), name=f"leading {self.key}")
            self._work = work
            try:
                await self._hold(term, work)
                ended_by_itself = work.done() and self._term is term
            finally:
                resigned_meanwhile = self._term is not term
                self._term = None
                await cancel_and_wait([work])
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
            await cancel_and_wait([self._work])
        await self._release(term)

    async def _acquire(self) -> _Term:
        """Campaign until this elector leads."""
        while True:
            try:
                outcome = await self._campaign()
            except (TimeoutError, aetcd.ClientError) as error:
                log.warning("campaign for %s failed, retrying: %s", self.key, error)
                # A claimant retries at once: its claim keeps every other candidate out.
                retry = CLAIM_RETRY if self._claim is not None else self.timing.retry_period
                await self._wait_for_claim(asyncio.sleep(retry))
                continue
            if isinstance(outcome, _Term):
                if not await self._fresh(outcome):
                    continue
                self._term = outcome
                log.info("%s leads %s with token %d", self.identity, self.key, outcome.token)
                return outcome
            if outcome >= 0:
                await self._wait_for_claim(self._wait_for_change(outcome, self.timing.retry_period))

    async def _fresh(self, term: _Term) -> bool:
        """Make sure a won term has time left before its renew deadline.

        The deadline counts from the lease's grant (or the claim's refresh), before the
        campaign: a campaign that took long (etcd electing) leaves little or none. Renew then
        before any leader-only work starts; if that fails, give the term up (revoking its lease
        deletes the key) and campaign again.
        """
        loop = asyncio.get_running_loop()
        if loop.time() < term.deadline - self.timing.renew_period:
            return True
        sent_at = loop.time()
        try:
            async with asyncio.timeout(self.timing.renew_deadline):
                reply = await self._client.refresh_lease(term.lease_id)
        except (TimeoutError, aetcd.ClientError) as error:
            reply, why = None, f"no renewal ({error})"
        else:
            why = "its lease expired"
        if reply is None or reply.TTL <= 0:
            log.error("%s won %s but lost it at once: %s", self.identity, self.key, why)
            await self._revoke_quietly(term.lease_id)
            return False
        term.deadline = sent_at + self.timing.renew_deadline
        return True

    async def _wait_for_claim(self, wait: Coroutine[Any, Any, None]) -> None:
        """Run `wait`, returning early when `take_over` wins a claim."""
        if self._claimed.is_set():
            wait.close()
            return
        waiting = asyncio.create_task(wait)
        claimed = asyncio.create_task(self._claimed.wait())
        try:
            await asyncio.wait({waiting, claimed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([waiting])
            await cancel_and_wait([claimed])

    async def _campaign(self) -> _Term | int:
        """Try once to create the key: our term if we won, else the revision we saw it at."""
        self._claimed.clear()
        claim = self._claim
        if claim is not None:
            return await self._campaign_with_claim(claim)
        granted_at = asyncio.get_running_loop().time()
        async with asyncio.timeout(self.timing.ttl):
            lease_id = (await self._client.lease(self.timing.ttl)).id
        won = False
        try:
            won, responses = await self._create_key(lease_id, create_revision_of_claim=0)
        finally:
            if not won:
                await self._revoke_quietly(lease_id)
        if not won:
            return _seen_revision(responses)
        return self._won(responses, lease_id, granted_at, took_over=None)

    async def _campaign_with_claim(self, claim: _Claim) -> _Term | int:
        """Campaign with our claim, whose lease becomes the term's. Raises (keeping the claim)
        when etcd does not answer; drops it when etcd says it is gone."""
        sent_at = asyncio.get_running_loop().time()
        async with asyncio.timeout(self.timing.ttl):
            reply = await self._client.refresh_lease(claim.lease_id)
        if reply is None or reply.TTL <= 0:
            log.error(
                "%s: the takeover claim on %s expired before its campaign", self.identity, self.key
            )
            self._claim = None
            return -1  # campaign again at once, without it
        self._claim = claim = replace(claim, granted_at=sent_at)
        won, responses = await self._create_key(claim.lease_id, claim.revision)
        if not won:
            kv = responses[0][0][1] if responses[0] else None
            if kv is not None and kv.lease == claim.lease_id:  # an earlier try was applied
                self._claim = None
                return self._term_of(kv, claim.lease_id, sent_at, claim.replaced)
            self._claim = None
            await self._revoke_quietly(claim.lease_id)
            log.error("%s: the takeover claim on %s was lost", self.identity, self.key)
            return _seen_revision(responses)
        self._claim = None
        return self._won(responses, claim.lease_id, sent_at, took_over=claim.replaced)

    async def _hold(self, term: _Term, work: asyncio.Task[None]) -> None:
        """Keep `term` alive until `work` ends or leadership is lost."""
        loop = asyncio.get_running_loop()
        while True:
            wait = max(0.0, min(self.timing.renew_period, term.deadline - loop.time()))
            change = asyncio.create_task(self._wait_for_change(term.seen_revision, wait))
            try:
                await asyncio.wait({work, change}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait([change])
            if work.done() or self._term is not term or not await self._renew(term):
                return

    async def _drop_claim(self) -> None:
        """Shutting down with a won claim: revoke it, so the others need not wait its TTL."""
        claim, self._claim = self._claim, None
        if claim is not None:
            await self._revoke_quietly(claim.lease_id)
