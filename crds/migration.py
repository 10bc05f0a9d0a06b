"""VirtualMachineMigration: one request to live-migrate a VM (like KubeVirt's VMIM)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .meta import Line, Name, Resource, Status, Strict, Text, Time


class VirtualMachineMigrationSpec(Strict):
    vm: Name
    target_node: Name = Field(alias="targetNode")


MigrationPhase = Literal["Pending", "Scheduled", "Running", "Succeeded", "Failed"]

PLACEMENT_SWITCHED = "PlacementSwitched"
"""Condition the leader sets on a Succeeded migration once the VM's placement moved."""
VOLUMES_ACTIVATED = "VolumesActivated"
"""Condition the target's agent sets on a Running migration: True once it holds the VM's LVs,
False (`VolumeActivationFailed`) if it could not take them, False (`Released`) once it
deactivated them again after the migration failed."""


class VirtualMachineMigrationStatus(Status):
    phase: MigrationPhase = "Pending"
    source_node: Line | None = Field(default=None, alias="sourceNode")
    progress_percent: int = Field(default=0, alias="progressPercent")
    data_remaining_bytes: int | None = Field(default=None, alias="dataRemainingBytes")
    data_processed_bytes: int | None = Field(default=None, alias="dataProcessedBytes")
    """Bytes sent so far (libvirt's job statistics): `migrate --wait` shows the rate from it."""
    started_at: Time | None = Field(default=None, alias="startedAt")
    finished_at: Time | None = Field(default=None, alias="finishedAt")
    message: Text = ""


class VirtualMachineMigration(Resource[VirtualMachineMigrationSpec, VirtualMachineMigrationStatus]):
    kind: Literal["VirtualMachineMigration"] = "VirtualMachineMigration"
    status: VirtualMachineMigrationStatus = Field(default_factory=VirtualMachineMigrationStatus)
