"""Detection on silence and standby takeover, on real parts: a real etcd, real UDP datagrams on
loopback (`controller/runtime/peers.py`), fence_dummy run by the real FenceRunner, the real
controllers.

Heartbeat leases are held (renewed) throughout, as if etcd had just extended them: whatever is
fenced here was detected by its silence, not by a lease expiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.ha.controller import build_manager
from controller.ha.environment import break_gap
from controller.runtime import layout_keys
from controller.runtime.leader_record import current_leader
from controller.runtime.manager import Manager
from controller.runtime.peers import PeerSender, PeerSettings, PeerTable
from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, Secret
from crds.clusternode import ClusterNodeSpec
from crds.secret import SecretSpec
from e2e.harness.polling import eventually
from reconcilers.drivers.fence import FenceRunner
from tests.support.ha import (
    ELECTION,
    TEST_POLICY,
    TIMINGS,
    Leases,
    dummy_fencing,
    events_of,
    get_node,
    placed_on,
    report_running,
    stop_controller,
    vm_object,
)
from tests.support.tcp_cut import TcpCut

ROOT = Path(__file__).resolve().parent.parent
ADDRESSES = {"a": "127.0.0.2", "b": "127.0.0.1", "c": "127.0.0.3"}
KEY = "leader/controller"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Agents:
    """Direct heartbeats as each node's agent sends them; `stop` silences one."""

    def __init__(self, settings: PeerSettings) -> None:
        self.settings = settings
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.heard = PeerTable(ADDRESSES.get, break_gap(TIMINGS.suspect_after))
        """What the controller under test hears."""

    def start(self, node: str) -> None:
        sender = PeerSender(
            node, "agent", f"boot-{node}", ADDRESSES[node], ADDRESSES.values, self.settings
        )
        self.tasks[node] = asyncio.create_task(sender.run())

    async def stop(self, node: str) -> None:
        task = self.tasks.pop(node)
        task.cancel()
        await asyncio.wait({task})

    async def close(self) -> None:
        for node in list(self.tasks):
            await self.stop(node)


@pytest.fixture
async def agents() -> AsyncIterator[Agents]:
    running = Agents(PeerSettings(port=free_udp_port(), interval=0.1))
    yield running
    await running.close()


async def create_cluster(
    store: Store, leases: Leases, agents: Agents, power: Path | None, *, in_spec: bool = False
) -> None:
    """Nodes a (fence_dummy on `power`, which says on; None: a self-fences instead), b and c;
    leases held and heartbeats sent by all. The power file's path is in a Secret, or with
    `in_spec` in the device's parameters (so fencing a needs no etcd read)."""
    fencing: dict[str, Any] = {"selfFence": True}
    if power is not None and in_spec:
        fencing = dummy_fencing(parameters={"status_file": str(power)})
    elif power is not None:
        labels = {"kvmctl.io/node": "a"}
        secret = Secret(
            metadata=ObjectMeta(name="fence-a", labels=labels),
            spec=SecretSpec(data={"file": str(power)}),
        )
        await store.create(secret)
        parameters = {"status_file": {"name": "fence-a", "key": "file"}}
        fencing = dummy_fencing(secretParameters=parameters)
    for name in ("a", "b", "c"):
        spec: dict[str, Any] = {"addresses": {"cluster": ADDRESSES[name]}}
        if name == "a":
            spec["fencing"] = fencing
        node = ClusterNode(
            metadata=ObjectMeta(name=name), spec=ClusterNodeSpec.model_validate(spec)
        )
        await store.create(node)
        await leases.hold(name)
        agents.start(name)


async def start_controller(
    store_endpoints: list[str], key_prefix: str, node: str, agents: Agents
) -> tuple[Manager, asyncio.Task[None]]:
    store = Store(store_endpoints, key_prefix)
    await store.connect()
    agents.heard = PeerTable(ADDRESSES.get, break_gap(TIMINGS.suspect_after))
    manager = build_manager(
        store,
        identity=f"ctl-{node}",
        timings=TIMINGS,
        election_timing=ELECTION,
        http_port=None,
        node=node,
        peers=agents.settings,
        peer_table=agents.heard,
        fence_runner=FenceRunner(policy=TEST_POLICY),
    )
    return manager, asyncio.create_task(manager.run(handle_signals=False))


async def fenced_by(store: Store, node: str, how: str) -> ClusterNode | None:
    current = await get_node(store, node)
    fence = current.status.fence
    ok = current.status.health == "Fenced" and fence is not None and fence.how == how
    return current if ok else None


