"""What the HA engine sees and what it asks for: the world, the actions, the environment.

The engine is pure decision code. An `Environment` gives it a snapshot of the world (`World`) and
carries out its `Action`s. Production implements the environment over etcd (objects, agent
leases, the leader's fencing token) and the fence-agent runner; the simulator implements it over
simulated hosts and a virtual clock. Both run the same `controller.ha.engine_loop.run` loop.

Times are seconds on the controller's monotonic clock (virtual in the simulator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from crds.clusternode import ClusterNodeSpec, NodeHealth
from crds.clusterpolicy import AdmissionPolicy
from crds.virtualmachine import VirtualMachineSpec

FenceHow = Literal["PowerOff", "SelfFence", "ManualAck"]
DrainMode = Literal["migrate", "force"]
VmState = Literal["Running", "Stopped", "Crashed", "Migrating", "Unknown"]
MigrationPhase = Literal["Pending", "Running", "Succeeded", "Failed"]
EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class HaTimings:
    """Timings shared by the agents and the engine; docs/ha.md explains each default."""

    lease_ttl: float = 2.0
    """TTL of each agent's heartbeat lease in etcd."""
    renew_interval: float = 0.5
    """How often an agent renews (keepalive) its lease."""
    self_fence_margin: float = 0.5
    """An agent destroys its VMs at last successful renewal + lease_ttl - self_fence_margin."""
    recovery_grace: float = 1.0
    """After the lease is seen expired, how long the engine waits before trusting a self-fence."""
    watchdog_timeout: float = 1.0
    """A stalled agent's host is reset this long after its last feed (= its last renewal)."""
    fence_retry_initial: float = 1.0
    fence_retry_max: float = 30.0
    max_parallel_migrations: int = 2
    suspect_after: float = 1.0
    """A power-fenced node whose direct heartbeats stopped this long ago is fenced at once."""

    def __post_init__(self) -> None:
        deadline = self.lease_ttl - self.self_fence_margin
        if not 0 < self.renew_interval < deadline:
            raise ValueError(
                f"renew_interval ({self.renew_interval}s) must be positive and below "
                f"lease_ttl - self_fence_margin ({deadline}s)"
            )
        if self.watchdog_timeout > deadline:
            raise ValueError(
                f"watchdog_timeout ({self.watchdog_timeout}s) must not exceed lease_ttl - "
                f"self_fence_margin ({deadline}s): a stalled agent's host must be reset before "
                "its lease can expire"
            )
        if self.recovery_grace <= self.watchdog_timeout - self.self_fence_margin:
            raise ValueError(
                f"recovery_grace ({self.recovery_grace}s) must exceed watchdog_timeout - "
                f"self_fence_margin ({self.watchdog_timeout - self.self_fence_margin}s): an agent "
                "that hangs at its self-fence deadline is reset that much later"
            )
        if self.fence_retry_initial <= 0:
            raise ValueError("fence_retry_initial must be > 0")
        if self.suspect_after <= 0:
            raise ValueError(f"suspect_after must be > 0, got {self.suspect_after}")


def power_fenced(spec: ClusterNodeSpec) -> bool:
    """The engine fences this node by power (methods) rather than relying on self-fencing."""
    return bool(spec.fencing.methods) and not spec.fencing.self_fence


@dataclass(frozen=True)
class Heard:
    """Direct heartbeats from one node, as one observer received them."""

    last: float
    """When the last datagram came."""
    since: float
    """When the current run of datagrams began: the first after a gap of over `break_gap`."""


def break_gap(suspect_after: float) -> float:
    """A gap between two datagrams of one node over this breaks its run (`Heard.since`)."""
    return suspect_after / 2


def silent_nodes(
    heard: Mapping[str, Heard | None], now: float, suspect_after: float
) -> frozenset[str]:
    """The nodes heard before but not for `suspect_after`, as one observer sees them.

    A node is silent only if a strict majority of the nodes (the observer included) are
    *witnesses*: heard now, heard `suspect_after / 2` or more after the silent node's last
    datagram, and heard without a break for the last `suspect_after` at least. So the
    observer's own network demonstrably worked, for as long as it takes to call a node silent,
    while the node stayed silent. An observer cut off hears nobody; one whose cut is staggered
    (the last datagrams of its peers came a little apart) heard nobody well after the first to
    stop; one whose cut just healed (it hears its peers again, one a moment after the others)
    has runs too short. Each takes nobody for dead. An observer whose own event loop stalled
    (every run broken at once) can call a node silent again `suspect_after` after the stall.
    A node never heard (None) is neither silent nor a witness.
    """
    silent = set()
    for node, seen in heard.items():
        if seen is None or now - seen.last < suspect_after:
            continue
        witnesses = sum(
            1
            for other in heard.values()
            if other is not None
            and now - other.last < suspect_after
            and other.last >= seen.last + suspect_after / 2
            and now - other.since >= suspect_after
        )
        if 2 * witnesses > len(heard):
            silent.add(node)
    return frozenset(silent)


@dataclass(frozen=True)
class FenceConfirmation:
    """Why a node is known to run nothing any more (ClusterNode.status.fence)."""

    how: FenceHow
    at: float
    method: str | None = None


