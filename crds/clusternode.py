"""ClusterNode: a KVM host, its addresses and its ordered fencing methods."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from . import fence_syntax
from .libvirt_uri import check_peer_uri
from .meta import AbsolutePath, IPAddress, Line, Name, Resource, Status, Strict, Text, Time

# Fence-agent parameters that carry credentials: they may only come from a Secret.
SECRET_PARAMETER = re.compile(r"(passw|secret|community|key$|token)", re.IGNORECASE)


def _plain_value(value: str) -> str:
    problem = fence_syntax.value_problem(value) or fence_syntax.plain_value_problem(value)
    if problem:
        raise ValueError(f"value {value!r} {problem}")
    return value


# pydantic's (Rust) patterns: `$` is the end of the text, a trailing newline does not match.
FenceAgentName = Annotated[str, StringConstraints(pattern=f"^{fence_syntax.AGENT_NAME.pattern}$")]
ParameterName = Annotated[
    str, StringConstraints(pattern=f"^{fence_syntax.PARAMETER_NAME.pattern}$")
]
ParameterValue = Annotated[str, AfterValidator(_plain_value)]
LibvirtUri = Annotated[str, AfterValidator(check_peer_uri)]
"""A URI peers may migrate to: transports and parameters of crds/libvirt_uri.py."""


class SecretKeyRef(Strict):
    name: Name
    key: Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]{1,253}$")]


class FenceDevice(Strict):
    agent: FenceAgentName
    parameters: dict[ParameterName, ParameterValue] = Field(default_factory=dict)
    secret_parameters: dict[ParameterName, SecretKeyRef] = Field(
        default_factory=dict, alias="secretParameters"
    )
    timeout_seconds: int = Field(default=60, ge=1, le=600, alias="timeoutSeconds")

    @model_validator(mode="after")
    def _no_inline_secrets(self) -> FenceDevice:
        for name in self.parameters:
            if SECRET_PARAMETER.search(name):
                raise ValueError(
                    f"parameter {name!r} is a credential: give it under secretParameters "
                    "as a reference to a Secret, never inline"
                )
        for name in [*self.parameters, *self.secret_parameters]:
            if name in fence_syntax.RESERVED_PARAMETERS:
                raise ValueError(f"parameter {name!r} is chosen by kvmctl, not by the manifest")
        overlap = set(self.parameters) & set(self.secret_parameters)
        if overlap:
            raise ValueError(f"parameters given both inline and as secrets: {sorted(overlap)}")
        return self


class FenceMethod(Strict):
    name: Name
    devices: list[FenceDevice] = Field(min_length=1)


class StorageLossPolicy(Strict):
    """What the HA controller does when the node's agent reports a storage path lost that a VM
    placed there needs (docs/ha.md, "Storage-path loss")."""

    action: Literal["warn", "fence"] = "warn"
    """`fence`: power the node off, then recover its VMs on nodes whose path is healthy (only
    with power fencing methods, and only when such a node exists); `warn`: a Warning only."""
    grace_seconds: int = Field(default=10, ge=0, le=3600, alias="graceSeconds")
    """How long the path must have been seen lost before the node is fenced."""


class Fencing(Strict):
    methods: list[FenceMethod] = Field(default_factory=list)
    self_fence: bool = Field(default=False, alias="selfFence")
    """Allow recovery after the lease expired plus the self-fence deadline (needs a watchdog)."""
    storage_loss: StorageLossPolicy = Field(default_factory=StorageLossPolicy, alias="storageLoss")

    @model_validator(mode="after")
    def _distinct_methods(self) -> Fencing:
        names = [method.name for method in self.methods]
        if len(names) != len(set(names)):
            raise ValueError(f"fencing method names must be distinct: {names}")
        return self


class NodeAddresses(Strict):
    cluster: IPAddress
    public: IPAddress | None = None


class Capacity(Strict):
    cpus: int = Field(ge=1, le=4096)
    memory_mib: int = Field(ge=64, le=64 * 1024 * 1024, alias="memoryMiB")
    """Memory in MiB: at most 64 TiB (67108864)."""


UNEXPORTABLE = ("/etc", "/proc", "/sys", "/boot")
"""Folders no export root may be or lie under."""
TOO_WIDE = ("/", "/dev", "/root", "/home", "/usr", "/var")
"""Folders too wide to be export roots themselves (a folder inside them may be one)."""


def exportable_root(path: str) -> bool:
    """Whether a folder may be an export root (see UNEXPORTABLE and TOO_WIDE)."""
    return path not in TOO_WIDE and not any(
        path == folder or path.startswith(f"{folder}/") for folder in UNEXPORTABLE
    )


def _check_export_root(value: str) -> str:
    if not exportable_root(value):
        raise ValueError(f"{value!r} cannot be an export root: it holds the system's own files")
    return value


class StorageExports(Strict):
    """What IscsiTargets on this node may export (written by the admin). Empty: nothing.

    The node's agent checks every backing store, symlinks resolved, before it exports it.
    """

    export_roots: list[Annotated[AbsolutePath, AfterValidator(_check_export_root)]] = Field(
        default_factory=list, max_length=64, alias="exportRoots"
    )
    """Folders whose files (at any depth) may back LUNs."""
    allowed_devices: list[AbsolutePath] = Field(
        default_factory=list, max_length=1024, alias="allowedDevices"
    )
    """Block devices that may back LUNs, each exactly (a symlink resolves to its device)."""


class ClusterNodeSpec(Strict):
    addresses: NodeAddresses
    capacity: Capacity | None = None
    """Overrides what the agent reports from libvirt."""
    cordoned: bool = False
    storage: StorageExports = Field(default_factory=StorageExports)
    """What IscsiTargets served by this node may export; by default nothing."""
    fencing: Fencing = Field(default_factory=Fencing)
    libvirt_uri: LibvirtUri | None = Field(default=None, alias="libvirtUri")
    """How peers reach this host's libvirtd for migration (`qemu+tcp://10.0.0.1/system`); the
    agent reports it when unset. No `command=`, `socket=` or other program-choosing parameter."""


NodeHealth = Literal["Online", "Unknown", "Fencing", "Fenced", "Offline"]


class FenceRecord(Strict):
    method: Line | None = None
    confirmed_at: Time | None = Field(default=None, alias="confirmedAt")
    how: Literal["PowerOff", "SelfFence", "ManualAck"] | None = None
    token: int | None = None


class LostStoragePath(Strict):
    """A storage path the node's agent found broken (`vg NAME`, `iscsi TARGET`, `file PATH`)."""

    path: Line
    since: Time
    """When the agent first found it broken (its own clock)."""
    message: Text = ""


class ClusterNodeStatus(Status):
    health: NodeHealth = "Unknown"
    capacity: Capacity | None = None
    agent_version: Line | None = Field(default=None, alias="agentVersion")
    libvirt_uri: LibvirtUri | None = Field(default=None, alias="libvirtUri")
    migration_address: Line | None = Field(default=None, alias="migrationAddress")
    last_heartbeat_time: Time | None = Field(default=None, alias="lastHeartbeatTime")
    fence: FenceRecord | None = None
    message: Text = ""
    storage_lost: list[LostStoragePath] = Field(
        default_factory=list, max_length=1024, alias="storageLost"
    )
    """Written by the agent with the `StorageReachable` condition: the paths it lost."""


class ClusterNode(Resource[ClusterNodeSpec, ClusterNodeStatus]):
    kind: Literal["ClusterNode"] = "ClusterNode"
    status: ClusterNodeStatus = Field(default_factory=ClusterNodeStatus)
