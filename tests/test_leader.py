"""Leader election against a real etcd: one leader at a time, failover, fencing, resignation.

Candidates run in this process, or in a child process (tests/leader_child.py) when the test
must SIGKILL or SIGSTOP the leader's whole process. Waits poll conditions with generous
deadlines; failover times are measured and printed, never asserted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aetcd
import pytest

from controller.runtime import layout_keys
from controller.runtime.leader import LeaderElector, Leading
from controller.runtime.leader_record import (
    ElectionTiming,
    LeaderRecordError,
    current_leader,
    guard_compare,
)
from e2e.harness.etcd import EtcdCluster

FAST = ElectionTiming(ttl=2, renew_period=0.5, renew_deadline=1.5, retry_period=0.5)
DEADLINE = 30.0
CHILD = Path(__file__).with_name("leader_child.py")
ROOT = Path(__file__).resolve().parent.parent
NAME = "controller"

ClientFactory = Callable[[], aetcd.Client]


def client_for(endpoint: str) -> aetcd.Client:
    host, port = endpoint.rsplit(":", 1)
    return aetcd.Client(host=host, port=int(port))


@pytest.fixture
async def new_client(etcd_endpoints: list[str]) -> AsyncIterator[ClientFactory]:
    """A factory of etcd clients (one per candidate, as separate processes would have)."""
    clients: list[aetcd.Client] = []

    def make() -> aetcd.Client:
        clients.append(client_for(etcd_endpoints[0]))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


class Terms:
    """Leader-only work shared by all candidates of a test: records who leads, and overlaps."""

    def __init__(self) -> None:
        self.active: dict[int, str] = {}
        self.started: list[tuple[str, int]] = []
        self.stopped: list[int] = []
        self.overlaps: list[tuple[int, ...]] = []
        self._changed = asyncio.Event()

    def work_of(self, identity: str) -> Leading:
        async def leading(token: int) -> None:
            if self.active:
                self.overlaps.append((*self.active, token))
            self.active[token] = identity
            self.started.append((identity, token))
            self._changed.set()
            try:
                await asyncio.Event().wait()  # leader-only work runs until cancelled
            finally:
                del self.active[token]
                self.stopped.append(token)
                self._changed.set()

        return leading

    async def wait_until(self, condition: Callable[[], bool], deadline: float = DEADLINE) -> None:
        async with asyncio.timeout(deadline):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def leader(self) -> tuple[str, int] | None:
        return next(((identity, token) for token, identity in self.active.items()), None)


class Candidates:
    """Runs electors as tasks and stops every one of them at the end of the test."""

    def __init__(self, new_client: ClientFactory, prefix: str, terms: Terms) -> None:
        self.new_client = new_client
        self.prefix = prefix
        self.terms = terms
        self.running: dict[str, asyncio.Task[None]] = {}

    def start(self, identity: str, timing: ElectionTiming = FAST) -> LeaderElector:
        elector = LeaderElector(self.new_client(), self.prefix, NAME, identity, timing)
        self.running[identity] = asyncio.create_task(elector.run(self.terms.work_of(identity)))
        return elector

    async def stop(self, identity: str) -> None:
        task = self.running.pop(identity)
        task.cancel()
        await asyncio.wait({task})

    async def stop_all(self) -> None:
        for identity in list(self.running):
            await self.stop(identity)


@pytest.fixture
async def candidates(new_client: ClientFactory, key_prefix: str) -> AsyncIterator[Candidates]:
    running = Candidates(new_client, key_prefix, Terms())
    try:
        yield running
    finally:
        await running.stop_all()


class Child:
    """A candidate in its own process, stopped by its PID at the end of the test."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, endpoint: str, prefix: str, identity: str, timing: str = "fast") -> Child:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), endpoint, prefix, NAME, identity, timing,
            stdout=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode().strip())
            self._changed.set()
        self._changed.set()

    async def wait_for_line(self, prefix: str, deadline: float = DEADLINE) -> str:
        async with asyncio.timeout(deadline):
            while True:
                found = next((line for line in self.lines if line.startswith(prefix)), None)
                if found is not None:
                    return found
                if self.process.returncode is not None and self._reader.done():
                    raise AssertionError(f"child exited {self.process.returncode}: {self.lines}")
                self._changed.clear()
                await self._changed.wait()

    def signal(self, number: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(number)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()  # SIGKILL by PID; also ends a SIGSTOPped process
        await self.process.wait()
        await asyncio.wait({self._reader})


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            await child.kill()


# --- tests ------------------------------------------------------------------------------


async def test_exactly_one_of_three_leads_through_handovers(candidates: Candidates) -> None:
    terms = candidates.terms
    for identity in ["a", "b", "c"]:
        candidates.start(identity)
    tokens: list[int] = []
    for _ in range(4):
        await terms.wait_until(lambda: terms.leader() is not None)
        leader = terms.leader()
        assert leader is not None
        identity, token = leader
        info = await current_leader(
            candidates.new_client(),
            layout_keys.absolute(candidates.prefix, layout_keys.leader(NAME)),
        )
        assert info is not None
        assert (info.identity, info.token) == (identity, token)
        tokens.append(token)
        await candidates.stop(identity)  # resigns; one of the others takes over
        assert token in terms.stopped, "run() must stop leader-only work before it returns"
        candidates.start(identity)
    assert terms.overlaps == []
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


async def test_resign_hands_over_without_waiting_for_the_lease(candidates: Candidates) -> None:
    # Periods far longer than the test's deadline: only the watch on the key can explain a
    # takeover within it, neither the lease expiring nor the follower's periodic retry.
    slow = ElectionTiming(ttl=60, renew_period=1.0, renew_deadline=50.0, retry_period=55.0)
    terms = candidates.terms
    first = candidates.start("first", slow)
    await terms.wait_until(lambda: terms.leader() is not None)
    assert first.is_leader
    second = candidates.start("second", slow)
    leader = terms.leader()
    assert leader is not None
    loop = asyncio.get_running_loop()
    resigned_at = loop.time()
    await candidates.stop("first")
    assert not first.is_leader
    await terms.wait_until(lambda: terms.leader() is not None, deadline=20.0)
    new_leader = terms.leader()
    assert new_leader is not None
    assert new_leader[0] == "second" and second.is_leader
    assert new_leader[1] > leader[1]
    print(f"handover after resign: {loop.time() - resigned_at:.3f} s")


async def test_resign_while_running_steps_down_cleanly(
    candidates: Candidates, caplog: pytest.LogCaptureFixture
) -> None:
    slow = ElectionTiming(ttl=60, renew_period=1.0, renew_deadline=50.0, retry_period=55.0)
    terms = candidates.terms
    first = candidates.start("first", slow)
    await terms.wait_until(lambda: terms.leader() is not None)
    old_token = terms.started[-1][1]
    candidates.start("second", slow)
    with caplog.at_level(logging.WARNING, logger="controller.runtime.leader"):
        await first.resign()
        assert not first.is_leader
        await terms.wait_until(lambda: old_token in terms.stopped, deadline=20.0)
        await terms.wait_until(lambda: any(token > old_token for token in terms.active), 20.0)
    assert "did not complete" not in caplog.text
    assert terms.overlaps == []


@pytest.mark.parametrize("timing_name", ["fast", "default"])
async def test_sigkill_of_the_leader_process_elects_another(
    candidates: Candidates, children: list[Child], etcd_endpoints: list[str], timing_name: str
) -> None:
    timing = {"fast": FAST, "default": ElectionTiming()}[timing_name]  # as in leader_child.py
    child = await Child.start(etcd_endpoints[0], candidates.prefix, "child", timing_name)
    children.append(child)
    child_token = int((await child.wait_for_line("leading ")).split()[1])
    await child.wait_for_line("write ok")
    terms = candidates.terms
    candidates.start("survivor", timing)
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    child.signal(signal.SIGKILL)
    await terms.wait_until(lambda: terms.leader() is not None)
    elapsed = loop.time() - killed_at
    leader = terms.leader()
    assert leader is not None
    assert leader[0] == "survivor"
    assert leader[1] > child_token
    print(f"failover after SIGKILL: {elapsed:.3f} s (ttl {timing.ttl} s)")


async def test_a_paused_leader_cannot_write_after_a_takeover(
    candidates: Candidates,
    children: list[Child],
    etcd_endpoints: list[str],
    new_client: ClientFactory,
) -> None:
    child = await Child.start(etcd_endpoints[0], candidates.prefix, "paused")
    children.append(child)
    child_token = int((await child.wait_for_line("leading ")).split()[1])
    await child.wait_for_line("write ok")
    child.signal(signal.SIGSTOP)
    terms = candidates.terms
    candidates.start("taker")
    await terms.wait_until(lambda: terms.leader() is not None)
    leader = terms.leader()
    assert leader is not None
    taker_token = leader[1]
    assert taker_token > child_token

    client = new_client()
    key = layout_keys.absolute(candidates.prefix, layout_keys.leader(NAME))
    marker = f"{candidates.prefix}/fenced-writes".encode()
    written, _ = await client.transaction(
        compare=[guard_compare(client, key, taker_token)],
        success=[client.transactions.put(marker, b"taker")],
        failure=[],
    )
    assert written
    child.signal(signal.SIGCONT)
    await child.wait_for_line(f"stopped {child_token}")
    # Whatever the child tried after waking up, its token no longer matches the key.
    stored = await client.get(marker)
    assert stored is not None and stored.value == b"taker"
    assert f"write ok {taker_token}" not in child.lines


async def test_a_deposed_leaders_guarded_write_is_rejected(
    candidates: Candidates, new_client: ClientFactory
) -> None:
    terms = candidates.terms
    deposed = candidates.start("deposed")
    await terms.wait_until(lambda: terms.leader() is not None)
    old_token = terms.started[-1][1]
    candidates.start("other")
    admin = new_client()
    key = layout_keys.absolute(candidates.prefix, layout_keys.leader(NAME))
    held = await admin.get(key.encode())
    assert held is not None and held.create_revision == old_token
    await admin.revoke_lease(held.lease)  # as if the leader had been paused past its TTL

    await terms.wait_until(lambda: old_token in terms.stopped)  # leader-only work cancelled
    await terms.wait_until(lambda: any(token > old_token for token in terms.active))
    leader = terms.leader()
    assert leader is not None
    new_token = leader[1]
    assert deposed.is_leader == (leader[0] == "deposed")

    marker = f"{candidates.prefix}/placement".encode()
    old_written, _ = await admin.transaction(
        compare=[guard_compare(admin, key, old_token)],
        success=[admin.transactions.put(marker, b"from the deposed leader")],
        failure=[],
    )
    new_written, _ = await admin.transaction(
        compare=[guard_compare(admin, key, new_token)],
        success=[admin.transactions.put(marker, b"from the leader")],
        failure=[],
    )
    # No assertion on overlapping work here: the deposed leader learns of the revoke only at its
    # next renewal or watch event, while the other may already lead. The fencing token is what
    # makes that window harmless.
    assert (old_written, new_written) == (False, True)


async def test_work_stops_when_renewals_cannot_reach_etcd(
    etcd_private: EtcdCluster, key_prefix: str
) -> None:
    client = client_for(etcd_private.endpoints[0])
    terms = Terms()
    elector = LeaderElector(client, key_prefix, NAME, "cut-off", FAST)
    running = asyncio.create_task(elector.run(terms.work_of("cut-off")))
    etcd = etcd_private.members[0].process
    assert etcd is not None
    try:
        await terms.wait_until(lambda: terms.leader() is not None)
        first_token = terms.started[-1][1]
        etcd.send_signal(signal.SIGSTOP)  # etcd stops answering; nobody says the lease is gone
        await terms.wait_until(lambda: first_token in terms.stopped)
        assert not elector.is_leader
        etcd.send_signal(signal.SIGCONT)
        await terms.wait_until(lambda: any(token > first_token for token in terms.active))
    finally:
        etcd.send_signal(signal.SIGCONT)
        running.cancel()
        await asyncio.wait({running})
        await client.close()
    assert terms.overlaps == []


async def test_run_resigns_and_returns_when_the_work_ends(
    new_client: ClientFactory, key_prefix: str
) -> None:
    client = new_client()
    elector = LeaderElector(client, key_prefix, NAME, "short", FAST)
    tokens: list[int] = []

    async def leading(token: int) -> None:
        tokens.append(token)

    async def failing(token: int) -> None:
        raise RuntimeError("leader work failed")

    async with asyncio.timeout(DEADLINE):
        await elector.run(leading)
        assert await elector.current_leader() is None
        with pytest.raises(RuntimeError, match="leader work failed"):
            await elector.run(failing)
    assert await elector.current_leader() is None
    assert len(tokens) == 1 and not elector.is_leader


async def test_current_leader_reports_nobody_and_refuses_garbage(
    new_client: ClientFactory, key_prefix: str
) -> None:
    client = new_client()
    key = layout_keys.absolute(key_prefix, layout_keys.leader(NAME))
    assert await current_leader(client, key) is None
    await client.put(key.encode(), b"not json")
    with pytest.raises(LeaderRecordError, match=f"leader key {key} holds no valid leader record"):
        await current_leader(client, key)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 s"):
        ElectionTiming(ttl=1)
    with pytest.raises(ValueError, match="renew_period < renew_deadline < ttl"):
        ElectionTiming(ttl=5, renew_deadline=6)
    with pytest.raises(ValueError, match="without '/'"):
        layout_keys.absolute("/p", layout_keys.leader("a/b"))


def test_timing_for_any_ttl_keeps_the_default_proportions() -> None:
    for ttl in (2, 3, 4, 5, 10):
        timing = ElectionTiming.for_ttl(ttl)
        assert 0 < timing.renew_period < timing.renew_deadline < timing.ttl == ttl


async def test_take_over_ends_the_term_and_exactly_one_of_two_racing_standbys_wins(
    candidates: Candidates, new_client: ClientFactory
) -> None:
    terms = candidates.terms
    candidates.start("dead")
    await terms.wait_until(lambda: terms.leader() is not None)
    dead_token = terms.started[-1][1]
    first = candidates.start("standby-1")
    second = candidates.start("standby-2")
    assert not await first.take_over(dead_token - 1)  # a stale term: refused, nothing changes
    info = await first.current_leader()
    assert info is not None and info.token == dead_token

    won = await asyncio.gather(first.take_over(dead_token), second.take_over(dead_token))
    assert sorted(won) == [False, True]
    winner = first if won[0] else second
    await terms.wait_until(lambda: any(token > dead_token for token in terms.active))
    # The old term's work (this "dead" leader still runs) stops once it sees the key gone; until
    # then both are active, which only the guard on the token makes harmless.
    await terms.wait_until(lambda: dead_token in terms.stopped)
    leader = terms.leader()
    assert leader is not None and leader[0] == winner.identity
    assert winner.took_over == dead_token

    admin = new_client()
    key = layout_keys.absolute(candidates.prefix, layout_keys.leader(NAME))
    marker = f"{candidates.prefix}/placement".encode()
    old_written, _ = await admin.transaction(
        compare=[guard_compare(admin, key, dead_token)],
        success=[admin.transactions.put(marker, b"from the dead leader")],
        failure=[],
    )
    assert not old_written
    assert not await (second if won[0] else first).take_over(dead_token)  # that term is over
    assert await admin.get(f"{key}.takeover".encode()) is None  # the claim became the term


async def test_the_leader_record_names_the_node(new_client: ClientFactory, key_prefix: str) -> None:
    client = new_client()
    elector = LeaderElector(client, key_prefix, NAME, "on-host1", FAST, node="host1")
    seen: list[str | None] = []

    async def leading(token: int) -> None:
        info = await elector.current_leader()
        seen.append(None if info is None else info.node)

    async with asyncio.timeout(DEADLINE):
        await elector.run(leading)
    assert seen == ["host1"]
