"""The manager against a real etcd: every object reconciled, mapped watches, terminal errors,
convergence across an etcd restart, leader-only controllers, /healthz and /metrics, SIGTERM;
registrations: predicates, external sources, the setup/on_ready/teardown hooks, `Manager.term`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import io
import json
import logging
import os
import signal
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from ipaddress import ip_address

import prometheus_client
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.runtime import logs, telemetry
from controller.runtime.controller import Controller, Source, Watch
from controller.runtime.informer import KeySink, SharedInformers
from controller.runtime.leader_record import ElectionTiming, current_leader
from controller.runtime.manager import Manager
from controller.runtime.reconcile import Blocked, Result, RetryableError, TerminalError
from controller.runtime.store import Store, StoreError
from crds import AnyResource, ClusterNode, Event, ObjectMeta, VirtualMachine
from crds.clusternode import ClusterNodeSpec, NodeAddresses
from crds.meta import now
from crds.virtualmachine import Placement, VirtualMachineSpec
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually

DEADLINE = 30.0
STEADY = ElectionTiming.for_ttl(10)
"""Handovers here are resigns (immediate), so terms are long: a stall of the loaded test machine
must not move leadership between the tests' checks."""


def vm(name: str) -> VirtualMachine:
    return VirtualMachine(metadata=ObjectMeta(name=name), spec=VirtualMachineSpec(memory_mib=64))


class Seen:
    """A no-op reconciler counting its calls per key (and remembering who made them)."""

    def __init__(self, who: str = "") -> None:
        self.who = who
        self.calls: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []

    async def reconcile(self, key: str) -> Result:
        self.calls[key] += 1
        self.log.append((self.who, key))
        return Result()


class MarkReady:
    """Converges each VM's status to Ready=True at its current generation, through the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def reconcile(self, key: str) -> Result:
        def mark(obj: AnyResource) -> bool:
            changed: bool = obj.status.set_condition(
                "Ready", "True", "Converged", "", obj.metadata.generation
            )
            return changed

        await self.store.patch_status("VirtualMachine", key, mark)
        return Result()


class WaitsForADevice:
    """Blocked at every look (the device never appears): looked at again and again."""

    def __init__(self) -> None:
        self.calls = 0

    async def reconcile(self, key: str) -> Result:
        self.calls += 1
        raise Blocked("DeviceMissing", f"{key}: /dev/sdz does not exist", retry_after=0.05)


class FailsForGood:
    async def reconcile(self, key: str) -> Result:
        raise TerminalError("InvalidSpec", f"{key} asks for a disk that does not exist")


@contextlib.asynccontextmanager
async def running(manager: Manager) -> AsyncIterator[asyncio.Task[None]]:
    """Run `manager` until the block ends; fail if it does not start or stops with an error."""
    task = asyncio.create_task(manager.run(handle_signals=False))
    started = asyncio.create_task(manager.started.wait())
    try:
        await asyncio.wait({task, started}, timeout=DEADLINE, return_when="FIRST_COMPLETED")
        if task.done():
            task.result()
        assert manager.started.is_set(), "the manager did not start in time"
        yield task
    finally:
        started.cancel()
        manager.stop()
        async with asyncio.timeout(DEADLINE):
            await task


async def manager_store(endpoints: list[str], prefix: str) -> Store:
    """A store of the manager's own: the manager closes it when it stops."""
    store = Store(endpoints, prefix=prefix, timeout=2.0)
    await store.connect()
    return store


async def test_a_no_op_reconciler_sees_every_object_once(store: Store) -> None:
    for index in range(20):
        await store.create(vm(f"old{index}"))
    seen = Seen()
    manager = Manager(
        await manager_store(store.endpoints, store.prefix),
        [Controller("noop", "VirtualMachine", seen)],
        http_port=None,
    )
    async with running(manager):
        for index in range(5):
            await store.create(vm(f"new{index}"))
        await store.create(vm("sentinel"))
        await eventually(lambda: "sentinel" in seen.calls, "the last object to be reconciled")
    assert set(seen.calls) == {f"old{i}" for i in range(20)} | {f"new{i}" for i in range(5)} | {
        "sentinel"
    }
    assert set(seen.calls.values()) == {1}


