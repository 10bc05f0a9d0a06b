"""IscsiTarget: a shared-storage export served by tgtd on one node."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from .clusternode import SecretKeyRef
from .meta import AbsolutePath, Iqn, Name, Resource, Status, Strict

Portal = Annotated[
    str, StringConstraints(pattern=r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):\d{1,5}$")
]


class Lun(Strict):
    lun: int = Field(ge=1, le=255)
    backing_store: AbsolutePath = Field(alias="backingStore")


class Acl(Strict):
    allow_all: bool = Field(default=False, alias="allowAll")
    initiator_names: list[Iqn] = Field(default_factory=list, alias="initiatorNames")
    initiator_addresses: list[IPv4Address | IPv6Address] = Field(
        default_factory=list, alias="initiatorAddresses"
    )

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
    backing_store: str = Field(alias="backingStore")


class IscsiTargetStatus(Status):
    tid: int | None = None
    luns: list[LunStatus] = Field(default_factory=list)
    sessions: list[str] = Field(default_factory=list)


class IscsiTarget(Resource[IscsiTargetSpec, IscsiTargetStatus]):
    kind: Literal["IscsiTarget"] = "IscsiTarget"
    status: IscsiTargetStatus = Field(default_factory=IscsiTargetStatus)


Protocol = Literal["iscsi"]
