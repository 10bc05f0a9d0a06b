"""VolumeGroup: LVM on shared storage, one logical volume per VM disk."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .meta import AbsolutePath, Line, LvmName, Name, Resource, Size, Status, Strict


class IscsiLunRef(Strict):
    target: Name
    lun: int = Field(ge=1, le=255)


class PhysicalVolume(Strict):
    device: AbsolutePath | None = None
    iscsi: IscsiLunRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PhysicalVolume:
        if (self.device is None) == (self.iscsi is None):
            raise ValueError("a physical volume needs exactly one of device or iscsi")
        return self


class LogicalVolume(Strict):
    name: LvmName
    size: Size


class VolumeGroupSpec(Strict):
    vg_name: LvmName = Field(alias="vgName")
    nodes: list[Name] = Field(default_factory=list)
    """Hosts that see the shared storage; empty means every node."""
    physical_volumes: list[PhysicalVolume] = Field(min_length=1, alias="physicalVolumes")
    logical_volumes: list[LogicalVolume] = Field(default_factory=list, alias="logicalVolumes")

    @model_validator(mode="after")
    def _distinct(self) -> VolumeGroupSpec:
        names = [lv.name for lv in self.logical_volumes]
        if len(names) != len(set(names)):
            raise ValueError(f"logical volume names must be distinct: {names}")
        return self


class LogicalVolumeStatus(Strict):
    name: Line
    size_bytes: int = Field(alias="sizeBytes")
    active_on: Line | None = Field(default=None, alias="activeOn")


class VolumeGroupStatus(Status):
    size_bytes: int | None = Field(default=None, alias="sizeBytes")
    free_bytes: int | None = Field(default=None, alias="freeBytes")
    logical_volumes: list[LogicalVolumeStatus] = Field(default_factory=list, alias="logicalVolumes")


class VolumeGroup(Resource[VolumeGroupSpec, VolumeGroupStatus]):
    kind: Literal["VolumeGroup"] = "VolumeGroup"
    status: VolumeGroupStatus = Field(default_factory=VolumeGroupStatus)