@dataclass(frozen=True)
class NodeView:
    name: str
    spec: ClusterNodeSpec
    health: NodeHealth
    """As last written by the engine (ClusterNode.status.health)."""
    fence: FenceConfirmation | None
    """Set by the engine when fencing is confirmed; cleared when the node is Online again."""
    lease_alive: bool
    lease_lost_at: float | None
    """Earliest time this controller knows the lease was gone (None while it is alive)."""
    clean_since: float | None
    """The agent reported, at this time, that it destroyed every domain it found (after a fence)."""
    fence_ack_at: float | None
    """An operator's `kvmctl fence ack NODE`, not yet consumed."""
    domains: frozenset[str]
    """VMs whose qemu process the node's agent last reported (stale once the lease is gone)."""
    cpus: int | None
    memory_mib: int | None
    """Capacity (spec override, else the agent's report); None means unknown (not limited)."""
    drain: DrainMode | None = None
    heard: Heard | None = None
    """The direct heartbeats (UDP, from the node's agent or controller) this controller
    received in the agent's current lease; None if none came since (never suspected then)."""
    storage_lost: Mapping[str, float] = field(default_factory=dict)
    """Storage paths the node's agent reports broken (`vg NAME`, `iscsi TARGET`, `file PATH`,
    as `Disk.storage_path`), each with the time this controller first saw it reported."""


@dataclass(frozen=True)
class MigrationView:
    source: str
    target: str
    phase: MigrationPhase
    message: str = ""


@dataclass(frozen=True)
class VmView:
    name: str
    spec: VirtualMachineSpec
    placement: str | None
    """Where the VM should run (status.placement.node), written by the engine only."""
    state: VmState
    """The agent's last report for this VM."""
    crashed_at: float | None = None
    """When the agent last saw the VM crash (None if it has not crashed since its last start)."""
    restarts: tuple[float, ...] = ()
    relocations: int = 0
    failed: bool = False
    migration: MigrationView | None = None
    disk_conflict: str | None = None
    """The message of the VM's recorded DiskConflict (None: none recorded)."""
    admission_hold: str | None = None
    """The message of the VM's recorded AdmissionHeld condition (None: none recorded)."""


@dataclass(frozen=True)
class FenceResult:
    attempt: int
    node: str
    method: str
    ok: bool
    message: str


@dataclass(frozen=True)
class World:
    now: float
    nodes: dict[str, NodeView]
    vms: dict[str, VmView]
    fence_results: tuple[FenceResult, ...] = ()
    """Results of fence attempts finished since the previous snapshot."""
    admission: AdmissionPolicy | None = None
    """The ClusterPolicy's admission control (None: off)."""


# Actions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetNodeHealth:
    node: str
    health: NodeHealth
    fence: FenceConfirmation | None
    """The confirmation to record (None clears it)."""


@dataclass(frozen=True)
class ClearFenceAck:
    node: str


@dataclass(frozen=True)
class StartFence:
    """Run every device of one fence method (off, then status must say off)."""

    node: str
    method: str
    attempt: int


@dataclass(frozen=True)
class Place:
    """Write the VM's placement (None: stop it). Production adds the leader's fencing token."""

    vm: str
    node: str | None
    relocation: bool = False
    """A restart-policy relocation: count it and forget the in-place restarts."""


@dataclass(frozen=True)
class Restart:
    """Restart a crashed VM where it is placed (recorded in status.restarts)."""

    vm: str


@dataclass(frozen=True)
class SetFailed:
    """Mark or clear the VM's Failed state; clearing also resets its restart counters."""

    vm: str
    failed: bool


@dataclass(frozen=True)
class SetDiskConflict:
    """Record why the VM is not placed: another VM holds one of its disks (None: clear it)."""

    vm: str
    message: str | None


@dataclass(frozen=True)
class SetAdmissionHold:
    """Record why the VM is not started: admission control holds it (None: clear it)."""

    vm: str
    message: str | None


@dataclass(frozen=True)
class Migrate:
    vm: str
    source: str
    target: str


@dataclass(frozen=True)
class ClearMigration:
    vm: str


@dataclass(frozen=True)
class Emit:
    kind: Literal["ClusterNode", "VirtualMachine"]
    name: str
    reason: str
    message: str
    type: EventType = "Normal"


ACKED_BUT_RUNNING = "AckedNodeWasRunning"
"""Warning of an agent that finds its node Fenced by a manual ack while domains still ran."""


def acked_but_running(node: str, destroyed: list[str]) -> list[Emit]:
    """The Warnings an agent records when `kvmctl fence ack` was wrong: on the node and each VM."""
    names = ", ".join(destroyed)
    on_node = Emit(
        "ClusterNode",
        node,
        ACKED_BUT_RUNNING,
        f"{node} was acknowledged as off but found running {names}: destroyed",
        "Warning",
    )
    on_vms = [
        Emit(
            "VirtualMachine",
            vm,
            ACKED_BUT_RUNNING,
            f"{node} was acknowledged as off but still ran {vm}: destroyed there",
            "Warning",
        )
        for vm in destroyed
    ]
    return [on_node, *on_vms]


Action = (
    SetNodeHealth
    | ClearFenceAck
    | StartFence
    | Place
    | Restart
    | SetFailed
    | SetDiskConflict
    | SetAdmissionHold
    | Migrate
    | ClearMigration
    | Emit
)


class Environment(Protocol):
    """What the engine loop needs from the outside world."""

    def now(self) -> float:
        """The controller's monotonic clock, in seconds."""
        ...

    async def observe(self) -> World:
        """A snapshot of nodes, VMs, leases and the fence results finished since last time."""
        ...

    async def apply(self, action: Action) -> None:
        """Carry out one action (write status, start a fence attempt, emit an event)."""
        ...

    async def apply_step(self, actions: Sequence[Action]) -> None:
        """Carry out one step's actions, as `apply` in order would (production writes a run
        of placements together)."""
        ...

    async def wait(self, until: float) -> bool:
        """Sleep until `until` or until something changes; False when the loop must stop."""
        ...
