"""What the netlink driver reports: its error, and the link, bond, event and address records.

Import these from `reconcilers.drivers.netlink`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BOND_MODES: dict[str, int] = {
    "balance-rr": 0,
    "active-backup": 1,
    "balance-xor": 2,
    "broadcast": 3,
    "802.3ad": 4,
    "balance-tlb": 5,
    "balance-alb": 6,
}
"""Bonding mode names (as in `BONDING_OPTS="mode=..."`) and the kernel's numbers for them."""


class NetlinkDriverError(Exception):
    """A netlink request failed; the message says what, on which link, and why."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Link:
    """One network interface as the kernel reports it."""

    name: str
    index: int
    kind: str | None
    """`bond`, `bridge`, `veth`, ... or None for devices without link info (lo, physical NICs)."""
    master: str | None
    """Name of the bond or bridge this link is enslaved to."""
    operstate: str
    """RFC 2863 state: UP, DOWN, LOWERLAYERDOWN, UNKNOWN, ..."""
    carrier: bool
    up: bool
    """Administratively up (IFF_UP)."""
    mtu: int
    mac: str


@dataclass(frozen=True)
class BondInfo:
    """A bond's settings and live state."""

    mode: str
    miimon: int
    primary: str | None
    active_slave: str | None
    slaves: list[str]


@dataclass(frozen=True)
class LinkEvent:
    """A link that was there when the watch started (`existing`), appeared or changed (`new`),
    or disappeared (`del`)."""

    action: Literal["existing", "new", "del"]
    link: Link


@dataclass(frozen=True)
class Address:
    """An IP address on a link, as `cidr` (`10.0.0.1/24`)."""

    cidr: str
    family: int
