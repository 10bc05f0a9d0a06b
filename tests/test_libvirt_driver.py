"""LibvirtHost on libvirt's in-process test driver (no daemon, no guests, no migration).

`test:///ABS/PATH/host.xml` gives every connection its own private host, so each test gets a
fresh one; `test:///default` is shared by the whole process and only used with unique names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from reconcilers.drivers.domain_xml import (
    BlockSource,
    DiskSpec,
    DomainSpec,
    IscsiSource,
    NicSpec,
    build_domain_xml,
    parse_kvmctl_metadata,
)
from reconcilers.drivers.libvirt import (
    DomainNotFound,
    DomainState,
    EventStream,
    InvalidDefinition,
    LibvirtHost,
    LibvirtUnavailable,
    LifecycleEvent,
    LifecycleEventKind,
)

EVENT_DEADLINE_S = 20.0

HOST_XML = """<node>
  <cpu>
    <mhz>2000</mhz>
    <model>x86_64</model>
    <active>4</active>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>4</cores>
    <threads>1</threads>
  </cpu>
  <memory>8388608</memory>
</node>
"""


def host_uri(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.xml"
    path.write_text(HOST_XML)
    return f"test://{path}"


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[LibvirtHost]:
    async with await LibvirtHost.connect(host_uri(tmp_path, "host1")) as connected:
        yield connected


def vm_spec(name: str, **metadata: str) -> DomainSpec:
    return DomainSpec(
        name=name,
        uuid=str(uuid.uuid4()),
        domain_type="qemu",
        vcpus=1,
        memory_mib=128,
        disks=(
            DiskSpec(BlockSource(f"/dev/vg_cluster/lv_{name}"), "vda"),
            DiskSpec(IscsiSource("127.0.0.1", 3260, "iqn.2024-01.io.kvmctl:store", 2), "vdb"),
        ),
        nics=(NicSpec("br0", "52:54:00:00:00:01"),),
        serial_log=f"/var/log/kvmctl/{name}.log",
        kernel="/boot/vmlinuz",
        cmdline="console=ttyS0",
        tb_cache_mib=16,
        metadata=metadata,
    )


async def next_event(events: EventStream, name: str, kind: LifecycleEventKind) -> LifecycleEvent:
    """The next event of `kind` for domain `name`, skipping others."""
    async with asyncio.timeout(EVENT_DEADLINE_S):
        async for event in events:
            if event.name == name and event.event is kind:
                return event
    raise AssertionError(f"event stream ended before {kind} of {name}")


async def test_node_info_reports_the_host_capacity(host: LibvirtHost) -> None:
    capacity = await host.node_info()
    assert capacity.cpus == 4
    assert capacity.memory_mib == 8192
    assert capacity.hostname


async def test_defined_xml_reads_back_with_metadata(host: LibvirtHost) -> None:
    spec = vm_spec("vm1", uid="c0ffee", generation="4")
    await host.define(build_domain_xml(spec))

    xml = await host.domain_xml("vm1")
    assert parse_kvmctl_metadata(xml) == {"uid": "c0ffee", "generation": "4"}
    assert "iqn.2024-01.io.kvmctl:store/2" in xml
    assert "/dev/vg_cluster/lv_vm1" in xml
    info = await host.lookup("vm1")
    assert info is not None
    assert (info.name, info.uuid, info.state) == ("vm1", spec.uuid, DomainState.SHUTOFF)
    assert info.metadata == {"uid": "c0ffee", "generation": "4"}


async def test_redefining_replaces_the_definition(host: LibvirtHost) -> None:
    spec = vm_spec("vm1", generation="1")
    await host.define(build_domain_xml(spec))
    newer = dataclasses.replace(spec, metadata={"generation": "2"}, vcpus=2)
    await host.define(build_domain_xml(newer))

    info = await host.lookup("vm1")
    assert info is not None
    assert info.metadata == {"generation": "2"}
    assert "<vcpu placement='static'>2</vcpu>" in await host.domain_xml("vm1")


async def test_lifecycle_with_events(host: LibvirtHost) -> None:
    with host.events() as events:
        await host.define(build_domain_xml(vm_spec("vm1")))
        defined = await next_event(events, "vm1", LifecycleEventKind.DEFINED)
        assert defined.detail == "added"

        await host.start("vm1")
        started = await next_event(events, "vm1", LifecycleEventKind.STARTED)
        assert started.detail == "booted"
        assert await host.state("vm1") is DomainState.RUNNING

        await host.destroy("vm1")
        stopped = await next_event(events, "vm1", LifecycleEventKind.STOPPED)
        assert stopped.detail == "destroyed"
        assert await host.state("vm1") is DomainState.SHUTOFF

        await host.start("vm1")
        assert await host.shutdown("vm1", timeout=30) is True
        stopped = await next_event(events, "vm1", LifecycleEventKind.STOPPED)
        assert stopped.detail == "shutdown"
        assert await host.shutdown("vm1", timeout=30) is True  # already off

        await host.undefine("vm1")
        undefined = await next_event(events, "vm1", LifecycleEventKind.UNDEFINED)
        assert undefined.uuid == started.uuid
    assert await host.lookup("vm1") is None


async def test_list_domains_reports_states_and_owners(host: LibvirtHost) -> None:
    for name in ("web", "db"):
        await host.define(build_domain_xml(vm_spec(name, uid=f"uid-{name}")))
    await host.start("web")

    domains = {info.name: info for info in await host.list_domains()}
    assert domains["web"].state is DomainState.RUNNING
    assert domains["db"].state is DomainState.SHUTOFF
    assert domains["db"].metadata == {"uid": "uid-db"}


async def test_missing_domain_errors_name_the_domain(host: LibvirtHost) -> None:
    assert await host.lookup("ghost") is None
    for action in (host.start, host.destroy, host.undefine, host.state, host.domain_xml):
        with pytest.raises(DomainNotFound, match="'ghost'"):
            await action("ghost")
    with pytest.raises(DomainNotFound, match="read state of domain 'ghost'"):
        await host.shutdown("ghost", timeout=1)


async def test_invalid_definition_is_terminal(host: LibvirtHost) -> None:
    with pytest.raises(InvalidDefinition, match="define domain on test://"):
        await host.define("<domain type='qemu'><name>x</name></domain>")


async def test_unreachable_daemon_is_unavailable(tmp_path: Path) -> None:
    socket = tmp_path / "no-libvirtd.sock"
    with pytest.raises(LibvirtUnavailable, match="cannot connect to libvirt at qemu\\+unix"):
        await LibvirtHost.connect(f"qemu+unix:///system?socket={socket}")


async def test_each_host_file_is_a_separate_host(tmp_path: Path) -> None:
    async with (
        await LibvirtHost.connect(host_uri(tmp_path, "a")) as host_a,
        await LibvirtHost.connect(host_uri(tmp_path, "b")) as host_b,
    ):
        await host_a.define(build_domain_xml(vm_spec("vm1")))
        await host_a.start("vm1")
        assert await host_b.lookup("vm1") is None
        assert [info.name for info in await host_a.list_domains()] == ["vm1"]


async def test_shared_default_driver_delivers_events() -> None:
    name = f"kvmctl-test-{secrets.token_hex(4)}"
    async with await LibvirtHost.connect("test:///default") as host:
        try:
            with host.events() as events:
                await host.define(build_domain_xml(vm_spec(name)))
                await host.start(name)
                await next_event(events, name, LifecycleEventKind.STARTED)
                await host.destroy(name)
                await next_event(events, name, LifecycleEventKind.STOPPED)
        finally:
            if await host.lookup(name) is not None:
                await host.undefine(name)


async def test_close_ends_event_streams_and_later_calls_fail(tmp_path: Path) -> None:
    host = await LibvirtHost.connect(host_uri(tmp_path, "host1"))
    events = host.events()
    await host.close()
    await host.close()  # idempotent

    assert [event async for event in events] == []
    assert [event async for event in host.events()] == []
    with pytest.raises(LibvirtUnavailable, match="is closed"):
        await host.list_domains()