async def fenced_by_power(store: Store, node: str) -> ClusterNode | None:
    return await fenced_by(store, node, "PowerOff")


async def test_silence_starts_power_fencing_while_the_lease_is_still_held(
    etcd_endpoints: list[str], key_prefix: str, store: Store, leases: Leases, agents: Agents,
    tmp_path: Path,
) -> None:  # fmt: skip
    power = tmp_path / "a.power"
    power.write_text("on")
    await create_cluster(store, leases, agents, power)
    manager, task = await start_controller(etcd_endpoints, key_prefix, "b", agents)
    try:
        await store.create(vm_object("vm1"))
        await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
        await report_running(store, "vm1", "a")
        await eventually(lambda: manager.is_leader, "the controller leads")
        await eventually(lambda: agents.heard.heard_at("a"), "a's agent heard")

        await agents.stop("a")  # a's agent falls silent; its lease keeps being renewed
        await eventually(lambda: fenced_by_power(store, "a"), "a fenced on silence")
        await eventually(lambda: placed_on(store, "vm1", "b"), "vm1 recovered on b")
        assert power.read_text() == "off"
        assert await store.client.get(store.raw_key(layout_keys.heartbeat("a"))) is not None
        lost = [
            e for e in await events_of(store, "ClusterNode", "a") if e.spec.reason == "NodeLost"
        ]
        assert lost and "no direct heartbeat" in lost[0].spec.message
    finally:
        await stop_controller(manager, task)


