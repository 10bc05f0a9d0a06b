"""Several etcd members behind one client: a request goes to a live member and, when that one is
dead, hung or unreachable, moves on to the next within the same call.

Each member has its own gRPC channel. Requests go to the *current* member; a failed attempt moves
the current member on. What is retried on the next member, inside the caller's deadline:

- a request that cannot change anything (a range read, a read-only transaction, a status, a
  lease's keep-alive or time-to-live, a lease grant whose orphan would expire by itself), on any
  connection failure or when its attempt ran out of time: the first attempt on a member gets
  `ATTEMPT_TIMEOUT`, each round over all members doubles it, so a merely slow cluster still
  answers;
- a guarded transaction (one with a compare: every store write) likewise, its first attempt
  getting `WRITE_ATTEMPT_TIMEOUT`, enough for etcd to elect a new leader (a proposal forwarded to
  a leader that just died is lost, and its request only ends with its deadline). It cannot apply
  twice: if the first attempt was applied after all, the repeat finds its guard broken and fails
  (a Conflict), as the caller's own retry of an `Unavailable` would;
- any other request only when it failed before it reached the member (the connection was
  refused or could not be made): it cannot have been applied. A plain put or delete that reached
  a member which then stopped answering fails (`Unavailable`): whether it was applied is unknown.

A probe asks a member's status when it has shown no sign of life for the probe interval while
it is in use (the current member, and any member with a request or a stream in flight), else for
`IDLE_PROBE_INTERVAL`. A sign of life is a probe sent or a reply to any request or stream: a
member answering requests needs no probe in between (in an otherwise idle process an isolated
gRPC call costs about 2.5 ms of CPU, most of it gRPC's threads waking). The probe interval is
`PROBE_INTERVAL` unless the client's owner sets a longer one: an agent sets its lease's renewal
interval, every renewal being an answer, so a renewing agent sends no probe to the member in
use. A member that does not answer a probe within `PROBE_TIMEOUT` is *lost*: requests and
streams (watches) in flight on it end at once with UNAVAILABLE (a watch then resumes on a live
member), and new ones go elsewhere until it answers again. The probe wakes when a member is due,
and at least every `PROBE_TICK` (a member just put in use may be due at once), so a member that
stops answering is found lost at most the probe interval plus `PROBE_TIMEOUT` after its last
sign of life (with the default interval no later than when every member in use was probed every
0.5 s whatever its traffic). A member nothing runs on is only a candidate for the next
failover, where a dead one costs one attempt (its connection refused, or its attempt timing
out) before the request moves on. With a single member there is nothing to fail over to: no
probe runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import aetcd.rpc
import grpc

log = logging.getLogger(__name__)

CANCEL_GRACE = 1.0
"""Seconds a cancelled request may take to end before it is left behind."""
ATTEMPT_TIMEOUT = 0.5
"""Seconds the first attempt of a repeatable read waits on one member."""
WRITE_ATTEMPT_TIMEOUT = 2.0
"""Seconds the first attempt of a guarded transaction waits on one member."""
PROBE_INTERVAL = 0.5
PROBE_TICK = 0.25
"""The longest the probe sleeps: how soon it sees a member newly in use."""
IDLE_PROBE_INTERVAL = 5.0
PROBE_TIMEOUT = 1.0
DEFAULT_DEADLINE = 5.0
"""A request's whole deadline when its caller gives none."""

_SAFE_TO_REPEAT = {
    "Range",
    "Status",
    "MemberList",
    "LeaseTimeToLive",
    "LeaseLeases",
    "LeaseKeepAlive",
    "LeaseGrant",
}
_NOT_SENT = ("failed to connect to all addresses", "connection refused")
T = TypeVar("T")


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def first_attempt(method: str, request: Any) -> float | None:
    """The first attempt's seconds when `request` may be repeated on a timeout (sending it twice
    has no other effect than sending it once), None when it may not."""
    if method == "Txn":
        ops = [*request.success, *request.failure]
        if all(op.WhichOneof("request") == "request_range" for op in ops):
            return ATTEMPT_TIMEOUT
        return WRITE_ATTEMPT_TIMEOUT if request.compare else None
    return ATTEMPT_TIMEOUT if method in _SAFE_TO_REPEAT else None


