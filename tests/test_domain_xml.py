"""Domain XML from DomainSpec: structure, validation, and values that try to break out."""

from __future__ import annotations

import dataclasses
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconcilers.drivers.domain_xml import (
    METADATA_NAMESPACE,
    BlockSource,
    DiskSpec,
    DomainSpec,
    DomainSpecError,
    DomainXmlError,
    FileSource,
    IscsiSource,
    NicSpec,
    build_domain_xml,
    parse_kvmctl_metadata,
)

VM_UUID = "6f1c1c0e-8a53-4a4e-9d7b-3f0b2b9c1e11"
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
NOT_IN_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def full_spec() -> DomainSpec:
    return DomainSpec(
        name="vm1",
        uuid=VM_UUID,
        domain_type="qemu",
        vcpus=2,
        memory_mib=256,
        disks=(
            DiskSpec(BlockSource("/dev/vg_cluster/lv_vm1"), "vda"),
            DiskSpec(IscsiSource("127.0.0.1", 3260, "iqn.2024-01.io.kvmctl:store", 1), "vdb"),
            DiskSpec(FileSource("/var/lib/kvmctl/seed.img"), "vdc", readonly=True),
        ),
        nics=(NicSpec("br0", "52:54:00:AA:bb:01"),),
        serial_log="/var/log/kvmctl/vm1.log",
        kernel="/boot/vmlinuz",
        initrd="/boot/initrd.img",
        cmdline="console=ttyS0 quiet",
        tb_cache_mib=16,
        metadata={"uid": "3c2e", "generation": "7"},
    )


def test_full_spec_gives_the_expected_domain() -> None:
    domain = ET.fromstring(build_domain_xml(full_spec()))

    assert domain.tag == "domain"
    assert domain.get("type") == "qemu"
    assert domain.findtext("name") == "vm1"
    assert domain.findtext("uuid") == VM_UUID
    assert domain.find("memory").attrib == {"unit": "MiB"}  # type: ignore[union-attr]
    assert domain.findtext("memory") == "256"
    assert domain.findtext("vcpu") == "2"
    assert domain.findtext("os/kernel") == "/boot/vmlinuz"
    assert domain.findtext("os/initrd") == "/boot/initrd.img"
    assert domain.findtext("os/cmdline") == "console=ttyS0 quiet"
    assert domain.find("os/boot") is None
    assert domain.findtext("features/tcg/tb-cache") == "16"
    assert domain.findtext("on_crash") == "destroy"

    block, iscsi, image = domain.findall("devices/disk")
    assert block.get("type") == "block"
    assert block.find("source").attrib == {"dev": "/dev/vg_cluster/lv_vm1"}  # type: ignore[union-attr]
    assert block.find("driver").attrib == {"name": "qemu", "type": "raw", "cache": "none"}  # type: ignore[union-attr]
    assert iscsi.get("type") == "network"
    assert iscsi.find("source").attrib == {  # type: ignore[union-attr]
        "protocol": "iscsi",
        "name": "iqn.2024-01.io.kvmctl:store/1",
    }
    assert iscsi.find("source/host").attrib == {"name": "127.0.0.1", "port": "3260"}  # type: ignore[union-attr]
    assert image.get("type") == "file"
    assert image.find("readonly") is not None
    assert [disk.find("target").attrib for disk in (block, iscsi, image)] == [  # type: ignore[union-attr]
        {"dev": dev, "bus": "virtio"} for dev in ("vda", "vdb", "vdc")
    ]

    interface = domain.find("devices/interface")
    assert interface is not None
    assert interface.get("type") == "bridge"
    assert interface.find("mac").attrib == {"address": "52:54:00:aa:bb:01"}  # type: ignore[union-attr]
    assert interface.find("source").attrib == {"bridge": "br0"}  # type: ignore[union-attr]
    assert interface.find("model").attrib == {"type": "virtio"}  # type: ignore[union-attr]

    serial = domain.find("devices/serial")
    assert serial is not None
    assert serial.get("type") == "file"
    assert serial.find("source").attrib == {"path": "/var/log/kvmctl/vm1.log", "append": "on"}  # type: ignore[union-attr]

    assert parse_kvmctl_metadata(build_domain_xml(full_spec())) == {
        "uid": "3c2e",
        "generation": "7",
    }