async def start_leader_process(
    etcd_endpoints: list[str], key_prefix: str, port: int
) -> asyncio.subprocess.Process:
    """`kvmctl controller --node a` in its own process, so that it can die like its host."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KVMCTL_ETCD": ",".join(etcd_endpoints),
        "KVMCTL_PREFIX": key_prefix,
        "KVMCTL_CONFIG": "",
    }
    timings = [
        f"--{flag}={value}"
        for flag, value in (
            ("lease-ttl", TIMINGS.lease_ttl),
            ("renew-interval", TIMINGS.renew_interval),
            ("self-fence-margin", TIMINGS.self_fence_margin),
            ("recovery-grace", TIMINGS.recovery_grace),
            ("watchdog-timeout", TIMINGS.watchdog_timeout),
            ("fence-retry-initial", TIMINGS.fence_retry_initial),
            ("fence-retry-max", TIMINGS.fence_retry_max),
        )
    ]
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli", "controller", "--identity", "ctl-a",
        "--node", "a", "--peer-port", str(port), "--peer-interval", "0.1",
        "--election-ttl", "60", "--metrics-port", "0", *timings,
        "--fence-agents", "default,fence_dummy",
        "--fence-allow-parameter", "fence_dummy:status_file",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def leader_on_a(
    etcd_endpoints: list[str], key_prefix: str, store: Store, agents: Agents
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """The controller on a, in its own process, leading: yields it and its term's token;
    killed at the end if it still runs."""
    leader = await start_leader_process(etcd_endpoints, key_prefix, agents.settings.port)
    try:

        async def leading_on_a() -> int | None:
            info = await current_leader(store.client, f"{key_prefix}/{KEY}")
            return info.token if info is not None and info.node == "a" else None

        yield leader, await eventually(leading_on_a, "the controller on a leads")
    finally:
        if leader.returncode is None:
            leader.kill()
            await leader.wait()


@contextlib.asynccontextmanager
async def standby_on_b(
    store_endpoints: list[str], key_prefix: str, agents: Agents
) -> AsyncIterator[Manager]:
    """A standby controller on b (in this process), hearing what `agents.heard` hears."""
    manager, task = await start_controller(store_endpoints, key_prefix, "b", agents)
    try:
        yield manager
    finally:
        await stop_controller(manager, task)


async def power_cut_of_a(leader: asyncio.subprocess.Process, agents: Agents) -> None:
    """Host a loses power: its controller and its agent fall silent at once."""
    leader.kill()
    await leader.wait()
    await agents.stop("a")


@contextlib.asynccontextmanager
async def leader_on_a_lost(
    etcd_endpoints: list[str], key_prefix: str, store: Store, agents: Agents
) -> AsyncIterator[tuple[Manager, int]]:
    """The controller on a leads and vm1 runs on a; a standby runs on b; then host a loses
    power and the standby takes over. Yields the standby's manager and the ended term's token."""
    async with leader_on_a(etcd_endpoints, key_prefix, store, agents) as (leader, old_token):
        await store.create(vm_object("vm1"))
        await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
        await report_running(store, "vm1", "a")
        async with standby_on_b(etcd_endpoints, key_prefix, agents) as manager:
            await eventually(lambda: agents.heard.heard_at("a"), "the standby hears host a")
            await power_cut_of_a(leader, agents)
            await eventually(lambda: manager.is_leader, "the standby leads")
            assert manager.elector is not None and manager.elector.took_over == old_token
            yield manager, old_token


async def test_a_standby_fences_the_silent_leaders_host_and_takes_over_before_the_ttl(
    etcd_endpoints: list[str], key_prefix: str, store: Store, leases: Leases, agents: Agents,
    tmp_path: Path,
) -> None:  # fmt: skip
    power = tmp_path / "a.power"
    power.write_text("on")
    await create_cluster(store, leases, agents, power)
    async with leader_on_a_lost(etcd_endpoints, key_prefix, store, agents) as (_, old_token):
        node = await eventually(lambda: fenced_by_power(store, "a"), "a recorded fenced")
        info = await current_leader(store.client, f"{key_prefix}/{KEY}")
        assert info is not None and info.node == "b" and info.token > old_token
        assert node.status.fence is not None and node.status.fence.token == info.token
        assert power.read_text() == "off"
        await eventually(lambda: placed_on(store, "vm1", "b"), "vm1 recovered on b")
        fenced = [
            e for e in await events_of(store, "ClusterNode", "a") if e.spec.reason == "NodeFenced"
        ]
        assert any("by the standby that took over" in e.spec.message for e in fenced)


async def test_a_standby_takes_over_from_a_self_fencing_leaders_host_without_fencing_it(
    etcd_endpoints: list[str], key_prefix: str, store: Store, leases: Leases, agents: Agents
) -> None:
    """No power fencing on the leader's host: the standby ends the silent term at once (the
    leader's election TTL is 60 s here), fences nothing, and the host's VMs wait for its lease
    to expire (plus grace) before they move."""
    await create_cluster(store, leases, agents, None)
    async with leader_on_a_lost(etcd_endpoints, key_prefix, store, agents):
        # a's heartbeat lease is still held (as if etcd had just extended it): nothing moves.
        assert await placed_on(store, "vm1", "a")
        assert (await get_node(store, "a")).status.health != "Fenced"

        await leases.drop("a")  # the lease ends: a's agent has destroyed its VMs by now
        node = await eventually(
            lambda: fenced_by(store, "a", "SelfFence"), "a recorded fenced by its self-fence"
        )
        assert node.status.fence is not None
        await eventually(lambda: placed_on(store, "vm1", "b"), "vm1 recovered on b")


async def test_a_standby_cut_off_from_etcd_fences_nothing_until_the_quorum_confirms(
    etcd_endpoints: list[str], key_prefix: str, store: Store, leases: Leases, agents: Agents,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The standby on b hears a fall silent (b and c witness it) but its etcd connection is cut:
    it must not fence a, which would power off a host it cannot take over from. Once etcd is
    reachable again, etcd's quorum confirms the silent term and the standby fences and leads."""
    power = tmp_path / "a.power"
    power.write_text("on")
    caplog.set_level(logging.INFO, logger="controller.ha.takeover")

    def logged(text: str) -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    await create_cluster(store, leases, agents, power, in_spec=True)
    async with (
        TcpCut(etcd_endpoints[0]) as relay,
        leader_on_a(etcd_endpoints, key_prefix, store, agents) as (leader, old_token),
        standby_on_b([relay.endpoint], key_prefix, agents) as manager,
    ):
        await eventually(lambda: agents.heard.heard_at("a"), "the standby hears host a")
        await eventually(manager.started.is_set, "the standby's caches are synced")
        watching = f"watching the leader on a (term {old_token})"
        await eventually(lambda: logged(watching), "the standby knows the leader's term")

        relay.cut()
        await power_cut_of_a(leader, agents)

        refused = "quorum is not reachable"
        await eventually(lambda: logged(refused), "the standby refuses to fence without a quorum")
        assert power.read_text() == "on"

        relay.restore()
        await eventually(lambda: fenced_by_power(store, "a"), "a fenced once etcd is back")
        assert power.read_text() == "off"
        await eventually(lambda: manager.is_leader, "the standby leads")
        assert manager.elector is not None and manager.elector.took_over == old_token