def retryable(error: grpc.aio.AioRpcError, repeatable: bool) -> bool:
    """Whether a failed attempt may be repeated on another member."""
    code = error.code()
    details = (error.details() or "").lower()
    if repeatable:
        # etcd may answer an attempt's own deadline first, as UNKNOWN "context deadline exceeded".
        timed_out = code == grpc.StatusCode.UNKNOWN and "context deadline exceeded" in details
        return timed_out or code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return code == grpc.StatusCode.UNAVAILABLE and any(text in details for text in _NOT_SENT)


def _timed_out(error: grpc.aio.AioRpcError) -> bool:
    return bool(error.code() == grpc.StatusCode.DEADLINE_EXCEEDED)


class Member:
    """One etcd endpoint and its channel (dialled on first use)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None, options: Any):
        self.target = target
        self._credentials = credentials
        self._options = options
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[type, Any] = {}
        self.alive = True
        self.lost = asyncio.Event()
        """Set when the probe finds the member dead: what runs on it gives up."""
        self.users = 0
        """Requests and streams in flight on this member."""
        self.alive_at: float | None = None
        """When it last showed a sign of life (a probe sent, a reply read): the probe's clock."""

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        self.users += 1
        try:
            yield
        finally:
            self.users -= 1

    def stub(self, stub_class: type) -> Any:
        if self._channel is None:
            self._channel = (
                grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
                if self._credentials is not None
                else grpc.aio.insecure_channel(self.target, options=self._options)
            )
        if stub_class not in self._stubs:
            self._stubs[stub_class] = stub_class(self._channel)
        return self._stubs[stub_class]

    async def close(self) -> None:
        channel, self._channel, self._stubs = self._channel, None, {}
        if channel is not None:
            await channel.close()


