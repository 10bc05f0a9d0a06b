"""VirtualMachine: a libvirt domain with its failover policy."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from .meta import (
    AbsolutePath,
    InterfaceName,
    Line,
    LvmName,
    MacAddress,
    Name,
    Resource,
    Status,
    Strict,
    Text,
    Time,
)
from .volumegroup import IscsiLunRef

DiskTarget = Annotated[str, StringConstraints(pattern=r"^(vd|sd|hd)[a-z]{1,2}$")]
KernelArgs = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f-\x9f]*$", max_length=2048)]


class VolumeRef(Strict):
    vg: LvmName
    lv: LvmName


class Disk(Strict):
    """A VM's disk. A VM uses each source once, and no two VMs share one unless every user has
    it `readonly` (an ISO image): apply refuses such a batch, and the HA controller leaves the
    second VM Pending with a `DiskConflict` condition (docs/ha.md)."""

    target: DiskTarget | None = None
    volume: Annotated[str, StringConstraints(pattern=r"^[^/\s]+/[^/\s]+$")] | None = None
    """`vg_cluster/lv_vm1`: an LV of a VolumeGroup, seen as /dev/VG/LV on the running host."""
    iscsi: IscsiLunRef | None = None
    file: AbsolutePath | None = None
    readonly: bool = False

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Disk:
        sources = [s for s in (self.volume, self.iscsi, self.file) if s is not None]
        if len(sources) != 1:
            raise ValueError("a disk needs exactly one of volume, iscsi or file")
        if self.volume is not None:
            vg, lv = self.volume.split("/")
            VolumeRef(vg=vg, lv=lv)
        return self

    def volume_ref(self) -> VolumeRef | None:
        if self.volume is None:
            return None
        vg, lv = self.volume.split("/")
        return VolumeRef(vg=vg, lv=lv)

    def source(self) -> str:
        """The disk's backing storage in one canonical form, to tell when two disks are one.

        `volume vg/lv`, `iscsi TARGET lun N` or `file /path` (paths are normalised by
        validation); a file `/dev/VG/LV` is the LV's own device node, so it reads as `volume VG/LV`.
        """
        if self.volume is not None:
            return f"volume {self.volume}"
        if self.iscsi is not None:
            return f"iscsi {self.iscsi.target} lun {self.iscsi.lun}"
        assert self.file is not None
        parts = self.file.split("/")
        if len(parts) == 4 and parts[1] == "dev":
            return f"volume {parts[2]}/{parts[3]}"
        return f"file {self.file}"

    def storage_path(self) -> str:
        """The host storage path the disk needs: `vg NAME` (the VG's PVs), `iscsi TARGET` (the
        IscsiTarget object) or `file PATH` (the image and its filesystem)."""
        source = self.source()
        kind, _, rest = source.partition(" ")
        if kind == "volume":
            return f"vg {rest.split('/')[0]}"
        if kind == "iscsi":
            return f"iscsi {rest.split()[0]}"
        return source


class Nic(Strict):
    bridge: InterfaceName
    mac: MacAddress | None = None
    """Unicast, and used by one NIC of one VM only (apply refuses a duplicate)."""
    model: Literal["virtio", "e1000", "rtl8139"] = "virtio"

    @field_validator("mac")
    @classmethod
    def _unicast(cls, mac: str | None) -> str | None:
        if mac is not None and int(mac[:2], 16) & 1:
            raise ValueError(
                f"MAC address {mac!r} is multicast or broadcast (the low bit of its first octet "
                "is set); a NIC needs a unicast address such as 52:54:00:12:34:56"
            )
        return mac


class Boot(Strict):
    """Direct kernel boot (used by the test guests); omit to boot from the first disk."""

    kernel: AbsolutePath
    initrd: AbsolutePath | None = None
    cmdline: KernelArgs = ""


class DomainNode(Strict):
    name: Name
    priority: int = Field(default=1, ge=1, le=100)
    """1 is the most preferred, as in rgmanager failover domains."""


class FailoverDomain(Strict):
    nodes: list[DomainNode] = Field(default_factory=list)
    ordered: bool = False
    restricted: bool = False
    failback: bool = False

    @model_validator(mode="after")
    def _distinct(self) -> FailoverDomain:
        names = [node.name for node in self.nodes]
        if len(names) != len(set(names)):
            raise ValueError(f"failover domain nodes must be distinct: {names}")
        if self.restricted and not self.nodes:
            raise ValueError("a restricted failover domain needs at least one node")
        return self


class MigrationPolicy(Strict):
    allowed: bool = True
    max_downtime_ms: int = Field(default=300, ge=10, le=60000, alias="maxDowntimeMs")


class RestartPolicy(Strict):
    max_restarts: int = Field(default=3, ge=0, le=100, alias="maxRestarts")
    window_seconds: int = Field(default=600, ge=1, le=7 * 86400, alias="windowSeconds")
    """Restarts older than this many seconds (at most a week) no longer count."""
    max_relocations: int = Field(default=3, ge=0, le=100, alias="maxRelocations")


class WatchdogCheck(Strict):
    """A virtual watchdog device the guest must keep feeding (its driver sets the timeout).

    When the guest stops feeding it, QEMU acts (`action`, libvirt's name); the agent counts
    it as a restart of the restart policy and records a `GuestUnresponsive` Warning.
    """

    model: Literal["i6300esb"] = "i6300esb"
    action: Literal["reset", "poweroff"] = "reset"


class GuestAgentCheck(Strict):
    """A qemu-guest-agent `guest-ping` over the `org.qemu.guest_agent.0` virtio-serial port.

    Armed by the guest's first answer after each (re)start, so a guest still booting is not
    reset; after `failures` unanswered pings in a row the agent resets the domain in place.
    """

    interval_seconds: int = Field(default=10, ge=1, le=3600, alias="intervalSeconds")
    """Seconds between pings (a ping waits at most this long for its answer)."""
    failures: int = Field(default=3, ge=1, le=100)
    """Unanswered pings in a row before the guest counts as unresponsive."""


class HealthSpec(Strict):
    """Checks that a running guest still works (docs/ha.md, "Guest health")."""

    watchdog: WatchdogCheck | None = None
    guest_agent: GuestAgentCheck | None = Field(default=None, alias="guestAgent")


RunState = Literal["started", "stopped", "disabled"]


class VirtualMachineSpec(Strict):
    vcpus: int = Field(default=1, ge=1, le=512)
    """Virtual CPUs: at most 512."""
    memory_mib: int = Field(ge=16, le=16 * 1024 * 1024, alias="memoryMiB")
    """Memory in MiB: at most 16 TiB (16777216)."""
    disks: list[Disk] = Field(default_factory=list, max_length=26)
    nics: list[Nic] = Field(default_factory=list, max_length=16)
    boot: Boot | None = None
    run_state: RunState = Field(default="started", alias="runState")
    failover_domain: FailoverDomain = Field(default_factory=FailoverDomain, alias="failoverDomain")
    anti_affinity: list[Name] = Field(default_factory=list, alias="antiAffinity")
    """Names of VMs this one must not share a host with."""
    priority: int = Field(default=0, ge=-1000, le=1000)
    migration: MigrationPolicy = Field(default_factory=MigrationPolicy)
    restart_policy: RestartPolicy = Field(default_factory=RestartPolicy, alias="restartPolicy")
    shutdown_timeout_seconds: int = Field(default=60, ge=0, le=3600, alias="shutdownTimeoutSeconds")
    """Seconds a guest gets to shut down before it is destroyed: at most an hour."""
    health: HealthSpec = Field(default_factory=HealthSpec)
    """Guest checks; a guest failing one is reset in place, counted by `restartPolicy`."""

    def storage_paths(self) -> frozenset[str]:
        """The host storage paths the VM's disks need (`Disk.storage_path`)."""
        return frozenset(disk.storage_path() for disk in self.disks)

    @model_validator(mode="after")
    def _distinct_targets(self) -> VirtualMachineSpec:
        targets = [disk.target for disk in self.disks if disk.target is not None]
        if len(targets) != len(set(targets)):
            raise ValueError(f"disk targets must be distinct: {targets}")
        _refuse_twice("disk", [disk.source() for disk in self.disks])
        _refuse_twice("MAC address", [nic.mac.lower() for nic in self.nics if nic.mac])
        return self


def _refuse_twice(what: str, values: list[str]) -> None:
    if len(set(values)) == len(values):
        return  # the usual case, and every agent validates every VM's every change
    twice = sorted(value for value, count in Counter(values).items() if count > 1)
    if twice:
        raise ValueError(f"{what} {twice[0]} appears twice; each must be used once in a VM")


class Placement(Strict):
    node: Name
    token: int
    """The leader's fencing token (its election key's create revision) that wrote it."""
    since: Time


class VirtualMachineStatus(Status):
    placement: Placement | None = None
    """Where the VM should run; written only by the elected controller."""
    node: Line | None = None
    """Where the agent last saw the domain running."""
    state: Literal["Running", "Stopped", "Paused", "Crashed", "Migrating", "Unknown"] = "Unknown"
    domain_uuid: Line | None = Field(default=None, alias="domainUUID")
    restarts: list[Time] = Field(default_factory=list)
    """Times of in-place restarts inside the restart policy's window."""
    relocations: int = 0
    running_generation: int | None = Field(default=None, alias="runningGeneration")
    message: Text = ""


class VirtualMachine(Resource[VirtualMachineSpec, VirtualMachineStatus]):
    kind: Literal["VirtualMachine"] = "VirtualMachine"
    status: VirtualMachineStatus = Field(default_factory=VirtualMachineStatus)