def test_minimal_spec_boots_from_disk_with_a_pty_console() -> None:
    spec = DomainSpec(name="small", uuid=VM_UUID, domain_type="kvm", vcpus=1, memory_mib=128)
    domain = ET.fromstring(build_domain_xml(spec))

    assert domain.get("type") == "kvm"
    assert domain.find("os/boot").attrib == {"dev": "hd"}  # type: ignore[union-attr]
    assert domain.find("os/kernel") is None
    assert [f.tag for f in domain.find("features")] == ["acpi"]  # type: ignore[union-attr]
    assert domain.find("metadata") is None
    assert domain.find("devices/serial").attrib == {"type": "pty"}  # type: ignore[union-attr]
    assert parse_kvmctl_metadata(build_domain_xml(spec)) == {}


def test_metadata_lives_in_the_kvmctl_namespace() -> None:
    xml = build_domain_xml(full_spec())
    owner = ET.fromstring(xml).find("metadata")[0]  # type: ignore[index]
    assert owner.tag == f"{{{METADATA_NAMESPACE}}}owner"
    assert 'xmlns:kvmctl="https://kvmctl.io/xmlns/domain/v1"' in xml


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "name: ''"),
        ({"name": "a/b"}, "name: 'a/b'"),
        ({"uuid": "not-a-uuid"}, "uuid: 'not-a-uuid' is not a UUID"),
        ({"vcpus": 0}, "vcpus: 0"),
        ({"memory_mib": 0}, "memory_mib: 0"),
        ({"domain_type": "kvm"}, "tb_cache_mib: only applies to domain_type 'qemu'"),
        ({"kernel": None}, "initrd and cmdline need kernel"),
        ({"disks": (DiskSpec(BlockSource("/dev/a"), "vda"),) * 2}, "target_dev used more"),
        ({"disks": (DiskSpec(BlockSource("/dev/a"), "xvda"),)}, "disks[0].target_dev: 'xvda'"),
        (
            {"disks": (DiskSpec(IscsiSource("h", 3260, "iqn.2024-01.x:a/b", 1), "vda"),)},
            "disks[0].source.iqn: 'iqn.2024-01.x:a/b' must not contain '/'",
        ),
        (
            {"disks": (DiskSpec(IscsiSource("h", 0, "iqn.2024-01.x:a", 1), "vda"),)},
            "disks[0].source.port: 0 is not a TCP port",
        ),
        ({"nics": (NicSpec("br0"), NicSpec("br1", "52:54:00"))}, "nics[1].mac: '52:54:00'"),
        ({"serial_log": "/log\n"}, "serial_log: character U+000A at position 4"),
        ({"metadata": {"uid": "a\x00b"}}, "metadata['uid']: character U+0000"),
    ],
)
def test_bad_values_get_one_error_naming_the_field(change: dict[str, Any], message: str) -> None:
    spec = dataclasses.replace(full_spec(), **change)
    with pytest.raises(DomainSpecError) as raised:
        build_domain_xml(spec)
    assert message in str(raised.value)


def test_parse_metadata_rejects_what_is_not_a_domain() -> None:
    with pytest.raises(DomainXmlError, match="not well-formed"):
        parse_kvmctl_metadata("<domain")
    with pytest.raises(DomainXmlError, match="expected a <domain> document, got <network>"):
        parse_kvmctl_metadata("<network/>")


def shape(element: ET.Element) -> tuple[Any, ...]:
    """Tags and attribute names of a tree, without values."""
    return (element.tag, sorted(element.attrib), [shape(child) for child in element])


