"""sd_notify and the service watchdog, received on a real datagram socket as systemd would.

The daemons (`kvmctl agent` on test:///default and a real etcd, `kvmctl controller`, `kvmctl
dashboard`) run as processes with `$NOTIFY_SOCKET` pointing at the test's socket; the watchdog's
dependence on the event loop is shown with tests/systemd_child.py, whose loop the test blocks
with a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from controller.runtime import layout_keys
from controller.runtime.store import Store
from controller.runtime.systemd import Notifier, Service, watchdog_interval
from crds import ClusterNode, ObjectMeta
from crds.clusternode import ClusterNodeSpec, NodeAddresses

CHILD = Path(__file__).with_name("systemd_child.py")
DEADLINE = 60.0
WATCHDOG_USEC = 200_000  # pings every 0.1 s


class Listener:
    """The systemd side: a bound datagram socket collecting notifications."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    async def next(self, timeout: float = DEADLINE) -> str:
        async with asyncio.timeout(timeout):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        return data.decode()

    async def until(self, assignment: str, timeout: float = DEADLINE) -> list[str]:
        """Every message up to and including the first holding `assignment`."""
        seen: list[str] = []
        async with asyncio.timeout(timeout):
            while assignment not in (seen[-1].split("\n") if seen else []):
                seen.append(await self.next())
        return seen

    def drain(self) -> list[str]:
        drained = []
        with contextlib.suppress(BlockingIOError):
            while True:
                drained.append(self.sock.recv(4096).decode())
        return drained


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    sock = Listener(str(tmp_path / "notify"))
    yield sock
    sock.sock.close()


def _env(listener: Listener) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_PID")}
    env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC=str(WATCHDOG_USEC))
    return env


@contextlib.asynccontextmanager
async def _process(*argv: str, env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()


async def test_abstract_namespace_socket() -> None:
    name = f"@kvmctl-test-{uuid.uuid4().hex}"
    listener = Listener(name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": name})
        notifier.notify("READY=1", "STATUS=up")
        assert await listener.next() == "READY=1\nSTATUS=up"
        notifier.close()
    finally:
        listener.sock.close()


def test_no_socket_no_watchdog_means_silence() -> None:
    assert not Notifier({}).enabled
    Notifier({}).notify("READY=1")  # nothing to send to: no error
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})


async def test_ready_when_waits_for_its_condition(listener: Listener) -> None:
    condition = asyncio.Event()
    async with Service({"NOTIFY_SOCKET": listener.address}) as service:
        service.ready_when(condition.wait(), "synced")
        await asyncio.sleep(0)
        assert listener.drain() == []  # no watchdog asked, nothing ready yet
        condition.set()
        assert await listener.next() == "READY=1\nSTATUS=synced"
    assert await listener.next() == "STOPPING=1"


async def test_watchdog_pings_stop_while_the_event_loop_is_blocked(
    listener: Listener, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    env = _env(listener)
    async with _process(sys.executable, str(CHILD), str(release), env=env) as child:
        assert child.stdout is not None
        assert await child.stdout.readline() == b"running\n"
        seen = await listener.until("READY=1")
        for _ in range(3):  # pings keep coming while the loop turns
            seen.append(await listener.next())
        assert seen.count("WATCHDOG=1") >= 3

        os.kill(child.pid, signal.SIGUSR1)
        async with asyncio.timeout(DEADLINE):
            assert await child.stdout.readline() == b"blocked\n"
        listener.drain()  # pings sent before the loop blocked
        with pytest.raises(TimeoutError):  # ten intervals: none while blocked
            await listener.next(timeout=10 * WATCHDOG_USEC / 2e6)

        release.touch()
        async with asyncio.timeout(DEADLINE):
            assert await child.stdout.readline() == b"unblocked\n"
        assert "WATCHDOG=1" in await listener.next()

        os.kill(child.pid, signal.SIGTERM)
        await listener.until("STOPPING=1")
        async with asyncio.timeout(DEADLINE):
            assert await child.wait() == 0


def _kvmctl(etcd_endpoints: list[str], prefix: str, *argv: str) -> list[str]:
    etcd = ",".join(etcd_endpoints)
    return [sys.executable, "-m", "controller.cli", "--etcd", etcd, "--prefix", prefix, *argv]


async def test_agent_is_ready_once_it_holds_its_heartbeat_lease(
    listener: Listener, etcd_endpoints: list[str], key_prefix: str
) -> None:
    argv = _kvmctl(
        etcd_endpoints, key_prefix, "agent", "--node", "n1", "--libvirt-uri", "test:///default",
        "--no-storage", "--peer-port", "0", "--lease-ttl", "2", "--renew-interval", "0.5",
        "--self-fence-margin", "0.5",
    )  # fmt: skip
    async with (
        Store(etcd_endpoints, prefix=key_prefix) as store,
        _process(*argv, env=_env(listener)) as agent,
    ):
        # Without its ClusterNode the agent waits: alive (pings) but not ready.
        seen = [await listener.next() for _ in range(5)]
        assert set(seen) == {"WATCHDOG=1"}, seen
        key = layout_keys.absolute(key_prefix, layout_keys.heartbeat("n1")).encode()
        assert (await store.client.get(key)) is None

        node = ClusterNode(
            metadata=ObjectMeta(name="n1"),
            spec=ClusterNodeSpec(addresses=NodeAddresses(cluster=ip_address("127.0.0.1"))),
        )
        await store.create(node)
        seen = await listener.until("READY=1")
        assert "STATUS=heartbeat lease of n1 held" in seen[-1]
        assert (await store.client.get(key)) is not None

        os.kill(agent.pid, signal.SIGTERM)
        await listener.until("STOPPING=1")
        async with asyncio.timeout(DEADLINE):
            assert await agent.wait() == 0


async def test_controller_is_ready_once_its_caches_synced(
    listener: Listener, etcd_endpoints: list[str], key_prefix: str
) -> None:
    argv = _kvmctl(etcd_endpoints, key_prefix, "controller", "--metrics-port", "0")
    async with _process(*argv, env=_env(listener)) as controller:
        seen = await listener.until("READY=1")
        assert "STATUS=caches synced" in seen[-1]
        assert "WATCHDOG=1" in await listener.until("WATCHDOG=1")
        os.kill(controller.pid, signal.SIGTERM)
        await listener.until("STOPPING=1")
        async with asyncio.timeout(DEADLINE):
            assert await controller.wait() == 0


async def test_dashboard_is_ready_once_it_serves(
    listener: Listener, etcd_endpoints: list[str], key_prefix: str
) -> None:
    argv = _kvmctl(etcd_endpoints, key_prefix, "dashboard", "--port", "0")
    env = {**_env(listener), "KVMCTL_CONFIG": ""}
    async with _process(*argv, env=env) as dashboard:
        assert dashboard.stdout is not None
        async with asyncio.timeout(DEADLINE):
            url = (await dashboard.stdout.readline()).decode().split(" ", 1)[1].strip()
        seen = await listener.until("READY=1")
        assert f"STATUS=serving {url}" in seen[-1]
        assert "WATCHDOG=1" in await listener.until("WATCHDOG=1")
        os.kill(dashboard.pid, signal.SIGTERM)
        await listener.until("STOPPING=1")
        async with asyncio.timeout(DEADLINE):
            assert await dashboard.wait() == 0