async def unless_lost(lost: asyncio.Event, target: str, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result, or UNAVAILABLE as soon as `lost` is set (the request is cancelled).

    A cancelled request normally ends at once; one that does not (a call stuck on a dead
    connection) is left behind after `CANCEL_GRACE` rather than hang its caller, whose own
    timeout has already fired and cannot fire again.
    """
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_take_outcome)
    waiter = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        _, stuck = await asyncio.wait({task, waiter}, timeout=CANCEL_GRACE)
        if stuck:
            log.warning("a request to etcd member %s did not end when cancelled: left", target)
    if task.done() and not task.cancelled():
        return task.result()
    raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"etcd member {target} stopped answering")


def _take_outcome(task: asyncio.Future[Any]) -> None:
    """Mark a request's failure as seen. Its caller may have moved on (the request was left
    behind, or the caller itself was cancelled by its own timeout and the request then failed):
    without this asyncio reports each as "Task exception was never retrieved"."""
    if not task.cancelled() and (failure := task.exception()) is not None:
        log.debug("a request to etcd ended with %s", failure)


class Members:
    """The members of one client, which one is current, and the probe that tells the lost."""

    def __init__(
        self,
        targets: Sequence[str],
        credentials: grpc.ChannelCredentials | None,
        options: Any,
        metadata: Any = None,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self.members = [Member(target, credentials, options) for target in targets]
        self.metadata = metadata
        self.probe_interval = probe_interval
        """Seconds of silence after which a member in use is probed."""
        self._current = 0
        self._probe: asyncio.Task[None] | None = None

    def start(self) -> None:
        if len(self.members) > 1 and self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._probe_forever())

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        for member in self.members:
            member.lost.set()
            await member.close()

    def pick(self, tried: set[Member]) -> Member:
        """The member to try next: the current one if untried, else the next untried live one
        (or untried lost one, the probe may lag behind)."""
        count = len(self.members)
        order = [self.members[(self._current + i) % count] for i in range(count)]
        untried = [member for member in order if member not in tried]
        choice = next((member for member in untried if member.alive), untried[0])
        self._current = self.members.index(choice)
        return choice

    def failed(self, member: Member) -> None:
        """An attempt on `member` failed: the next request starts elsewhere."""
        if len(self.members) > 1 and self.members[self._current] is member:
            self._current = (self._current + 1) % len(self.members)

    async def _probe_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = [member for member in self.members if self._due_at(member) <= now]
            for member in due:
                member.alive_at = now
            await asyncio.gather(*(self._check(member) for member in due))
            next_due = min(self._due_at(member) for member in self.members)
            await asyncio.sleep(min(PROBE_TICK, max(0.0, next_due - loop.time())))

    def _due_at(self, member: Member) -> float:
        """When to probe `member`: after the probe interval without a sign of life while it is
        in use, else after `IDLE_PROBE_INTERVAL`."""
        if member.alive_at is None:
            return -math.inf
        in_use = member is self.members[self._current] or member.users
        return member.alive_at + (self.probe_interval if in_use else IDLE_PROBE_INTERVAL)

    async def _check(self, member: Member) -> None:
        stub = member.stub(aetcd.rpc.MaintenanceStub)
        try:
            await stub.Status(
                aetcd.rpc.StatusRequest(), timeout=PROBE_TIMEOUT, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            if member.alive:
                log.warning("etcd member %s lost: %s", member.target, error.code().name)
                member.alive = False
                member.lost.set()
                self.failed(member)
            return
        if not member.alive:
            log.info("etcd member %s answers again", member.target)
            member.alive = True
            member.lost = asyncio.Event()

    async def unary(
        self,
        first: float | None,
        timeout: float | None,
        attempt: Callable[[Member, float], Awaitable[T]],
    ) -> T:
        """`attempt(member, seconds)` on members in turn until one succeeds (see the module).
        `first`: the first attempt's seconds for a request that may be repeated, else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (DEFAULT_DEADLINE if timeout is None else timeout)
        repeatable = first is not None
        budget = first or 0.0
        tried: set[Member] = set()
        error = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "etcd did not answer in time")
        while (remaining := deadline - loop.time()) > 0:
            if len(tried) == len(self.members):
                tried.clear()
                budget *= 2
            member = self.pick(tried)
            tried.add(member)
            seconds = min(budget, remaining) if repeatable else remaining
            try:
                with member.in_use():
                    reply = await unless_lost(member.lost, member.target, attempt(member, seconds))
                member.alive_at = loop.time()
                return reply
            except grpc.aio.AioRpcError as failure:
                self.failed(member)
                if not retryable(failure, repeatable):
                    raise
                if not _timed_out(failure) or _timed_out(error):
                    error = failure  # a deadline says less than, say, a failed TLS handshake
        raise error

    async def stream(
        self, stub_class: type, method: str, requests: Any, kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """A stream (a watch) on the current member, ended with UNAVAILABLE if it is lost."""
        loop = asyncio.get_running_loop()
        member = self.pick(set())
        call = getattr(member.stub(stub_class), method)(requests, **kwargs)
        try:
            with member.in_use():
                while True:
                    response = await unless_lost(member.lost, member.target, call.read())
                    if response is grpc.aio.EOF:
                        return
                    member.alive_at = loop.time()
                    yield response
        except grpc.aio.AioRpcError:
            self.failed(member)
            raise
        finally:
            call.cancel()


class FailoverStub:
    """A gRPC stub of one etcd service whose methods run on `members` as described above."""

    def __init__(self, members: Members, stub_class: type) -> None:
        self._members = members
        self._stub_class = stub_class

    def __getattr__(self, method: str) -> Callable[..., Any]:
        members, stub_class = self._members, self._stub_class
        if method == "Watch":
            return lambda requests, **kwargs: members.stream(stub_class, method, requests, kwargs)
        if method == "LeaseKeepAlive":
            return lambda requests, **kwargs: _keep_alive(members, list(requests), kwargs)

        def call(request: Any, timeout: float | None = None, **kwargs: Any) -> Awaitable[Any]:
            def attempt(member: Member, seconds: float) -> Awaitable[Any]:
                rpc = getattr(member.stub(stub_class), method)
                return rpc(request, timeout=seconds, **kwargs)  # type: ignore[no-any-return]

            return members.unary(first_attempt(method, request), timeout, attempt)

        return call


async def _keep_alive(
    members: Members, requests: list[Any], kwargs: dict[str, Any]
) -> AsyncIterator[Any]:
    """A lease keep-alive as aetcd sends it (a short stream of given requests), on a live member."""
    timeout = kwargs.pop("timeout", None)

    async def attempt(member: Member, seconds: float) -> list[Any]:
        call = member.stub(aetcd.rpc.LeaseStub).LeaseKeepAlive(
            iter(requests), timeout=seconds, **kwargs
        )
        return [reply async for reply in call]

    for reply in await members.unary(ATTEMPT_TIMEOUT, timeout, attempt):
        yield reply
