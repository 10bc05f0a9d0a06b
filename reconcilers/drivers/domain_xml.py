"""libvirt domain XML for a kvmctl VM, built with ElementTree from typed input.

No kvmctl model is imported here: the VirtualMachine reconciler turns its object into a
`DomainSpec` and `build_domain_xml` turns that into the XML given to `virDomainDefineXML`.
Every value is placed with ElementTree (element text or attribute), never formatted into a
string, so no value can change the document's structure. Values that XML cannot carry at all
(control characters, for example) are rejected with `DomainSpecError` naming the field.

The owner tags (kvmctl object uid, generation, ...) live in the domain's `<metadata>` under
`METADATA_NAMESPACE`, one `<kvmctl:tag key="..." value="..."/>` per entry, and come back with
`parse_kvmctl_metadata`: attributes carry every XML character unchanged (element text would
turn a carriage return into a newline).
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

METADATA_NAMESPACE = "https://kvmctl.io/xmlns/domain/v1"
"""Namespace URI of kvmctl's element inside the domain's `<metadata>`."""
METADATA_PREFIX = "kvmctl"

DomainType = Literal["kvm", "qemu"]
"""`kvm` in production; `qemu` (TCG, software emulation) where /dev/kvm is unusable."""
WatchdogAction = Literal["reset", "poweroff"]
"""What QEMU does when the guest stops feeding its watchdog device (libvirt's names)."""
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
DiskCache = Literal["none", "writethrough", "writeback", "directsync", "unsafe"]
NicModel = Literal["virtio", "e1000", "rtl8139"]

ET.register_namespace(METADATA_PREFIX, METADATA_NAMESPACE)
_METADATA_ROOT = f"{{{METADATA_NAMESPACE}}}owner"
_METADATA_TAG = f"{{{METADATA_NAMESPACE}}}tag"
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_TARGET_DEV = re.compile(r"^(vd|sd|hd)[a-z]{1,2}$")
_NOT_IN_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
"""Characters XML 1.0 cannot represent, even escaped."""
_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
"""Also control characters, which no name, path or command line needs."""


class DomainSpecError(ValueError):
    """A DomainSpec value libvirt or XML cannot take; the message names the field."""


class DomainXmlError(ValueError):
    """A domain XML document that is not well-formed or not a `<domain>`."""


@dataclass(frozen=True)
class BlockSource:
    """A host block device, such as an LV: `/dev/vg_cluster/lv_vm1`."""

    path: str


@dataclass(frozen=True)
class FileSource:
    """A disk image file on the host."""

    path: str
    format: Literal["raw", "qcow2"] = "raw"


@dataclass(frozen=True)
class IscsiSource:
    """An iSCSI LUN that QEMU opens itself (libiscsi), without a kernel initiator."""

    host: str
    port: int
    iqn: str
    lun: int


DiskSource = BlockSource | FileSource | IscsiSource


@dataclass(frozen=True)
class DiskSpec:
    """One virtio disk of the guest."""

    source: DiskSource
    target_dev: str
    """Guest device name: `vda`, `vdb`, ..."""
    readonly: bool = False
    cache: DiskCache = "none"
    """`none` (O_DIRECT) is what makes live migration on shared storage safe."""


@dataclass(frozen=True)
class NicSpec:
    """One guest NIC attached to a host bridge."""

    bridge: str
    mac: str | None = None
    """None lets libvirt choose one when the domain is defined."""
    model: NicModel = "virtio"


@dataclass(frozen=True)
class DomainSpec:
    """Everything kvmctl puts in a domain definition."""

    name: str
    uuid: str
    domain_type: DomainType
    vcpus: int
    memory_mib: int
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    serial_log: str | None = None
    """Host file receiving the guest's first serial port (appended to, so the log survives
    restarts and migrations); None gives a pty console instead."""
    kernel: str | None = None
    """Direct kernel boot; None boots from the first disk."""
    initrd: str | None = None
    cmdline: str | None = None
    tb_cache_mib: int | None = None
    """Size of TCG's translation block cache (type `qemu` only); None keeps QEMU's default."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Owner tags, such as the kvmctl object's uid and generation."""
    watchdog_action: WatchdogAction | None = None
    """An i6300esb watchdog device with this action; None: no watchdog device."""
    guest_agent: bool = False
    """A virtio-serial channel `org.qemu.guest_agent.0` (libvirt picks the host socket)."""


def build_domain_xml(spec: DomainSpec) -> str:
    """The `<domain>` document for `spec`; raises DomainSpecError on a value it cannot take."""
    _validate(spec)
    domain = ET.Element("domain", type=spec.domain_type)
    _text(domain, "name", spec.name, "name")
    _text(domain, "uuid", str(uuid.UUID(spec.uuid)), "uuid")
    if spec.metadata:
        owner = ET.SubElement(ET.SubElement(domain, "metadata"), _METADATA_ROOT)
        for key, value in spec.metadata.items():
            _checked(key, "metadata key", _NOT_IN_XML)
            _checked(value, f"metadata[{key!r}]", _NOT_IN_XML)
            ET.SubElement(owner, _METADATA_TAG, key=key, value=value)
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    _add_os(domain, spec)
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")  # without it qemu runs with -no-acpi: no graceful shutdown
    if spec.tb_cache_mib is not None:
        tcg = ET.SubElement(features, "tcg")
        ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(spec.tb_cache_mib)
    # A crashed guest stays off: the agent decides about restarts (restart policy).
    for event, action in (("poweroff", "destroy"), ("reboot", "restart"), ("crash", "destroy")):
        ET.SubElement(domain, f"on_{event}").text = action
    devices = ET.SubElement(domain, "devices")
    for index, disk in enumerate(spec.disks):
        _add_disk(devices, disk, f"disks[{index}]")
    for index, nic in enumerate(spec.nics):
        _add_nic(devices, nic, f"nics[{index}]")
    _add_serial(devices, spec.serial_log)
    if spec.guest_agent:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    if spec.watchdog_action is not None:
        ET.SubElement(devices, "watchdog", model="i6300esb", action=spec.watchdog_action)
    return ET.tostring(domain, encoding="unicode")


def parse_kvmctl_metadata(domain_xml: str) -> dict[str, str]:
    """The owner tags kvmctl stored in a domain's XML (empty if it has none)."""
    try:
        domain = ET.fromstring(domain_xml)
    except ET.ParseError as error:
        raise DomainXmlError(f"domain XML is not well-formed: {error}") from None
    if domain.tag != "domain":
        raise DomainXmlError(f"expected a <domain> document, got <{domain.tag}>")
    owner = domain.find(f"metadata/{_METADATA_ROOT}")
    if owner is None:
        return {}
    return {tag.get("key", ""): tag.get("value", "") for tag in owner.iter(_METADATA_TAG)}


def _validate(spec: DomainSpec) -> None:
    if not spec.name or "/" in spec.name:
        raise DomainSpecError(f"name: {spec.name!r} must be non-empty and without '/'")
    try:
        uuid.UUID(spec.uuid)
    except ValueError:
        raise DomainSpecError(f"uuid: {spec.uuid!r} is not a UUID") from None
    if spec.vcpus < 1:
        raise DomainSpecError(f"vcpus: {spec.vcpus} must be at least 1")
    if spec.memory_mib < 1:
        raise DomainSpecError(f"memory_mib: {spec.memory_mib} must be at least 1")
    if spec.tb_cache_mib is not None:
        if spec.domain_type != "qemu":
            raise DomainSpecError("tb_cache_mib: only applies to domain_type 'qemu' (TCG)")
        if spec.tb_cache_mib < 1:
            raise DomainSpecError(f"tb_cache_mib: {spec.tb_cache_mib} must be at least 1")
    if spec.kernel is None and (spec.initrd is not None or spec.cmdline is not None):
        raise DomainSpecError("initrd and cmdline need kernel (direct kernel boot)")
    targets = [disk.target_dev for disk in spec.disks]
    duplicates = sorted({target for target in targets if targets.count(target) > 1})
    if duplicates:
        raise DomainSpecError(f"disks: target_dev used more than once: {', '.join(duplicates)}")


def _checked(value: str, where: str, forbidden: re.Pattern[str] = _CONTROL) -> str:
    bad = forbidden.search(value)
    if bad:
        raise DomainSpecError(
            f"{where}: character U+{ord(bad.group()):04X} at position {bad.start()} is not allowed"
        )
    return value


def _text(parent: ET.Element, tag: str, value: str, where: str) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.text = _checked(value, where)
    return element


def _add_os(domain: ET.Element, spec: DomainSpec) -> None:
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64").text = "hvm"
    if spec.kernel is None:
        ET.SubElement(os_element, "boot", dev="hd")
        return
    _text(os_element, "kernel", spec.kernel, "kernel")
    if spec.initrd is not None:
        _text(os_element, "initrd", spec.initrd, "initrd")
    if spec.cmdline is not None:
        _text(os_element, "cmdline", spec.cmdline, "cmdline")


def _add_disk(devices: ET.Element, disk: DiskSpec, where: str) -> None:
    if not _TARGET_DEV.match(disk.target_dev):
        raise DomainSpecError(f"{where}.target_dev: {disk.target_dev!r} is not like 'vda'")
    source = disk.source
    match source:
        case BlockSource():
            disk_type, image_format = "block", "raw"
        case FileSource():
            disk_type, image_format = "file", source.format
        case IscsiSource():
            disk_type, image_format = "network", "raw"
    element = ET.SubElement(devices, "disk", type=disk_type, device="disk")
    ET.SubElement(element, "driver", name="qemu", type=image_format, cache=disk.cache)
    match source:
        case BlockSource():
            ET.SubElement(element, "source", dev=_checked(source.path, f"{where}.source.path"))
        case FileSource():
            ET.SubElement(element, "source", file=_checked(source.path, f"{where}.source.path"))
        case IscsiSource():
            _add_iscsi_source(element, source, f"{where}.source")
    ET.SubElement(element, "target", dev=disk.target_dev, bus="virtio")
    if disk.readonly:
        ET.SubElement(element, "readonly")


def _add_iscsi_source(disk: ET.Element, source: IscsiSource, where: str) -> None:
    """`<source protocol='iscsi' name='IQN/LUN'><host name=... port=.../></source>`."""
    if "/" in source.iqn:
        raise DomainSpecError(f"{where}.iqn: {source.iqn!r} must not contain '/'")
    if source.lun < 0:
        raise DomainSpecError(f"{where}.lun: {source.lun} must not be negative")
    if not 1 <= source.port <= 65535:
        raise DomainSpecError(f"{where}.port: {source.port} is not a TCP port")
    name = f"{_checked(source.iqn, f'{where}.iqn')}/{source.lun}"
    element = ET.SubElement(disk, "source", protocol="iscsi", name=name)
    host = _checked(source.host, f"{where}.host")
    ET.SubElement(element, "host", name=host, port=str(source.port))


def _add_nic(devices: ET.Element, nic: NicSpec, where: str) -> None:
    interface = ET.SubElement(devices, "interface", type="bridge")
    if nic.mac is not None:
        if not _MAC.match(nic.mac):
            raise DomainSpecError(f"{where}.mac: {nic.mac!r} is not a MAC like 52:54:00:12:34:56")
        ET.SubElement(interface, "mac", address=nic.mac.lower())
    ET.SubElement(interface, "source", bridge=_checked(nic.bridge, f"{where}.bridge"))
    ET.SubElement(interface, "model", type=nic.model)


def _add_serial(devices: ET.Element, serial_log: str | None) -> None:
    if serial_log is None:
        ET.SubElement(devices, "serial", type="pty")
        return
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=_checked(serial_log, "serial_log"), append="on")