FUZZED_FIELDS: dict[str, tuple[Callable[[str], DomainSpec], Callable[[ET.Element], str | None]]] = {
    "name": (
        lambda value: dataclasses.replace(full_spec(), name=value),
        lambda domain: domain.findtext("name"),
    ),
    "kernel": (
        lambda value: dataclasses.replace(full_spec(), kernel=value),
        lambda domain: domain.findtext("os/kernel"),
    ),
    "cmdline": (
        lambda value: dataclasses.replace(full_spec(), cmdline=value),
        lambda domain: domain.findtext("os/cmdline"),
    ),
    "serial_log": (
        lambda value: dataclasses.replace(full_spec(), serial_log=value),
        lambda domain: domain.find("devices/serial/source").get("path"),  # type: ignore[union-attr]
    ),
    "block path": (
        lambda value: dataclasses.replace(
            full_spec(), disks=(DiskSpec(BlockSource(value), "vda"), *full_spec().disks[1:])
        ),
        lambda domain: domain.find("devices/disk/source").get("dev"),  # type: ignore[union-attr]
    ),
    "iscsi host": (
        lambda value: dataclasses.replace(
            full_spec(),
            disks=(
                DiskSpec(IscsiSource(value, 3260, "iqn.2024-01.x:t", 0), "vda"),
                *full_spec().disks[1:],
            ),
        ),
        lambda domain: domain.find("devices/disk/source/host").get("name"),  # type: ignore[union-attr]
    ),
    "bridge": (
        lambda value: dataclasses.replace(full_spec(), nics=(NicSpec(value),)),
        lambda domain: domain.find("devices/interface/source").get("bridge"),  # type: ignore[union-attr]
    ),
}
HOSTILE_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from("<>&'\"/;=]]>\r\n\t -"), st.characters()), min_size=1
)


@pytest.mark.parametrize("field", sorted(FUZZED_FIELDS))
@given(value=HOSTILE_TEXT)
def test_no_value_changes_the_document_structure(field: str, value: str) -> None:
    make_spec, read_back = FUZZED_FIELDS[field]
    reference = shape(ET.fromstring(build_domain_xml(make_spec("plain"))))
    rejected = bool(CONTROL_CHARACTERS.search(value)) or (field == "name" and "/" in value)
    try:
        xml = build_domain_xml(make_spec(value))
    except DomainSpecError:
        assert rejected
        return
    assert not rejected
    domain = ET.fromstring(xml)
    assert shape(domain) == reference
    assert read_back(domain) == value


@given(metadata=st.dictionaries(HOSTILE_TEXT, st.text(), max_size=5))
def test_metadata_round_trips_every_xml_character(metadata: dict[str, str]) -> None:
    spec = dataclasses.replace(full_spec(), metadata=metadata)
    rejected = any(NOT_IN_XML.search(text) for item in metadata.items() for text in item)
    try:
        xml = build_domain_xml(spec)
    except DomainSpecError:
        assert rejected
        return
    assert not rejected
    assert parse_kvmctl_metadata(xml) == metadata
    assert shape(ET.fromstring(xml).find("devices")) == shape(  # type: ignore[arg-type]
        ET.fromstring(build_domain_xml(full_spec())).find("devices")  # type: ignore[arg-type]
    )


def test_uuid_is_written_in_canonical_form() -> None:
    spec = dataclasses.replace(full_spec(), uuid=uuid.UUID(VM_UUID).hex.upper())
    assert ET.fromstring(build_domain_xml(spec)).findtext("uuid") == VM_UUID


def test_health_checks_add_a_watchdog_device_and_a_guest_agent_channel() -> None:
    plain = ET.fromstring(build_domain_xml(full_spec()))
    assert plain.find("devices/watchdog") is None
    assert plain.find("devices/channel") is None
    spec = dataclasses.replace(full_spec(), watchdog_action="poweroff", guest_agent=True)
    devices = ET.fromstring(build_domain_xml(spec)).find("devices")
    assert devices is not None
    watchdog = devices.find("watchdog")
    assert watchdog is not None and watchdog.attrib == {"model": "i6300esb", "action": "poweroff"}
    target = devices.find("channel[@type='unix']/target")
    assert target is not None
    assert target.attrib == {"type": "virtio", "name": "org.qemu.guest_agent.0"}
