"""What the libvirt driver reports about domains and the host: state, info, capacity."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import libvirt

from .domain_xml import parse_kvmctl_metadata


class DomainState(StrEnum):
    """A domain's state as `virDomainGetState` reports it."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"


_DOMAIN_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


def domain_state(number: int) -> DomainState:
    """The DomainState of libvirt's `VIR_DOMAIN_*` state number (NOSTATE if unknown)."""
    return _DOMAIN_STATES.get(number, DomainState.NOSTATE)


@dataclass(frozen=True)
class NodeCapacity:
    """What the host offers to guests."""

    cpus: int
    memory_mib: int
    hostname: str


@dataclass(frozen=True)
class DomainInfo:
    """One domain defined (or running transiently) on the host."""

    name: str
    uuid: str
    state: DomainState
    metadata: dict[str, str]
    """kvmctl's owner tags from the domain XML (see domain_xml); empty for foreign domains."""


def domain_info(domain: Any) -> DomainInfo:
    """The DomainInfo of a libvirt.virDomain (blocking: three libvirt calls)."""
    return DomainInfo(
        name=str(domain.name()),
        uuid=str(domain.UUIDString()),
        state=domain_state(domain.state()[0]),
        metadata=parse_kvmctl_metadata(domain.XMLDesc(0)),
    )
