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

import libvirt
import pytest

from e2e.harness.private_host import host_uri
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
    InvalidUri,
    LibvirtHost,
    LibvirtUnavailable,
    LifecycleEvent,
    LifecycleEventKind,
    MigrationError,
)

EVENT_DEADLINE_S = 20.0


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
            if isinstance(event, LifecycleEvent) and event.name == name and event.event is kind:
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


async def test_active_domains_change_when_a_domain_starts_or_stops(host: LibvirtHost) -> None:
    for name in ("web", "db"):
        await host.define(build_domain_xml(vm_spec(name, uid=f"uid-{name}")))
    assert await host.active_domain_ids() == frozenset()
    assert await host.active_domain_names() == frozenset()
    await host.start("web")
    (web,) = await host.active_domain_ids()
    assert await host.active_domain_names() == {"web"}
    await host.destroy("web")
    await host.start("web")
    (again,) = await host.active_domain_ids()
    assert again != web, "a new process, a new ID"
    await host.destroy("web")
    assert await host.active_domain_ids() == frozenset()


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


def command_writing(tmp_path: Path) -> tuple[Path, Path]:
    """A program that records that it ran, and the file it writes."""
    out = tmp_path / "ran"
    program = tmp_path / "program.sh"
    program.write_text(f"#!/bin/sh\nid > {out}\n")
    program.chmod(0o755)
    return program, out


def test_libvirt_runs_the_command_of_an_ext_uri(tmp_path: Path) -> None:
    """The control: libvirt itself runs what `command=` names. Up to three tries: an exec of a
    script just written can fail with ETXTBSY while another thread of this process forks (the
    likely cause of one full-run failure: libvirt's error, and no file)."""
    program, out = command_writing(tmp_path)
    for _ in range(3):
        with pytest.raises(libvirt.libvirtError):
            libvirt.open(f"qemu+ext:///system?command={program}")
        if out.exists():
            break
    assert out.read_text().startswith("uid=")


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+ext:///system?command={program}",
        "qemu+ssh://h1/system?command={program}",
        "qemu+ssh://h1/system?no_tty=1;command={program}",
        "qemu+ssh://h1/system?netcat={program}",
        "qemu:///system?command={program}",
    ],
)
async def test_connect_refuses_uris_outside_the_allow_list(tmp_path: Path, uri: str) -> None:
    program, out = command_writing(tmp_path)
    with pytest.raises(InvalidUri, match="cannot connect to libvirt: libvirt URI"):
        await LibvirtHost.connect(uri.format(program=program))
    assert not out.exists()


async def test_migrate_refuses_a_peer_uri_outside_the_allow_list(
    host: LibvirtHost, tmp_path: Path
) -> None:
    """The target's URI comes from its agent; the source daemon would open it as root."""
    program, out = command_writing(tmp_path)
    await host.define(build_domain_xml(vm_spec("vm1")))
    await host.start("vm1")
    for dest, data in (
        (f"qemu+ext://h2/system?command={program}", "tcp://10.0.0.2"),
        ("qemu+unix:///system?socket=/run/other.sock", "tcp://10.0.0.2"),
        ("qemu+tcp://10.0.0.2/system", "unix:///run/x"),
    ):
        with pytest.raises(MigrationError, match=r"refused: (libvirt|migration) URI"):
            await host.migrate("vm1", dest, migrate_uri=data, max_downtime_ms=300)
    assert not out.exists()
    assert await host.state("vm1") is DomainState.RUNNING


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


async def test_reset_keeps_the_domain_running(host: LibvirtHost) -> None:
    await host.define(build_domain_xml(vm_spec("vm1")))
    await host.start("vm1")
    await host.reset("vm1")
    assert await host.state("vm1") is DomainState.RUNNING
    with pytest.raises(DomainNotFound):
        await host.reset("nosuchvm")


async def test_guest_ping_is_unanswered_without_a_guest_agent(host: LibvirtHost) -> None:
    """The test driver has no guest agents: a ping is not answered (real libvirtd without an
    agent in the guest fails the same way, error 86, checked on a lab libvirtd: docs/ha.md)."""
    await host.define(build_domain_xml(dataclasses.replace(vm_spec("vm1"), guest_agent=True)))
    await host.start("vm1")
    assert await host.guest_ping("vm1", timeout=1) is False
    with pytest.raises(DomainNotFound):
        await host.guest_ping("nosuchvm", timeout=1)