async def test_a_watched_kind_enqueues_mapped_keys(store: Store) -> None:
    for name, host in (("vm1", "host1"), ("vm2", "host2")):
        created = await store.create(vm(name))
        created.status.placement = Placement(node=host, token=1, since=now())
        await store.update_status(created)
    seen = Seen()
    mine = await manager_store(store.endpoints, store.prefix)
    informers = SharedInformers(mine, resync_period=None)

    def vms_on(changed: AnyResource) -> Iterable[str]:
        for candidate in informers.informer("VirtualMachine").list():
            placement = candidate.status.placement
            if placement is not None and placement.node == changed.metadata.name:
                yield candidate.metadata.name

    manager = Manager(
        mine,
        [Controller("vms", "VirtualMachine", seen, watches=[Watch("ClusterNode", vms_on)])],
        http_port=None,
        informers=informers,
    )
    async with running(manager):
        await eventually(lambda: set(seen.calls) == {"vm1", "vm2"}, "the initial pass")
        address = NodeAddresses(cluster=ip_address("10.0.0.1"))
        await store.create(
            ClusterNode(metadata=ObjectMeta(name="host1"), spec=ClusterNodeSpec(addresses=address))
        )
        await eventually(lambda: seen.calls["vm1"] == 2, "vm1 enqueued by its node")
        assert seen.calls["vm2"] == 1


async def test_a_terminal_error_becomes_a_condition_and_a_warning_event(store: Store) -> None:
    await store.create(vm("broken"))
    manager = Manager(
        await manager_store(store.endpoints, store.prefix),
        [Controller("strict", "VirtualMachine", FailsForGood())],
        http_port=None,
    )
    async with running(manager):
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE
        while True:
            events, _ = await store.list_objects("Event")
            if events:
                break
            assert loop.time() < end, "no Warning event was recorded"
            await asyncio.sleep(0.05)
    broken = await store.get("VirtualMachine", "broken")
    ready = broken.status.condition("Ready")
    assert ready is not None
    assert (ready.status, ready.reason) == ("False", "InvalidSpec")
    assert ready.message == "broken asks for a disk that does not exist"
    assert ready.observed_generation == broken.metadata.generation
    [event] = events
    assert isinstance(event, Event)
    assert (event.spec.type, event.spec.reason) == ("Warning", "InvalidSpec")
    assert event.spec.involved_object.name == "broken"


async def test_a_blocked_reconcile_sets_the_condition_warns_once_and_looks_again(
    store: Store,
) -> None:
    await store.create(vm("waiting"))
    waits = WaitsForADevice()
    manager = Manager(
        await manager_store(store.endpoints, store.prefix),
        [Controller("devices", "VirtualMachine", waits)],
        http_port=None,
    )
    async with running(manager):
        await eventually(lambda: waits.calls >= 4, "four looks at the blocked object")
    waiting = await store.get("VirtualMachine", "waiting")
    ready = waiting.status.condition("Ready")
    assert ready is not None
    assert (ready.status, ready.reason) == ("False", "DeviceMissing")
    assert ready.message == "waiting: /dev/sdz does not exist"
    events, _ = await store.list_objects("Event")
    [event] = events
    assert isinstance(event, Event)
    assert (event.spec.type, event.spec.reason, event.spec.count) == ("Warning", "DeviceMissing", 1)


def converged(store_objects: list[AnyResource]) -> bool:
    for obj in store_objects:
        ready = obj.status.condition("Ready")
        if ready is None or ready.observed_generation != obj.metadata.generation:
            return False
    return True


async def test_a_controller_keeps_converging_across_an_etcd_restart(
    etcd_private: EtcdCluster, key_prefix: str
) -> None:
    async with Store(etcd_private.endpoints, prefix=key_prefix, timeout=2.0) as writer:
        for index in range(5):
            await writer.create(vm(f"vm{index}"))
        mine = await manager_store(etcd_private.endpoints, key_prefix)
        manager = Manager(
            mine, [Controller("ready", "VirtualMachine", MarkReady(mine))], http_port=None
        )
        async with running(manager):
            await until_converged(writer)
            await asyncio.to_thread(etcd_private.restart)
            for index in range(5):
                await until_written(functools.partial(bump_memory, writer, f"vm{index}"))
            await until_written(lambda: writer.create(vm("vm-after")))
            await until_converged(writer)


async def bump_memory(store: Store, name: str) -> None:
    current = await store.get("VirtualMachine", name)
    current.spec.memory_mib += 64
    await store.update(current)


