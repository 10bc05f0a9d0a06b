"""Informers against a real etcd: changes, late handlers, resync, mapped keys, lost connections.

A lost connection is made real with a TCP proxy on loopback between the informer's client and
etcd: cutting it drops the informer's watch while other clients keep writing (and compacting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from ipaddress import ip_address

import pytest

from controller.runtime.informer import EventType, Informer, SharedInformers
from controller.runtime.store import Store
from controller.runtime.workqueue import WorkQueue
from crds import AnyResource, ClusterNode, ObjectMeta, VirtualMachine
from crds.clusternode import ClusterNodeSpec, NodeAddresses
from crds.meta import now
from crds.virtualmachine import Placement, VirtualMachineSpec
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually

DEADLINE = 30.0


def vm(name: str, memory: int = 64) -> VirtualMachine:
    return VirtualMachine(
        metadata=ObjectMeta(name=name), spec=VirtualMachineSpec(memory_mib=memory)
    )


def node(name: str) -> ClusterNode:
    return ClusterNode(
        metadata=ObjectMeta(name=name),
        spec=ClusterNodeSpec(addresses=NodeAddresses(cluster=ip_address("10.0.0.1"))),
    )


class Recorder:
    """A handler remembering every delivery, and the last version seen per name."""

    def __init__(self) -> None:
        self.events: list[tuple[EventType, str]] = []
        self.last: dict[str, AnyResource | None] = {}

    def __call__(self, event_type: EventType, obj: AnyResource) -> None:
        self.events.append((event_type, obj.metadata.name))
        self.last[obj.metadata.name] = None if event_type == "DELETED" else obj

    def versions(self) -> dict[str, str | None]:
        return {
            name: obj.metadata.resource_version
            for name, obj in self.last.items()
            if obj is not None
        }


@contextlib.asynccontextmanager
async def running(informer: Informer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(informer.run())
    try:
        async with asyncio.timeout(DEADLINE):
            await informer.has_synced.wait()
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task})


async def stored_versions(store: Store, kind: str) -> dict[str, str | None]:
    objects, _ = await store.list_objects(kind)
    return {obj.metadata.name: obj.metadata.resource_version for obj in objects}


async def test_informer_sees_create_update_delete(store: Store) -> None:
    await store.create(vm("before"))
    informer = Informer(store, "VirtualMachine", resync_period=None)
    seen = Recorder()
    informer.add_handler(seen)
    async with running(informer):
        assert seen.events == [("ADDED", "before")]
        created = await store.create(vm("web"))
        await eventually(lambda: informer.get("web") is not None, "web in the cache")
        created.spec.memory_mib = 128
        updated = await store.update(created)
        await eventually(
            lambda: seen.versions().get("web") == updated.metadata.resource_version, "update"
        )
        cached = informer.get("web")
        assert cached is not None and cached.spec.memory_mib == 128
        await store.delete("VirtualMachine", "web")
        await eventually(lambda: informer.get("web") is None, "web gone from the cache")
        assert seen.events == [
            ("ADDED", "before"),
            ("ADDED", "web"),
            ("MODIFIED", "web"),
            ("DELETED", "web"),
        ]
        assert [obj.metadata.name for obj in informer.list()] == ["before"]


async def test_an_informer_of_a_model_is_typed_by_it(store: Store) -> None:
    await store.create(vm("web", memory=96))
    informers = SharedInformers(store, resync_period=None)
    typed: Informer[VirtualMachine] = informers.informer(VirtualMachine)
    assert informers.informer("VirtualMachine") is typed  # one cache per kind, however named
    memories: list[int] = []
    typed.add_handler(lambda _type, obj: memories.append(obj.spec.memory_mib))
    informers.start()
    try:
        await informers.wait_for_sync()
        cached: VirtualMachine | None = typed.get("web")
        assert cached is not None and cached.spec.memory_mib == 96 and memories == [96]
    finally:
        await informers.stop()


async def test_late_handler_gets_the_cache_and_resync_redelivers(store: Store) -> None:
    for name in ("a", "b"):
        await store.create(vm(name))
    informer = Informer(store, "VirtualMachine", resync_period=0.2)
    async with running(informer):
        late = Recorder()
        informer.add_handler(late)
        assert sorted(late.events) == [("ADDED", "a"), ("ADDED", "b")]
        await eventually(
            lambda: {("RESYNC", "a"), ("RESYNC", "b")} <= set(late.events), "a resync of a and b"
        )


async def test_a_failing_handler_does_not_starve_the_others(store: Store) -> None:
    informer = Informer(store, "VirtualMachine", resync_period=None)

    def broken(_type: EventType, _obj: AnyResource) -> None:
        raise RuntimeError("handler bug")

    seen = Recorder()
    informer.add_handler(broken)
    informer.add_handler(seen)
    async with running(informer):
        await store.create(vm("x"))
        await eventually(lambda: ("ADDED", "x") in seen.events, "x delivered")


async def test_mapped_keys_enqueue_the_vms_placed_on_a_node(store: Store) -> None:
    informers = SharedInformers(store, resync_period=None)
    vms = informers.informer("VirtualMachine")
    nodes = informers.informer("ClusterNode")
    assert informers.informer("VirtualMachine") is vms, "one shared informer per kind"

    def vms_on(changed: AnyResource) -> Iterable[str]:
        for candidate in vms.list():
            placement = candidate.status.placement
            if placement is not None and placement.node == changed.metadata.name:
                yield candidate.metadata.name

    for name, host in (("vm1", "host1"), ("vm2", "host2"), ("vm3", "host1")):
        created = await store.create(vm(name))
        created.status.placement = Placement(node=host, token=1, since=now())
        await store.update_status(created)
    queue = WorkQueue()
    nodes.enqueue_mapped(queue, vms_on)
    informers.start()
    try:
        async with asyncio.timeout(DEADLINE):
            await informers.wait_for_sync()
        assert len(queue) == 0
        await store.create(node("host1"))
        async with asyncio.timeout(DEADLINE):
            keys = {await queue.get(), await queue.get()}
        assert keys == {"vm1", "vm3"}
        assert len(queue) == 0
    finally:
        await informers.stop()


class TcpProxy:
    """Forwards a loopback port to etcd; `cut()` drops every connection and refuses new ones."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _connect(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, server_writer}
        await asyncio.gather(
            self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


async def test_nothing_is_missed_across_a_lost_connection_and_a_compaction(
    etcd_private: EtcdCluster, key_prefix: str
) -> None:
    proxy = TcpProxy(etcd_private.endpoints[0])
    await proxy.start()
    async with (
        Store([proxy.endpoint], prefix=key_prefix, timeout=2.0) as informer_store,
        Store(etcd_private.endpoints, prefix=key_prefix) as writer,
    ):
        for index in range(5):
            await writer.create(vm(f"vm{index}"))
        informer = Informer(informer_store, "VirtualMachine", resync_period=None)
        seen = Recorder()
        informer.add_handler(seen)
        try:
            async with running(informer):
                cached_at = informer.revision
                assert cached_at is not None
                await proxy.cut()
                # While the informer is cut off: update, delete, create, compact, write more.
                vm0 = await writer.get("VirtualMachine", "vm0")
                vm0.spec.memory_mib = 256
                await writer.update(vm0)
                await writer.delete("VirtualMachine", "vm1")
                await writer.create(vm("vm-new"))
                revision = await writer.revision()
                assert revision > cached_at
                await writer.compact(revision)
                await writer.delete("VirtualMachine", "vm2")
                await writer.create(vm("vm-after"))
                await proxy.start()
                expected = await stored_versions(writer, "VirtualMachine")
                await eventually(
                    lambda: seen.versions() == expected, "the handler to see the final state"
                )
                assert {
                    obj.metadata.name: obj.metadata.resource_version for obj in informer.list()
                } == expected
                assert ("DELETED", "vm1") in seen.events and ("DELETED", "vm2") in seen.events
                # And it keeps watching after the relist.
                await writer.create(vm("vm-later"))
                await eventually(lambda: informer.get("vm-later") is not None, "vm-later")
        finally:
            await proxy.cut()


async def test_a_list_that_fails_is_retried_until_etcd_answers(
    etcd_private: EtcdCluster, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.runtime.informer")
    proxy = TcpProxy(etcd_private.endpoints[0])
    await proxy.start()
    async with (
        Store(etcd_private.endpoints, prefix=key_prefix) as writer,
        Store([proxy.endpoint], prefix=key_prefix, timeout=1.0) as cut_off,
    ):
        await writer.create(vm("web"))
        await proxy.cut()
        informer = Informer(cut_off, "VirtualMachine", resync_period=None)
        task = asyncio.create_task(informer.run())
        try:

            def failures() -> int:
                return sum(
                    "listing VirtualMachine failed" in r.getMessage() for r in caplog.records
                )

            await eventually(lambda: failures() >= 2, "two failed lists")
            assert not informer.has_synced.is_set()
            await proxy.start()
            async with asyncio.timeout(DEADLINE):
                await informer.has_synced.wait()
            assert [obj.metadata.name for obj in informer.list()] == ["web"]
        finally:
            task.cancel()
            await asyncio.wait({task})
            await proxy.cut()


async def test_the_cache_stays_current_across_an_etcd_restart(
    etcd_private: EtcdCluster, key_prefix: str
) -> None:
    async with Store(etcd_private.endpoints, prefix=key_prefix, timeout=2.0) as store:
        await store.create(vm("before"))
        informer = Informer(store, "VirtualMachine", resync_period=None)
        async with running(informer):
            await asyncio.to_thread(etcd_private.restart)
            await retry(lambda: store.create(vm("after")))
            expected = await stored_versions(store, "VirtualMachine")
            await eventually(
                lambda: (
                    {o.metadata.name: o.metadata.resource_version for o in informer.list()}
                    == expected
                ),
                "the cache to match etcd after the restart",
            )


async def retry(write: Callable[[], Awaitable[object]], deadline: float = DEADLINE) -> None:
    """Retry a write while the client reconnects after an etcd restart."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        try:
            await write()
            return
        except Exception:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.2)


async def test_a_resync_of_a_watched_kind_maps_nothing(store: Store) -> None:
    """The queue's own kind resyncs; mapping each watched object at its resync too would
    reconcile every mapped key once more per watched kind and period."""
    informers = SharedInformers(store, resync_period=0.2)
    nodes = informers.informer("ClusterNode")
    resynced = Recorder()
    nodes.add_handler(resynced)
    queue = WorkQueue()
    nodes.enqueue_mapped(queue, lambda changed: [f"vm-of-{changed.metadata.name}"])
    await store.create(node("host1"))
    informers.start()
    try:
        async with asyncio.timeout(DEADLINE):
            await informers.wait_for_sync()
            assert await queue.get() == "vm-of-host1"  # the listing is a change (ADDED)
        queue.done("vm-of-host1")
        await eventually(
            lambda: resynced.events.count(("RESYNC", "host1")) >= 2, "two resyncs of host1"
        )
        assert len(queue) == 0
    finally:
        await informers.stop()
