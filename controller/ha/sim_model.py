"""The simulator's objects: settings, hosts, fence devices, qemu processes, VMs, migrations.

A `SimVm` reports every assignment that changes one of its fields to its simulator (`watch`),
so the simulator knows which VMs changed in a tick: it rebuilds only their engine views, lets
only the agents concerned look at them again and re-checks the invariants only for them. Its
values are therefore never mutated in place (`restarts` is a tuple, `SimMigration` frozen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from crds.clusternode import ClusterNodeSpec, NodeHealth
from crds.virtualmachine import VirtualMachineSpec

from .environment import DrainMode, FenceConfirmation, MigrationPhase, VmState

TICKS_PER_SECOND = 10
OFF_HOST = ""
"""The observer name of a controller that runs outside the hosts."""
DeviceBehaviour = Literal["ok", "fail", "timeout"]
QemuPhase = Literal["starting", "running", "incoming"]


@dataclass(frozen=True)
class SimSettings:
    """How long simulated things take (seconds)."""

    boot_seconds: float = 10.0
    start_seconds: float = 0.5
    migrate_seconds: float = 2.0
    election_ttl: float = 5.0
    """TTL of the controllers' leader key (controllers on the hosts only)."""


@dataclass
class SimDevice:
    agent: str
    behaviour: DeviceBehaviour = "ok"
    seconds: float = 0.5
    timeout: float = 60.0


@dataclass(frozen=True)
class Qemu:
    phase: QemuPhase
    ready_at: float = 0.0
    hung_at: float | None = None
    """When the guest stopped answering (`hang`); a reset or restart clears it."""


@dataclass
class Host:
    name: str
    spec: ClusterNodeSpec
    cpus: int | None
    memory_mib: int | None
    devices: dict[str, list[SimDevice]]
    powered: bool = True
    network: bool = True
    agent: bool = True
    boot_done_at: float | None = None
    last_renewal: float | None = 0.0
    lease_until: float | None = None
    """When etcd expires the agent's lease (set from last_renewal at the start)."""
    last_feed: float = 0.0
    self_fenced: bool = False
    self_fence_victims: set[str] = field(default_factory=set)
    """The VMs its agent's self-fence destroyed and has not started again."""
    watchdog_stopped: dict[str, str] = field(default_factory=dict)
    """The VMs their watchdog powered off here, by the failed check, until started again or
    given up (the agent's `GuestHealth.stopped_by`)."""
    reported: frozenset[str] = frozenset()
    clean_since: float | None = None
    cleaned_fence: float | None = None
    """The fence (its confirmation time) the agent last cleaned the node after."""
    fence_ack_at: float | None = None
    drain: DrainMode | None = None
    health: NodeHealth = "Online"
    fence: FenceConfirmation | None = None
    storage_cut: frozenset[str] = frozenset()
    """Storage paths broken on this host (`storage-cut`), as `Disk.storage_path` names them."""
    storage_reported: tuple[tuple[str, float], ...] = ()
    """What its agent last reported lost, each with when it first reported it."""

    def connected(self) -> bool:
        return self.powered and self.agent and self.network


@dataclass(frozen=True)
class SimMigration:
    source: str
    target: str
    done_at: float
    phase: MigrationPhase = "Running"
    message: str = ""


@dataclass
class SimVm:
    name: str
    spec: VirtualMachineSpec
    placement: str | None = None
    state: VmState = "Stopped"
    crashed_at: float | None = None
    restarts: tuple[float, ...] = ()
    relocations: int = 0
    failed: bool = False
    migration: SimMigration | None = None
    down_since: float | None = None
    disk_conflict: str | None = None
    admission_hold: str | None = None
    status_node: str | None = None
    """The node whose agent last wrote the VM's state (the engine believes it only from the
    placement node, as production's environment does)."""
    gave_up_on: str | None = None
    """The node whose agent gave up restarting the VM (`RestartLimitReached`)."""

    def watch(self, changed: Callable[[SimVm], None]) -> None:
        """Call `changed(self)` after every assignment that changes a field."""
        object.__setattr__(self, "_changed", changed)

    def __setattr__(self, name: str, value: object) -> None:
        old = self.__dict__.get(name, _UNSET)
        object.__setattr__(self, name, value)
        changed = self.__dict__.get("_changed")
        if changed is not None and name != "down_since" and old is not value and old != value:
            changed(self)


_UNSET = object()


@dataclass
class FenceRun:
    attempt: int
    node: str
    method: str
    done_at: float
    ok: bool
    message: str
    generation: int = 0
    """The engine that started it; a later engine never sees its result."""
    takeover_by: str | None = None
    """A standby fencing the leader's host, and the term it saw."""
    term: int = 0
