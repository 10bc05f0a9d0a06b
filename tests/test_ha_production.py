"""The HA engine in production: the etcd Environment and the leader-only HA loop, on real parts.

A real etcd; agents' heartbeats are real leases on it (the tests hold and drop them as an agent
would); the fence devices are fence-agents' real `fence_dummy` run by the real `FenceRunner`;
the agent side runs against libvirt's `test://` driver (a private in-process host). The tests
play the agents' VM status reports. Engine timings are shortened; leader terms are long.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controller.cli import main
from controller.ha.agent_side import HaReporter, heartbeat_timing
from controller.ha.controller import build_manager
from controller.ha.environment import HaTimings, Place
from controller.ha.production import KINDS, EtcdEnvironment
from controller.migrations import Term
from controller.runtime.events import EventRecorder
from controller.runtime.heartbeat import heartbeat_key
from controller.runtime.informer import SharedInformers
from controller.runtime.leader import ElectionTiming, LeaderElector, current_leader, guard_compare
from controller.runtime.manager import Manager
from controller.runtime.store import Store
from crds import ClusterNode, Event, ObjectMeta, Secret, VirtualMachine
from crds.clusternode import ClusterNodeSpec
from crds.secret import SecretSpec
from crds.virtualmachine import VirtualMachineSpec
from e2e.harness.polling import eventually
from reconcilers.drivers.domain_xml import DomainSpec, build_domain_xml
from reconcilers.drivers.fence import FenceRunner
from reconcilers.drivers.fence_policy import DEFAULT_AGENTS, FencePolicy
from reconcilers.drivers.libvirt import LibvirtHost

T = TypeVar("T")

TIMINGS = HaTimings(
    lease_ttl=2.0,
    renew_interval=0.5,
    self_fence_margin=0.5,
    recovery_grace=1.0,
    watchdog_timeout=1.0,
    fence_retry_initial=0.5,
    fence_retry_max=2.0,
)
ELECTION = ElectionTiming.for_ttl(10)
"""No test here needs a leader's lease to expire (handovers are resigns, which take effect at
once), so the term is long: a stall of the loaded test machine must not move leadership."""
DEADLINE = 40.0
TEST_POLICY = FencePolicy(
    agents=DEFAULT_AGENTS | {"fence_dummy"},
    allowed_parameters=frozenset({("fence_dummy", "status_file")}),
)
"""The test controllers may run fence_dummy, and give it its status file."""
HOST_XML = """<node><cpu><mhz>2000</mhz><model>x86_64</model><active>4</active><nodes>1</nodes>
<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu><memory>8388608</memory></node>"""


Kvmctl = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def kvmctl_thread(
    etcd_endpoints: list[str],
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Kvmctl:
    """Run kvmctl against the test's etcd prefix in a thread (it runs its own event loop)."""
    monkeypatch.setenv("KVMCTL_ETCD", ",".join(etcd_endpoints))
    monkeypatch.setenv("KVMCTL_PREFIX", key_prefix)
    monkeypatch.setenv("KVMCTL_CONFIG", "")

    def run_main(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as exit_:
            return int(exit_.code or 0)

    async def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(run_main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


class Leases:
    """Heartbeat keys on real etcd leases, renewed as an agent does; `drop` revokes one."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._leases: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def hold(self, node: str) -> None:
        client = self.store.client
        lease = await client.lease(int(TIMINGS.lease_ttl))
        await client.put(heartbeat_key(self.store.prefix, node).encode(), b"{}", lease=lease.id)
        self._leases[node] = lease.id
        self._tasks[node] = asyncio.create_task(self._renew(lease.id))

    async def _renew(self, lease_id: int) -> None:
        while True:
            await asyncio.sleep(TIMINGS.renew_interval)
            await self.store.client.refresh_lease(lease_id)

    async def drop(self, node: str) -> None:
        task = self._tasks.pop(node)
        task.cancel()
        await asyncio.wait({task})
        await self.store.client.revoke_lease(self._leases.pop(node))

    async def close(self) -> None:
        for node in list(self._tasks):
            with contextlib.suppress(Exception):
                await self.drop(node)


@pytest.fixture
async def store(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Store]:
    async with Store(etcd_endpoints, key_prefix) as connected:
        yield connected


@pytest.fixture
async def leases(store: Store) -> AsyncIterator[Leases]:
    held = Leases(store)
    yield held
    await held.close()


async def start_controller(
    etcd_endpoints: list[str], key_prefix: str, identity: str
) -> tuple[Manager, asyncio.Task[None]]:
    store = Store(etcd_endpoints, key_prefix)
    await store.connect()
    manager = build_manager(
        store,
        identity=identity,
        timings=TIMINGS,
        election_timing=ELECTION,
        http_port=None,
        fence_runner=FenceRunner(policy=TEST_POLICY),
    )
    task = asyncio.create_task(manager.run(handle_signals=False))
    return manager, task


async def stop_controller(manager: Manager, task: asyncio.Task[None]) -> None:
    manager.stop()
    async with asyncio.timeout(30):
        await task  # re-raises a failure of the manager


@pytest.fixture
async def controller(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Manager]:
    manager, task = await start_controller(etcd_endpoints, key_prefix, "ctl-1")
    try:
        yield manager
    finally:
        await stop_controller(manager, task)


def node_object(name: str, fencing: dict[str, Any] | None = None) -> ClusterNode:
    spec: dict[str, Any] = {"addresses": {"cluster": "127.0.0.1"}}
    if fencing is not None:
        spec["fencing"] = fencing
    return ClusterNode(metadata=ObjectMeta(name=name), spec=ClusterNodeSpec.model_validate(spec))


def vm_object(name: str, **spec: Any) -> VirtualMachine:
    document = {
        "memoryMiB": 64,
        "failoverDomain": {"ordered": True, "nodes": [{"name": "a"}, {"name": "b", "priority": 2}]},
        **spec,
    }
    return VirtualMachine(
        metadata=ObjectMeta(name=name), spec=VirtualMachineSpec.model_validate(document)
    )


def dummy_fencing(**parameters: Any) -> dict[str, Any]:
    device: dict[str, Any] = {"agent": "fence_dummy", "timeoutSeconds": 20}
    device.update(parameters)
    return {"methods": [{"name": "dummy", "devices": [device]}]}


async def get_vm(store: Store, name: str) -> VirtualMachine:
    vm = await store.get("VirtualMachine", name)
    assert isinstance(vm, VirtualMachine)
    return vm


async def get_node(store: Store, name: str) -> ClusterNode:
    node = await store.get("ClusterNode", name)
    assert isinstance(node, ClusterNode)
    return node


async def placed_on(store: Store, vm: str, node: str) -> VirtualMachine | None:
    current = await get_vm(store, vm)
    placement = current.status.placement
    return current if placement is not None and placement.node == node else None


async def report_running(store: Store, vm: str, node: str) -> None:
    """What the agent of `node` writes once the VM's domain runs there."""

    def running(current: Any) -> bool:
        current.status.node = node
        current.status.state = "Running"
        return True

    await store.patch_status("VirtualMachine", vm, running)


async def events_of(store: Store, kind: str, name: str) -> list[Event]:
    events, _ = await store.list_objects("Event")
    return [
        e
        for e in events
        if isinstance(e, Event)
        and e.spec.involved_object.kind == kind
        and e.spec.involved_object.name == name
    ]


async def reasons(store: Store, kind: str, name: str) -> set[str]:
    return {e.spec.reason for e in await events_of(store, kind, name)}


async def recorded(store: Store, kind: str, name: str, expected: set[str]) -> bool:
    """Whether events with every reason in `expected` were recorded about `kind` `name`."""
    return expected <= await reasons(store, kind, name)


async def leader_token(store: Store) -> int:
    leader = await current_leader(store.client, f"{store.prefix}/leader/controller")
    assert leader is not None
    return leader.token


# The whole path: lease lost -> Unknown -> Fencing -> fence_dummy -> Fenced -> recovered -------


async def start_stale_domain(host: LibvirtHost, vm: str) -> None:
    """A kvmctl domain of `vm` left running on a host that was lost (or wrongly acked)."""
    stale = DomainSpec(
        name=vm,
        uuid=str(uuid.uuid4()),
        domain_type="qemu",
        vcpus=1,
        memory_mib=64,
        metadata={"vm": vm, "uid": "stale"},
    )
    await host.define(build_domain_xml(stale))
    await host.start(vm)


async def test_lost_node_is_power_fenced_and_its_vm_recovered_then_rejoins(
    store: Store, leases: Leases, controller: Manager, tmp_path: Path
) -> None:
    power = tmp_path / "a.power"
    power.write_text("on")
    secret = Secret(
        metadata=ObjectMeta(name="fence-a", labels={"kvmctl.io/node": "a"}),
        spec=SecretSpec(data={"file": str(power)}),
    )
    await store.create(secret)
    fencing = dummy_fencing(secretParameters={"status_file": {"name": "fence-a", "key": "file"}})
    await store.create(node_object("a", fencing))
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    await store.create(vm_object("vm1"))

    # Initial placement is the engine's: the VM goes to its preferred node.
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    assert (await get_node(store, "a")).status.health == "Online"
    await report_running(store, "vm1", "a")

    await leases.drop("a")
    recovered = await eventually(lambda: placed_on(store, "vm1", "b"), "vm1 recovered on b")

    node = await get_node(store, "a")
    assert node.status.health == "Fenced"
    assert node.status.fence is not None
    assert (node.status.fence.how, node.status.fence.method) == ("PowerOff", "dummy")
    assert power.read_text() == "off"
    assert recovered.status.placement is not None
    assert recovered.status.placement.token == await leader_token(store)
    # a's report was about the old placement: no agent may take it for its own (a VM placed
    # back on a later must be started there, not counted as a crash to restart in place).
    assert recovered.status.node is None

    # The engine records each event after the write it describes: wait for them.
    lost = {"NodeLost", "FencingStarted", "NodeFenced"}
    await eventually(lambda: recorded(store, "ClusterNode", "a", lost), "a's fencing events")
    moved = {"VMPlaced", "VMRelocating"}
    await eventually(lambda: recorded(store, "VirtualMachine", "vm1", moved), "vm1's events")
    for event in await events_of(store, "ClusterNode", "a"):
        assert str(power) not in event.spec.message, "a secret parameter leaked into an event"

    # The node comes back: it stays Fenced until its agent destroyed every stale domain.
    await leases.hold("a")
    assert (await get_node(store, "a")).status.health == "Fenced"
    host_xml = tmp_path / "host-a.xml"
    host_xml.write_text(HOST_XML)
    async with await LibvirtHost.connect(f"test://{host_xml}") as host:
        await start_stale_domain(host, "vm1")
        reporter = HaReporter(store, "a", TIMINGS)
        await reporter.step(await get_node(store, "a"), host, past_deadline=False)
        assert [d.name for d in await host.list_domains() if d.state.value == "running"] == []

    async def online() -> bool:
        return (await get_node(store, "a")).status.health == "Online"

    await eventually(online, "a back Online after its agent cleaned up")
    assert (await get_node(store, "a")).status.fence is None
    assert (await placed_on(store, "vm1", "b")) is not None


async def test_a_device_using_another_nodes_secret_is_flagged_and_never_run(
    store: Store, leases: Leases, controller: Manager, tmp_path: Path
) -> None:
    """The fence-device checker warns at once; at fence time the device is refused, unrun."""
    power = tmp_path / "a.power"
    power.write_text("on")
    secret = Secret(
        metadata=ObjectMeta(name="fence-b", labels={"kvmctl.io/node": "b"}),
        spec=SecretSpec(data={"file": str(power)}),
    )
    await store.create(secret)
    fencing = dummy_fencing(secretParameters={"status_file": {"name": "fence-b", "key": "file"}})
    await store.create(node_object("a", fencing))
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")

    async def warned(reason: str) -> list[str]:
        return [
            e.spec.message
            for e in await events_of(store, "ClusterNode", "a")
            if e.spec.reason == reason and "'fence-b' is not for fencing a" in e.spec.message
        ]

    (early,) = await eventually(lambda: warned("InvalidFenceDevice"), "an early warning")
    assert "kvmctl.io/node=a or kvmctl.io/usage=fencing" in early
    await store.create(vm_object("vm1"))
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    await report_running(store, "vm1", "a")
    await leases.drop("a")

    async def fencing_failed() -> bool:
        # FencingFailed events of one template aggregate: the message is the latest one, which
        # may be the engine's "all methods failed" between two refusals of the device.
        return "FencingFailed" in await reasons(store, "ClusterNode", "a")

    await eventually(fencing_failed, "fencing refused")
    assert power.read_text() == "on", "the device ran"
    assert (await get_node(store, "a")).status.health == "Fencing"
    assert await placed_on(store, "vm1", "a") is not None


async def test_failing_fence_device_blocks_recovery_until_fence_ack(
    store: Store, leases: Leases, controller: Manager, kvmctl_thread: Kvmctl, tmp_path: Path
) -> None:
    await store.create(
        node_object("a", dummy_fencing(parameters={"type": "fail", "power_timeout": "1"}))
    )
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    await store.create(vm_object("vm1"))
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    await report_running(store, "vm1", "a")
    await leases.drop("a")

    async def retried() -> bool:
        events = {e.spec.reason: e.spec.count for e in await events_of(store, "ClusterNode", "a")}
        return events.get("FencingStarted", 0) >= 2 and "FencingFailed" in events

    await eventually(retried, "fencing of a to fail and be retried")
    assert (await get_node(store, "a")).status.health == "Fencing"
    assert await placed_on(store, "vm1", "a") is not None, "recovered without fencing"

    code, out, err = await kvmctl_thread("fence", "ack", "a")
    assert code == 0, err
    assert "fence acknowledged" in out
    await eventually(lambda: placed_on(store, "vm1", "b"), "vm1 recovered on b after the ack")
    node = await get_node(store, "a")
    assert node.status.health == "Fenced"
    assert node.status.fence is not None and node.status.fence.how == "ManualAck"
    key = f"{store.prefix}/requests/fence-ack/a".encode()
    assert await store.client.get(key) is None, "the ack was not consumed"

    # The ack was wrong: a only lost its lease and still runs vm1. Its agent, back, destroys it
    # and says so on the node and on the VM.
    await leases.hold("a")
    host_xml = tmp_path / "host-a.xml"
    host_xml.write_text(HOST_XML)
    async with await LibvirtHost.connect(f"test://{host_xml}") as host:
        await start_stale_domain(host, "vm1")
        reporter = HaReporter(store, "a", TIMINGS, EventRecorder(store, "kvmctl-agent", "a"))
        await reporter.step(await get_node(store, "a"), host, past_deadline=False)
        assert [d.name for d in await host.list_domains() if d.state.value == "running"] == []
    wrong_ack = {"AckedNodeWasRunning"}
    assert await recorded(store, "ClusterNode", "a", wrong_ack)
    assert await recorded(store, "VirtualMachine", "vm1", wrong_ack)
    (warning,) = [
        e for e in await events_of(store, "ClusterNode", "a") if e.spec.reason in wrong_ack
    ]
    assert warning.spec.type == "Warning"
    assert "acknowledged as off but found running vm1: destroyed" in warning.spec.message


# Leadership: a deposed leader's writes fail ---------------------------------------------------


async def test_a_new_leader_restamps_placements_of_older_terms(
    store: Store, leases: Leases
) -> None:
    await store.create(node_object("a"))
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    await store.create(vm_object("vm1"))
    manager, task = await start_controller(store.endpoints, store.prefix, "ctl-1")
    try:
        await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
        await report_running(store, "vm1", "a")
        old_term = await leader_token(store)
    finally:
        await stop_controller(manager, task)
    manager, task = await start_controller(store.endpoints, store.prefix, "ctl-2")
    try:

        async def restamped() -> bool:
            leader = await current_leader(store.client, f"{store.prefix}/leader/controller")
            placement = (await get_vm(store, "vm1")).status.placement
            if leader is None or placement is None:
                return False
            return placement.token == leader.token

        await eventually(restamped, "vm1's placement stamped with the new term")
        assert await leader_token(store) != old_term
        assert (await placed_on(store, "vm1", "a")) is not None, "kept where it runs"
    finally:
        await stop_controller(manager, task)


async def test_deposed_leader_placement_write_fails(store: Store, leases: Leases) -> None:
    await store.create(node_object("a"))
    await leases.hold("a")
    await store.create(vm_object("vm1"))
    terms: list[int] = []

    async def lead_once(token: int) -> None:
        terms.append(token)
        await asyncio.Event().wait()

    first = LeaderElector(store.client, store.prefix, "controller", "old", ELECTION)
    first_run = asyncio.create_task(first.run(lead_once))
    await eventually(lambda: bool(terms), "the first leader")
    old_token = terms[0]
    first_run.cancel()  # resigns
    await asyncio.wait({first_run})
    second = LeaderElector(store.client, store.prefix, "controller", "new", ELECTION)
    second_run = asyncio.create_task(second.run(lead_once))
    try:
        await eventually(lambda: len(terms) == 2, "the second leader")
        informers = SharedInformers(store, None)
        for kind in KINDS:
            informers.informer(kind)
        informers.start()
        await informers.wait_for_sync()
        recorder = EventRecorder(store, "test")
        changed = asyncio.Event()
        key = f"{store.prefix}/leader/controller"
        for token, expect_deposed in ((old_token, True), (terms[1], False)):
            term = Term(token, [guard_compare(store.client, key, token)])
            env = EtcdEnvironment(store, informers, recorder, term, changed, TIMINGS)
            async with env:
                world = await env.observe()
                assert world.nodes["a"].lease_alive
                await env.apply(Place("vm1", "a"))
                assert env.deposed is expect_deposed
                assert await env.wait(env.now() + 0.1) is not expect_deposed
            vm = await get_vm(store, "vm1")
            if expect_deposed:
                assert vm.status.placement is None, "a deposed leader's placement was written"
            else:
                assert vm.status.placement is not None
                assert vm.status.placement.token == terms[1]
        await informers.stop()
    finally:
        second_run.cancel()
        await asyncio.wait({second_run})


async def test_controllers_elect_one_leader_and_the_next_takes_over(
    etcd_endpoints: list[str], key_prefix: str, store: Store, leases: Leases
) -> None:
    await store.create(node_object("a"))
    await store.create(node_object("b"))
    await leases.hold("a")
    await leases.hold("b")
    first, first_task = await start_controller(etcd_endpoints, key_prefix, "ctl-1")
    second, second_task = await start_controller(etcd_endpoints, key_prefix, "ctl-2")
    try:
        await store.create(vm_object("vm1"))
        placed = await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed")
        leader = await current_leader(store.client, f"{key_prefix}/leader/controller")
        assert leader is not None and placed.status.placement is not None
        assert placed.status.placement.token == leader.token
        assert first.is_leader != second.is_leader
        stopping, stopping_task = (first, first_task) if first.is_leader else (second, second_task)
        survivor = second if stopping is first else first
        await stop_controller(stopping, stopping_task)
        await eventually(lambda: survivor.is_leader, "the other to lead")
        await store.create(vm_object("vm2"))
        vm2 = await eventually(lambda: placed_on(store, "vm2", "a"), "vm2 placed by the new leader")
        assert vm2.status.placement is not None
        assert vm2.status.placement.token > placed.status.placement.token
    finally:
        for manager, task in ((first, first_task), (second, second_task)):
            if not task.done():
                await stop_controller(manager, task)


def test_heartbeat_timing_matches_the_engine() -> None:
    timing = heartbeat_timing(HaTimings())
    assert (timing.ttl, timing.renew_interval, timing.self_fence_margin) == (2, 0.5, 0.5)
    with pytest.raises(ValueError, match="whole number"):
        heartbeat_timing(HaTimings(lease_ttl=2.5))
