"""Thin async driver over one libvirt connection (libvirt-python): the names to import.

The only code in kvmctl that talks to libvirt, split by concern into the `libvirt_*` modules
beside this one: libvirt_errors (the error types: `LibvirtUnavailable` means retry after
reconnecting, `DomainNotFound`, `DomainStateConflict`, `InvalidDefinition` is terminal,
`MigrationError`), libvirt_domains (state and info), libvirt_events (lifecycle and watchdog
events, libvirt's event thread), libvirt_connection (opening, closing, subscribing, calls in a
worker thread), libvirt_host (`LibvirtHost` and its domain calls), libvirt_migration and
libvirt_agent (qemu-guest-agent). Import from here.

    async with await LibvirtHost.connect("qemu:///system") as host:
        async with host.events() as events:
            await host.start("vm1")
            async for event in events: ...
"""

from .libvirt_agent import GUEST_PING
from .libvirt_domains import DomainInfo, DomainState, NodeCapacity
from .libvirt_errors import (
    DomainNotFound,
    DomainStateConflict,
    InvalidDefinition,
    InvalidUri,
    LibvirtError,
    LibvirtUnavailable,
    MigrationError,
)
from .libvirt_events import (
    DomainEvent,
    EventStream,
    LifecycleEvent,
    LifecycleEventKind,
    WatchdogEvent,
)
from .libvirt_host import LibvirtHost
from .libvirt_migration import ABORTED_JOB_GRACE, MigrationProgress

__all__ = [
    "ABORTED_JOB_GRACE",
    "GUEST_PING",
    "DomainEvent",
    "DomainInfo",
    "DomainNotFound",
    "DomainState",
    "DomainStateConflict",
    "EventStream",
    "InvalidDefinition",
    "InvalidUri",
    "LibvirtError",
    "LibvirtHost",
    "LibvirtUnavailable",
    "LifecycleEvent",
    "LifecycleEventKind",
    "MigrationError",
    "MigrationProgress",
    "NodeCapacity",
    "WatchdogEvent",
]
