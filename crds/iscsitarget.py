"""IscsiTarget: a shared-storage export served by tgtd on one node."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from .clusternode import SecretKeyRef
from .meta import AbsolutePath, IPAddress, Iqn, Line, Name, Resource, Status, Strict

_PORTAL = re.compile(r"(?P<v4>[0-9.]{7,15})|\[(?P<v6>[0-9a-fA-F:.]{2,45})\]")


def _check_portal(value: str) -> str:
    host, _, port = value.rpartition(":")
    match = _PORTAL.fullmatch(host)
    try:
        if match is None or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            raise ValueError
        if match["v4"] is not None:
            IPv4Address(match["v4"])
        else:
            IPv6Address(match["v6"])
    except ValueError:
        raise ValueError(
            f"portal {value!r} must be IPV4:PORT or [IPV6]:PORT with a port from 1 to 65535"
        ) from None
    return value


Portal = Annotated[str, AfterValidator(_check_portal)]


class Lun(Strict):
    lun: int = Field(ge=1, le=255)
    backing_store: AbsolutePath = Field(alias="backingStore")
    """A file under one of the node's ClusterNode `spec.storage.exportRoots`, or one of its
    `allowedDevices`; anything else is refused before it is exported."""


class Acl(Strict):
    allow_all: bool = Field(default=False, alias="allowAll")
    initiator_names: list[Iqn] = Field(default_factory=list, alias="initiatorNames")
    initiator_addresses: list[IPAddress] = Field(default_factory=list, alias="initiatorAddresses")

    @model_validator(mode="after")
    def _one_way(self) -> Acl:
        if self.allow_all and (self.initiator_names or self.initiator_addresses):
            raise ValueError("allowAll excludes initiatorNames and initiatorAddresses")
        return self


class Chap(Strict):
    username: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
    secret_ref: SecretKeyRef = Field(alias="secretRef")


class IscsiTargetSpec(Strict):
    node: Name
    iqn: Iqn
    portal: Portal = "0.0.0.0:3260"
    luns: list[Lun] = Field(default_factory=list, max_length=255)
    acl: Acl = Field(default_factory=Acl)
    chap: Chap | None = None

    @model_validator(mode="after")
    def _distinct_luns(self) -> IscsiTargetSpec:
        numbers = [lun.lun for lun in self.luns]
        if len(numbers) != len(set(numbers)):
            raise ValueError(f"LUN numbers must be distinct: {numbers}")
        stores = [lun.backing_store for lun in self.luns]
        if len(stores) != len(set(stores)):
            raise ValueError("two LUNs cannot share one backing store")
        return self


class LunStatus(Strict):
    lun: int
    size_bytes: int = Field(alias="sizeBytes")
    backing_store: Line = Field(alias="backingStore")


class IscsiTargetStatus(Status):
    tid: int | None = None
    luns: list[LunStatus] = Field(default_factory=list)
    sessions: list[Line] = Field(default_factory=list)


class IscsiTarget(Resource[IscsiTargetSpec, IscsiTargetStatus]):
    kind: Literal["IscsiTarget"] = "IscsiTarget"
    status: IscsiTargetStatus = Field(default_factory=IscsiTargetStatus)


Protocol = Literal["iscsi"]
