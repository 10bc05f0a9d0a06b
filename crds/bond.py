"""Bond: bonded NICs on one host, optionally under a bridge that carries the addresses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .meta import InterfaceName, IPInterface, Line, Name, Resource, Status, Strict

BondMode = Literal[
    "balance-rr",
    "active-backup",
    "balance-xor",
    "broadcast",
    "802.3ad",
    "balance-tlb",
    "balance-alb",
]


class BridgeSpec(Strict):
    name: InterfaceName
    addresses: list[IPInterface] = Field(default_factory=list, max_length=64)
    stp: bool = False


class BondSpec(Strict):
    node: Name
    interface: InterfaceName
    mode: BondMode = "active-backup"
    miimon: int = Field(default=100, ge=0, le=60000)
    primary: InterfaceName | None = None
    slaves: list[InterfaceName] = Field(min_length=1, max_length=32)
    mtu: int | None = Field(default=None, ge=68, le=65535)
    bridge: BridgeSpec | None = None
    addresses: list[IPInterface] = Field(default_factory=list, max_length=64)
    """Addresses on the bond itself; leave empty when a bridge carries them."""
    allow_disruption: bool = Field(default=False, alias="allowDisruption")

    @model_validator(mode="after")
    def _consistent(self) -> BondSpec:
        if len(set(self.slaves)) != len(self.slaves):
            raise ValueError(f"slaves must be distinct: {self.slaves}")
        if self.interface in self.slaves:
            raise ValueError(f"bond {self.interface!r} cannot be its own slave")
        if self.primary is not None and self.primary not in self.slaves:
            raise ValueError(f"primary {self.primary!r} is not one of the slaves {self.slaves}")
        if self.bridge is not None:
            if self.bridge.name in (self.interface, *self.slaves):
                raise ValueError(
                    f"bridge name {self.bridge.name!r} clashes with the bond or a slave"
                )
            if self.addresses:
                raise ValueError("give the addresses to the bridge when the bond is under a bridge")
        return self


class SlaveStatus(Strict):
    name: Line
    carrier: bool
    active: bool = False


class BondStatus(Status):
    active_slave: Line | None = Field(default=None, alias="activeSlave")
    slaves: list[SlaveStatus] = Field(default_factory=list)


class Bond(Resource[BondSpec, BondStatus]):
    kind: Literal["Bond"] = "Bond"
    status: BondStatus = Field(default_factory=BondStatus)