async def until_written(write: Callable[[], Awaitable[object]]) -> None:
    """Retry a write while the client reconnects after an etcd restart."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        try:
            await write()
            return
        except StoreError:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.2)


async def until_converged(store: Store) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        try:
            objects, _ = await store.list_objects("VirtualMachine")
            if converged(objects):
                return
        except StoreError:
            pass
        assert loop.time() < end, "the controller did not converge"
        await asyncio.sleep(0.1)


async def test_leader_only_controllers_run_in_one_manager_and_move_on_handover(
    store: Store,
) -> None:
    for index in range(3):
        await store.create(vm(f"vm{index}"))
    seen = [Seen("first"), Seen("second")]
    managers = [
        Manager(
            await manager_store(store.endpoints, store.prefix),
            [Controller("ha", "VirtualMachine", reconciler, leader_only=True)],
            identity=reconciler.who,
            election_timing=STEADY,
            http_port=None,
        )
        for reconciler in seen
    ]
    async with running(managers[0]) as first:
        await eventually(lambda: managers[0].is_leader, "the first manager to lead")
        async with running(managers[1]):
            await eventually(lambda: len(seen[0].calls) == 3, "the leader's initial pass")
            assert not managers[1].is_leader and not seen[1].calls
            managers[0].stop()
            async with asyncio.timeout(DEADLINE):
                await first
            await eventually(lambda: managers[1].is_leader, "the second manager to take over")
            await eventually(lambda: len(seen[1].calls) == 3, "the new leader's initial pass")
            await store.create(vm("late"))
            await eventually(lambda: seen[1].calls["late"] == 1, "the new leader to see changes")
            assert "late" not in seen[0].calls


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_healthz_and_metrics_answer_over_http(store: Store) -> None:
    telemetry.setup_telemetry("kvmctl-test", "prometheus")
    try:
        await store.create(vm("web"))
        seen = Seen()
        manager = Manager(
            await manager_store(store.endpoints, store.prefix),
            [Controller("noop", "VirtualMachine", seen)],
            http_port=0,
        )
        async with running(manager):
            await eventually(lambda: "web" in seen.calls, "web reconciled")
            base = f"http://127.0.0.1:{manager.http_port}"
            status, body = await asyncio.to_thread(http_get, f"{base}/healthz")
            assert (status, body) == (200, "ok\n")
            status, body = await asyncio.to_thread(http_get, f"{base}/metrics")
            assert status == 200
            assert 'kvmctl_reconcile_duration_seconds_count{controller="noop"' in body
            assert 'kvmctl_workqueue_depth{name="noop"' in body
            assert "process_resident_memory_bytes" in body
            status, _ = await asyncio.to_thread(http_get, f"{base}/nothing")
            assert status == 404
    finally:
        telemetry.setup_telemetry("kvmctl-test", "none")


async def test_sigterm_stops_workers_resigns_and_closes_everything(store: Store) -> None:
    seen = Seen()
    manager = Manager(
        await manager_store(store.endpoints, store.prefix),
        [Controller("ha", "VirtualMachine", seen, leader_only=True)],
        election_timing=STEADY,
        http_port=0,
    )
    task = asyncio.create_task(manager.run(handle_signals=True))
    try:
        await eventually(lambda: manager.is_leader and manager.http_port is not None, "a leader")
        assert manager.elector is not None
        assert await current_leader(store.client, manager.elector.key) is not None
        port = manager.http_port
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            await task  # returns normally: a clean shutdown
    finally:
        if not task.done():
            manager.stop()
            await task
    assert not manager.is_leader
    assert await current_leader(store.client, manager.elector.key) is None, "it resigned"
    assert asyncio.all_tasks() == {asyncio.current_task()}, "no task left running"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


class LogsAndFails:
    """Logs once per reconcile; fails `web` once (to be retried), `bad` for good."""

    def __init__(self) -> None:
        self.failed: set[str] = set()

    async def reconcile(self, key: str) -> Result:
        logging.getLogger("kvmctl.test").info("reconciling")
        if key == "bad":
            raise TerminalError("InvalidSpec", "bad spec")
        if key not in self.failed:
            self.failed.add(key)
            raise RetryableError("not yet")
        return Result(requeue_after=3600)


async def test_reconciles_are_traced_counted_and_logged_with_context(store: Store) -> None:
    spans = InMemorySpanExporter()
    setup = telemetry.setup_telemetry("kvmctl-test", "prometheus")
    assert isinstance(setup.tracer_provider, TracerProvider)
    setup.tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.addFilter(logs.ReconcileContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    test_log = logging.getLogger("kvmctl.test")
    test_log.addHandler(handler)
    test_log.setLevel(logging.INFO)
    try:
        for name in ("web", "bad"):
            await store.create(vm(name))
        manager = Manager(
            await manager_store(store.endpoints, store.prefix),
            [Controller("traced", "VirtualMachine", LogsAndFails())],
            http_port=None,
        )
        async with running(manager):
            await eventually(
                lambda: (
                    {"requeue", "error", "terminal"}
                    <= {
                        span.attributes.get("result")
                        for span in spans.get_finished_spans()
                        if span.attributes
                    }
                ),
                "spans of every outcome",
            )
        results = {
            (span.attributes["name"], span.attributes["result"])
            for span in spans.get_finished_spans()
            if span.attributes
        }
        assert {("web", "error"), ("web", "requeue"), ("bad", "terminal")} <= results
        failed = next(
            span
            for span in spans.get_finished_spans()
            if span.attributes and span.attributes["result"] == "error"
        )
        assert failed.attributes is not None
        assert failed.attributes["kind"] == "VirtualMachine"
        assert failed.attributes["error"] == "RetryableError: not yet"
        metrics = prometheus_client.generate_latest().decode()
        assert 'kvmctl_reconcile_retries_total{controller="traced",kind="VirtualMachine"' in metrics
        records = [json.loads(line) for line in lines.getvalue().splitlines()]
        assert records and all(r["kind"] == "VirtualMachine" for r in records)
        assert {r["name"] for r in records} == {"web", "bad"}
        assert len({r["reconcileID"] for r in records}) == len(records), "one id per pass"
    finally:
        test_log.removeHandler(handler)
        test_log.setLevel(logging.NOTSET)
        telemetry.setup_telemetry("kvmctl-test", "none")


def test_telemetry_refuses_unknown_or_missing_exporters() -> None:
    with pytest.raises(telemetry.TelemetryError, match="unknown telemetry exporter 'zipkin'"):
        telemetry.setup_telemetry("kvmctl-test", "zipkin")  # type: ignore[arg-type]
    if importlib.util.find_spec("opentelemetry.exporter.otlp") is None:
        with pytest.raises(telemetry.TelemetryError, match="pip install"):
            telemetry.setup_telemetry("kvmctl-test", "otlp")


# Registrations: predicates, external sources, hooks, leader-only controllers added later --------


def labelled(name: str, node: str) -> VirtualMachine:
    obj = vm(name)
    obj.metadata.labels["node"] = node
    return obj


def on_host1(obj: AnyResource) -> bool:
    return obj.metadata.labels.get("node") == "host1"


class Fed:
    """An external source of keys the test feeds (like libvirt events)."""

    def __init__(self) -> None:
        self.keys: asyncio.Queue[str] = asyncio.Queue()

    async def run(self, sink: KeySink) -> None:
        while True:
            sink.add(await self.keys.get())


async def test_a_predicate_filters_changes_watches_and_sources(store: Store) -> None:
    for name, node in (("mine", "host1"), ("other", "host2")):
        await store.create(labelled(name, node))
    seen, fed = Seen(), Fed()
    every_vm = lambda _node: ["mine", "other", "ghost"]  # noqa: E731
    manager = Manager(
        await manager_store(store.endpoints, store.prefix),
        [
            Controller(
                "host1-vms",
                "VirtualMachine",
                seen,
                watches=[Watch("ClusterNode", every_vm)],
                predicate=on_host1,
                sources=[Source("fed", fed.run)],
            )
        ],
        http_port=None,
    )
    async with running(manager):
        await eventually(lambda: seen.calls["mine"] == 1, "the initial pass")
        address = NodeAddresses(cluster=ip_address("10.0.0.1"))
        await store.create(
            ClusterNode(metadata=ObjectMeta(name="host1"), spec=ClusterNodeSpec(addresses=address))
        )
        await eventually(lambda: seen.calls["mine"] == 2, "mine enqueued by the watch")
        for key in ("other", "ghost", "mine"):
            fed.keys.put_nowait(key)
        await eventually(lambda: seen.calls["mine"] == 3, "mine enqueued by the source")
        await store.create(labelled("other2", "host2"))
        await store.create(labelled("mine2", "host1"))
        await eventually(lambda: seen.calls["mine2"] == 1, "a new object of host1")
    # One worker takes keys in order: anything let through before the last key was seen first.
    assert set(seen.calls) == {"mine", "mine2"}


async def test_a_failing_source_stops_the_manager_with_its_error(store: Store) -> None:
    async def broken(_sink: KeySink) -> None:
        raise OSError("the link watch ended")

    manager = Manager(
        await manager_store(store.endpoints, store.prefix),
        [Controller("links", "VirtualMachine", Seen(), sources=[Source("links", broken)])],
        http_port=None,
    )
    with pytest.raises(RuntimeError, match=r"controller links stopped unexpectedly.*link watch"):
        await asyncio.wait_for(manager.run(handle_signals=False), DEADLINE)


async def test_setup_on_ready_and_teardown_run_in_order_and_the_store_may_stay_open(
    store: Store,
) -> None:
    await store.create(vm("early"))
    seen = Seen()
    steps: list[str] = []
    mine = await manager_store(store.endpoints, store.prefix)

    async def setup() -> None:
        assert manager.informers.synced() and not seen.calls, "caches synced, nothing reconciled"
        steps.append("setup")

    async def teardown() -> None:
        await mine.create(vm("written-at-teardown"))
        steps.append("teardown")

    manager = Manager(
        mine,
        [Controller("noop", "VirtualMachine", seen)],
        http_port=None,
        setup=setup,
        on_ready=lambda: steps.append("ready"),
        teardown=teardown,
        close_store=False,
    )
    try:
        async with running(manager):
            await eventually(lambda: "early" in seen.calls, "early reconciled")
            assert manager.healthy()
        assert steps == ["setup", "ready", "teardown"]
        assert (await mine.get("VirtualMachine", "written-at-teardown")).metadata.name
    finally:
        await mine.close()


class GuardedMark:
    """Marks each VM Ready with a write guarded by the term the manager leads."""

    def __init__(self, store: Store, manager: Manager) -> None:
        self.store = store
        self.manager = manager
        self.tokens: set[int] = set()

    async def reconcile(self, key: str) -> Result:
        term = self.manager.term()
        self.tokens.add(term.token)

        def mark(obj: AnyResource) -> bool:
            return bool(obj.status.set_condition("Ready", "True", "Led", f"term {term.token}"))

        await self.store.patch_status("VirtualMachine", key, mark, guard=term.guard)
        return Result()


async def test_a_leader_only_controller_added_later_writes_with_the_term(store: Store) -> None:
    await store.create(vm("led"))
    mine = await manager_store(store.endpoints, store.prefix)
    manager = Manager(mine, [], campaign=True, election_timing=STEADY, http_port=None)
    with pytest.raises(RetryableError, match="does not lead"):
        manager.term()
    marker = GuardedMark(mine, manager)
    manager.add(Controller("guarded", "VirtualMachine", marker, leader_only=True))
    with pytest.raises(ValueError, match="names must be distinct"):
        manager.add(Controller("guarded", "VirtualMachine", Seen()))
    async with running(manager):
        with pytest.raises(RuntimeError, match="added after the manager started"):
            manager.add(Controller("late", "VirtualMachine", Seen()))
        await eventually(lambda: marker.tokens, "a reconcile while leading")
        [token] = marker.tokens
        assert manager.term().token == token

        async def marked() -> bool:
            ready = (await store.get("VirtualMachine", "led")).status.condition("Ready")
            return ready is not None and ready.message == f"term {token}"

        await eventually(marked, "the guarded write")
    lonely = Manager(await manager_store(store.endpoints, store.prefix), [], http_port=None)
    try:
        with pytest.raises(ValueError, match="nobody campaigns"):
            lonely.add(Controller("guarded", "VirtualMachine", Seen(), leader_only=True))
    finally:
        await lonely.store.close()


async def test_a_controller_may_record_its_terminal_errors_itself(store: Store) -> None:
    await store.create(vm("broken"))
    recorded: list[tuple[str, str]] = []

    async def record(key: str, error: TerminalError | Blocked) -> None:
        recorded.append((key, error.reason))

    manager = Manager(
        await manager_store(store.endpoints, store.prefix),
        [Controller("strict", "VirtualMachine", FailsForGood(), on_not_ready=record)],
        http_port=None,
    )
    async with running(manager):
        await eventually(lambda: recorded, "the terminal error handed to the controller")
    assert recorded == [("broken", "InvalidSpec")]
    assert (await store.get("VirtualMachine", "broken")).status.condition("Ready") is None
