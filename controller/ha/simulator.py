"""Simulated hosts, agents, fence devices and a virtual clock, behind the engine's Environment.

Each host models what really runs there: which VMs have a qemu process (starting, running, or
an incoming migration), whether it is powered, whether its agent runs and reaches etcd. The
simulated agents renew their lease and report their domains; everything they decide is the
shipped agent's rules, called here as the real agent calls them: what to do with each domain
and when starting is allowed (`controller/ha/agent_rules.py`: start what is placed here,
restart a crashed guest in place per its restart policy, destroy what is not placed here),
the self-fence deadline and the watchdog feed rule (`controller/runtime/self_fence.py`), and
cleaning a node found Fenced. Time advances in ticks of 0.1 s.

Direct heartbeats: a powered, booted host whose agent (or controller) runs and whose network
is up is heard by every controller on the network, each tick. Controllers either run outside
the hosts (the default: one leader that never dies unless told to) or on the hosts named in
`controllers` (the first leads at time 0): then a host's power cut kills its controller, a
leader cut off from etcd stops acting, its key expires `election_ttl` after its last renewal,
and a standby that finds a power-fenced leader's host silent fences it and takes over at once
(docs/ha.md). `etcd_election(seconds)` models etcd losing its leader: nothing renews or
expires meanwhile, then etcd extends every lease by its TTL.

Invariants are checked as the simulation runs; violations are logged and kept in
`Simulator.violations`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from controller.exclusive import Claims
from controller.runtime.self_fence import lease_valid, may_feed_watchdog
from crds.clusternode import ClusterNodeSpec, NodeHealth
from crds.clusterpolicy import AdmissionPolicy
from crds.virtualmachine import VirtualMachineSpec

from .agent_rules import (
    DomainAction,
    DomainFacts,
    decide_domain,
    first_failing_check,
    gave_up_message,
    must_clean_after_fence,
    recent_restarts,
    restarted_message,
    start_blocker,
    unresponsive_message,
)
from .environment import (
    Action,
    ClearFenceAck,
    ClearMigration,
    DrainMode,
    Emit,
    FenceConfirmation,
    FenceResult,
    HaTimings,
    Migrate,
    MigrationPhase,
    MigrationView,
    NodeView,
    Place,
    Restart,
    SetAdmissionHold,
    SetDiskConflict,
    SetFailed,
    SetNodeHealth,
    StartFence,
    VmState,
    VmView,
    World,
    acked_but_running,
    power_fenced,
    silent_nodes,
)

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


@dataclass
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
    qemu: dict[str, Qemu] = field(default_factory=dict)
    last_renewal: float | None = 0.0
    lease_until: float | None = None
    """When etcd expires the agent's lease (set from last_renewal at the start)."""
    last_feed: float = 0.0
    self_fenced: bool = False
    reported: frozenset[str] = frozenset()
    clean_since: float | None = None
    cleaned_fence: float | None = None
    """The fence (its confirmation time) the agent last cleaned the node after."""
    fence_ack_at: float | None = None
    drain: DrainMode | None = None
    health: NodeHealth = "Online"
    fence: FenceConfirmation | None = None

    def connected(self) -> bool:
        return self.powered and self.agent and self.network

    def executing(self) -> set[str]:
        """VMs with a guest that runs or is about to run here (incoming migrations excluded)."""
        if not self.powered:
            return set()
        return {name for name, q in self.qemu.items() if q.phase != "incoming"}


@dataclass
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
    restarts: list[float] = field(default_factory=list)
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


@dataclass
class _FenceRun:
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


class Simulator:
    """An `Environment` over simulated hosts; drive it with `controller.ha.engine.run`."""

    def __init__(
        self,
        hosts: list[Host],
        vms: list[SimVm],
        timings: HaTimings,
        settings: SimSettings,
        end: float,
        log: Callable[[str], None] | None = None,
        controllers: list[str] | None = None,
    ) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.vms = {v.name: v for v in vms}
        self.timings = timings
        self.settings = settings
        self.tick = 0
        self.end_tick = round(end * TICKS_PER_SECOND)
        self.lines: list[str] = []
        self.violations: list[str] = []
        self._log_sink = log
        self._commands: dict[int, list[Callable[[], None]]] = {}
        self._fence_runs: list[_FenceRun] = []
        self._fence_results: list[FenceResult] = []
        self._lost_seen: dict[str, float] = {}
        self._controller_since = 0.0
        self._restart_controller = False
        self._doubled: set[str] = set()
        self._sharing: set[tuple[str, str]] = set()
        self.admission: AdmissionPolicy | None = None
        """The ClusterPolicy's admission control the engine sees (None: off)."""
        self.controllers = list(controllers or [])
        """Hosts that run a controller; empty: one controller outside the hosts."""
        self.leader = self.controllers[0] if self.controllers else OFF_HOST
        self.term = 1
        self._leader_alive = True
        self._key_until = settings.election_ttl
        self._new_term = False
        self._generation = 0
        self._heard: dict[str, dict[str, float]] = {}
        self._etcd_down: tuple[float, float] | None = None
        self._takeover_method: dict[tuple[str, int], int] = {}
        for host in hosts:
            if host.last_renewal is not None:
                host.lease_until = host.last_renewal + timings.lease_ttl
        for vm in vms:
            if vm.placement is not None and vm.spec.run_state == "started":
                self.hosts[vm.placement].qemu[vm.name] = Qemu("running")
                vm.state, vm.status_node = "Running", vm.placement
        for host in hosts:
            host.reported = frozenset(host.qemu)
        self._check_disks()

    # Clock and log ----------------------------------------------------------------------------

    def now(self) -> float:
        return self.tick / TICKS_PER_SECOND

    def log(self, subject: str, text: str) -> None:
        line = f"{self.now():7.1f}  {subject:<22} {text}"
        self.lines.append(line)
        if self._log_sink is not None:
            self._log_sink(line)

    def violation(self, text: str) -> None:
        self.violations.append(f"{self.now():.1f}: {text}")
        self.log("INVARIANT", text)

    def at(self, when: float, command: Callable[[], None]) -> None:
        """Run `command` at virtual time `when` (before the engine looks at that tick)."""
        tick = max(round(when * TICKS_PER_SECOND), self.tick)
        self._commands.setdefault(tick, []).append(command)

    def restart_controller(self) -> None:
        """The leader dies and another takes over: the engine's memory is lost."""
        self._restart_controller = True
        self._new_engine()

    def _new_engine(self) -> None:
        self._generation += 1
        self._controller_since = self.now()
        self._lost_seen.clear()

    @property
    def finished(self) -> bool:
        return self.tick >= self.end_tick

    # Environment ------------------------------------------------------------------------------

    async def observe(self) -> World:
        now = self.now()
        nodes: dict[str, NodeView] = {}
        heard = self._heard.get(self.leader, {})
        for host in self.hosts.values():
            alive = self._lease_alive(host)
            if alive:
                self._lost_seen.pop(host.name, None)
                lost_at = None
            else:
                expired = 0.0 if host.lease_until is None else host.lease_until
                lost_at = self._lost_seen.setdefault(
                    host.name, max(expired, self._controller_since)
                )
            nodes[host.name] = NodeView(
                name=host.name,
                spec=host.spec,
                health=host.health,
                fence=host.fence,
                lease_alive=alive,
                lease_lost_at=lost_at,
                clean_since=host.clean_since,
                fence_ack_at=host.fence_ack_at,
                domains=host.reported,
                cpus=host.cpus,
                memory_mib=host.memory_mib,
                drain=host.drain,
                heard_at=heard.get(host.name),
            )
        vms = {
            vm.name: VmView(
                name=vm.name,
                spec=vm.spec,
                placement=vm.placement,
                state=vm.state if vm.status_node == vm.placement else "Stopped",
                crashed_at=vm.crashed_at,
                restarts=tuple(vm.restarts),
                relocations=vm.relocations,
                failed=vm.failed,
                migration=None
                if vm.migration is None
                else MigrationView(
                    vm.migration.source,
                    vm.migration.target,
                    vm.migration.phase,
                    vm.migration.message,
                ),
                disk_conflict=vm.disk_conflict,
                admission_hold=vm.admission_hold,
            )
            for vm in self.vms.values()
        }
        results = tuple(self._fence_results)
        self._fence_results.clear()
        return World(now=now, nodes=nodes, vms=vms, fence_results=results, admission=self.admission)

    async def apply(self, action: Action) -> None:
        if isinstance(action, Emit):
            self._log_emit(action)
        elif isinstance(action, SetNodeHealth):
            self._set_health(action)
        elif isinstance(action, ClearFenceAck):
            self.hosts[action.node].fence_ack_at = None
        elif isinstance(action, StartFence):
            self._start_fence(action)
        elif isinstance(action, Place):
            self._place(action)
        elif isinstance(action, Restart):
            vm = self.vms[action.vm]
            vm.restarts.append(self.now())
            vm.gave_up_on = None  # dropping RestartLimitReached lets the agent start it
        elif isinstance(action, SetFailed):
            vm = self.vms[action.vm]
            vm.failed = action.failed
            if not action.failed:
                vm.restarts.clear()
                vm.relocations = 0
                vm.crashed_at = None
                vm.gave_up_on = None
        elif isinstance(action, SetDiskConflict):
            self.vms[action.vm].disk_conflict = action.message
        elif isinstance(action, SetAdmissionHold):
            self.vms[action.vm].admission_hold = action.message
        elif isinstance(action, Migrate):
            self._migrate(action)
        elif isinstance(action, ClearMigration):
            self.vms[action.vm].migration = None

    async def wait(self, until: float) -> bool:
        """Advance one tick (something may change on any tick), more while etcd elects (the
        leader cannot write); False at the end, on a controller restart, or when the leader
        died, lost etcd or was replaced."""
        del until
        self._tick()
        while self._etcd_down is not None and not self.finished:
            self._tick()
        if self._restart_controller or self._new_term or not self.leading():
            self._restart_controller = False
            return False
        return not self.finished

    def _tick(self) -> None:
        if self.finished:
            return
        self.tick += 1
        for command in self._commands.pop(self.tick, []):
            command()
        self._advance()
        self._check_copies()
        self._check_disks()

    def leading(self) -> bool:
        """A leader runs, reaches etcd and holds the leader key."""
        if not self.controllers:
            return True
        host = self.hosts[self.leader]
        return self._leader_alive and host.powered and host.network and self._etcd_down is None

    async def until_leading(self) -> None:
        """Advance until a controller leads (at once outside the hosts)."""
        while not self.finished and not self.leading():
            self._tick()
        self._new_term = False

    # Applying the engine's actions ------------------------------------------------------------

    def _set_health(self, action: SetNodeHealth) -> None:
        host = self.hosts[action.node]
        host.health = action.health
        host.fence = action.fence
        if action.health == "Fenced" and action.fence is not None:
            running = sorted(host.executing())
            if running and action.fence.how != "ManualAck":
                self.violation(
                    f"{host.name} declared fenced ({action.fence.how}) while running "
                    f"{', '.join(running)}"
                )

    def _start_fence(self, action: StartFence) -> None:
        elapsed, ok, message = self._fence_outcome(self.hosts[action.node], action.method)
        self._fence_runs.append(
            _FenceRun(
                action.attempt,
                action.node,
                action.method,
                self.now() + elapsed,
                ok,
                message,
                self._generation,
            )
        )

    def _fence_outcome(self, host: Host, method: str) -> tuple[float, bool, str]:
        """How long running `method`'s devices takes, whether it confirms off, and why not."""
        elapsed = 0.0
        for index, device in enumerate(host.devices.get(method, [])):
            if device.behaviour == "ok":
                elapsed += device.seconds
                continue
            if device.behaviour == "fail":
                return elapsed + device.seconds, False, f"device {index} ({device.agent}) failed"
            timed_out = f"device {index} ({device.agent}) timed out after {device.timeout:g}s"
            return elapsed + device.timeout, False, timed_out
        return elapsed, True, "off"

    def _place(self, action: Place) -> None:
        vm = self.vms[action.vm]
        old = None if vm.placement is None else self.hosts[vm.placement]
        migrated = vm.migration is not None and vm.migration.phase == "Succeeded"
        moved = old is not None and action.node is not None and old.name != action.node
        if moved and old is not None and old.health not in ("Online", "Fenced") and not migrated:
            self.violation(f"{vm.name} moved off {old.name}, which is {old.health}")
        if vm.placement != action.node:
            vm.status_node = None  # as production's Place: the last report was another placement
        vm.placement = action.node
        if action.relocation:
            vm.relocations += 1
            vm.restarts.clear()
            vm.crashed_at = None
        if action.node is None:
            return
        elsewhere = sorted(
            h.name
            for h in self.hosts.values()
            if h.name != action.node and vm.name in h.executing()
        )
        if elsewhere:
            self.violation(f"{vm.name} placed on {action.node} while running on {elsewhere}")

    def _migrate(self, action: Migrate) -> None:
        vm = self.vms[action.vm]
        source, target = self.hosts[action.source], self.hosts[action.target]
        vm.migration = SimMigration(
            action.source, action.target, self.now() + self.settings.migrate_seconds
        )
        if vm.name not in source.executing():
            vm.migration.phase = "Failed"
            vm.migration.message = f"{vm.name} does not run on {source.name}"
            return
        vm.state = "Migrating"
        target.qemu[vm.name] = Qemu("incoming")

    # Commands (scenario verbs) ----------------------------------------------------------------

    def power_off(self, name: str, why: str = "powered off") -> None:
        host = self.hosts[name]
        if not host.powered:
            return
        lost = sorted(host.executing())
        host.powered = False
        host.agent = False
        host.boot_done_at = None
        host.qemu.clear()
        self.log(f"host/{name}", why + (f" (killed {', '.join(lost)})" if lost else ""))
        self._lose(lost)
        if name == self.leader and self._leader_alive:
            # The leader's fence agents die with it, and so does its engine.
            self._leader_alive = False
            self._fence_runs = [
                r for r in self._fence_runs if r.generation != self._generation or r.takeover_by
            ]
            self.log("controller", f"the leader dies with {name}")
        self._fence_runs = [r for r in self._fence_runs if r.takeover_by != name]

    def power_on(self, name: str) -> None:
        host = self.hosts[name]
        if host.powered:
            return
        host.powered = True
        host.boot_done_at = self.now() + self.settings.boot_seconds
        self.log(f"host/{name}", "powered on, booting")

    def set_network(self, name: str, up: bool) -> None:
        self.hosts[name].network = up
        self.log(f"host/{name}", f"network {'up' if up else 'down'}")

    def kill_agent(self, name: str) -> None:
        host = self.hosts[name]
        if host.agent:
            host.agent = False
            self.log(f"host/{name}", "agent killed; guests keep running")

    def start_agent(self, name: str) -> None:
        host = self.hosts[name]
        if host.powered and host.boot_done_at is None and not host.agent:
            host.agent = True
            host.last_feed = self.now()
            self._forget_heard(name)
            self.log(f"host/{name}", "agent started")

    def set_device(self, name: str, method: str, index: int | None, behaviour: str) -> None:
        devices = self.hosts[name].devices[method]
        for position, device in enumerate(devices):
            if index is None or position == index:
                device.behaviour = behaviour  # type: ignore[assignment]

    def ack(self, name: str) -> None:
        self.hosts[name].fence_ack_at = self.now()

    def drain(self, name: str, force: bool) -> None:
        host = self.hosts[name]
        host.spec = host.spec.model_copy(update={"cordoned": True})
        host.drain = "force" if force else "migrate"

    def cordon(self, name: str, cordoned: bool) -> None:
        host = self.hosts[name]
        host.spec = host.spec.model_copy(update={"cordoned": cordoned})
        if not cordoned:
            host.drain = None

    def request_migration(self, vm_name: str, target: str) -> None:
        vm = self.vms[vm_name]
        vm.migration = SimMigration(vm.placement or "", target, 0.0, "Pending")

    def crash(self, vm_name: str) -> None:
        vm = self.vms[vm_name]
        for host in self.hosts.values():
            qemu = host.qemu.get(vm_name)
            if host.powered and qemu is not None and qemu.phase == "running":
                del host.qemu[vm_name]
                self.log(f"host/{host.name}", f"{vm_name} crashed")
                self._fail_migration(vm, "the source guest crashed")
                self._lose([vm_name])

    def hang(self, vm_name: str) -> None:
        """The guest hangs: its qemu runs on, but it stops answering its health checks."""
        for host in self.hosts.values():
            qemu = host.qemu.get(vm_name)
            if host.powered and qemu is not None and qemu.phase == "running":
                qemu.hung_at = self.now()
                self.log(f"host/{host.name}", f"{vm_name} hung")

    def set_run_state(self, vm_name: str, run_state: str) -> None:
        vm = self.vms[vm_name]
        vm.spec = vm.spec.model_copy(update={"run_state": run_state})

    # Time passing -----------------------------------------------------------------------------

    def etcd_election(self, seconds: float) -> None:
        """etcd loses its leader for `seconds`: no renewal, no expiry, no write meanwhile."""
        self._etcd_down = (self.now(), self.now() + seconds)
        self.log("etcd", f"leader lost; electing for {seconds:g}s")

    def _etcd_step(self) -> None:
        """At the end of an election etcd extends every lease by its TTL (etcd's rule)."""
        if self._etcd_down is None or self.now() < self._etcd_down[1]:
            return
        start, _ = self._etcd_down
        self._etcd_down = None
        for host in self.hosts.values():
            if host.lease_until is not None and host.lease_until > start:
                host.lease_until = max(host.lease_until, self.now() + self.timings.lease_ttl)
        if self._key_until > start:
            self._key_until = max(self._key_until, self.now() + self.settings.election_ttl)
        self.log("etcd", "new leader: every lease extended by its TTL")

    # Direct heartbeats and the controllers ---------------------------------------------------

    def _controller_up(self, name: str) -> bool:
        host = self.hosts[name]
        return name in self.controllers and host.powered and host.boot_done_at is None

    def _sends(self, host: Host) -> bool:
        """The host's agent or controller sends direct heartbeats on the cluster network."""
        if not host.powered or host.boot_done_at is not None:
            return False
        return host.agent or host.name in self.controllers

    def _forget_heard(self, node: str) -> None:
        """A new agent session: it must be heard anew before its silence means anything."""
        for heard in self._heard.values():
            heard.pop(node, None)

    def _listen(self) -> None:
        observers = [c for c in self.controllers if self._controller_up(c)]
        if not self.controllers:
            observers = [OFF_HOST]
        now = self.now()
        for observer in observers:
            connected = observer == OFF_HOST or self.hosts[observer].network
            heard = self._heard.setdefault(observer, {})
            for host in self.hosts.values():
                local = host.name == observer
                if self._sends(host) and (local or (connected and host.network)):
                    heard[host.name] = now

    def _silent(self, observer: str) -> frozenset[str]:
        heard = self._heard.get(observer, {})
        at = {name: heard.get(name) for name in self.hosts}
        return silent_nodes(at, self.now(), self.timings.suspect_after)

    def _leadership(self) -> None:
        """Renew the leader key, elect when it expired, let standbys take over a silent host."""
        if not self.controllers or self._etcd_down is not None:
            return
        now = self.now()
        leader = self.hosts[self.leader]
        if self._leader_alive and leader.powered and leader.network:
            self._key_until = now + self.settings.election_ttl
        if now >= self._key_until:
            candidates = [c for c in self.controllers if self._controller_up(c)]
            candidates = [c for c in candidates if self.hosts[c].network]
            if candidates:
                self._lead(candidates[0], "the leader key expired")
            return
        for standby in self.controllers:
            if standby == self.leader or not self._controller_up(standby):
                continue
            if not self.hosts[standby].network or not power_fenced(leader.spec):
                continue
            if self.leader not in self._silent(standby):
                continue
            self._start_takeover_fence(standby, leader)

    def _start_takeover_fence(self, standby: str, leader: Host) -> None:
        key = (standby, self.term)
        index = self._takeover_method.get(key, 0)
        methods = leader.spec.fencing.methods
        busy = any(r.takeover_by == standby and r.term == self.term for r in self._fence_runs)
        if busy or index >= len(methods):
            return
        self._takeover_method[key] = index + 1
        method = methods[index].name
        elapsed, ok, message = self._fence_outcome(leader, method)
        self.log(
            f"controller/{standby}",
            f"the leader's host {leader.name} is silent: fencing it (method {method})",
        )
        done_at = self.now() + elapsed
        run = _FenceRun(0, leader.name, method, done_at, ok, message, -1, standby, self.term)
        self._fence_runs.append(run)

    def _takeover(self, run: _FenceRun) -> None:
        """A standby's fence of the leader's host finished: take over if the term is unchanged."""
        standby = run.takeover_by
        assert standby is not None
        if not run.ok:
            self.log(f"controller/{standby}", f"fencing {run.node} failed: {run.message}")
            return
        if not self._controller_up(standby):
            return
        if self.term != run.term or self._etcd_down is not None:
            self.log(f"controller/{standby}", f"takeover refused: term {run.term} is over")
            return
        self._lead(standby, f"{run.node} confirmed off (method {run.method})")
        self._set_health(
            SetNodeHealth(run.node, "Fenced", FenceConfirmation("PowerOff", self.now(), run.method))
        )
        message = f"method {run.method} confirmed power off (by the standby that took over)"
        self._log_emit(Emit("ClusterNode", run.node, "NodeFenced", message))

    def _lead(self, name: str, why: str) -> None:
        self.term += 1
        self.leader = name
        self._leader_alive = True
        self._key_until = self.now() + self.settings.election_ttl
        self._new_term = True
        self._new_engine()
        self.log("controller", f"{why}: the controller on {name} leads (term {self.term})")

    def _lease_alive(self, host: Host) -> bool:
        if host.lease_until is None:
            return False
        return self._etcd_down is not None or self.now() < host.lease_until

    def _lose(self, vm_names: list[str]) -> None:
        for name in vm_names:
            if not any(name in h.executing() for h in self.hosts.values()):
                self.vms[name].down_since = self.now()

    def _advance(self) -> None:
        now = self.now()
        for host in self.hosts.values():
            if host.powered and host.boot_done_at is not None and now >= host.boot_done_at:
                host.boot_done_at = None
                host.agent = True
                host.last_feed = now
                self._forget_heard(host.name)
                self.log(f"host/{host.name}", "booted; agent started")
        self._etcd_step()
        self._listen()
        self._leadership()
        self._advance_guests()
        self._advance_migrations()
        self._advance_fencing()
        for host in self.hosts.values():
            self._watchdog_and_self_fence(host)
        for host in self.hosts.values():
            if host.connected():
                self._agent(host)

    def _advance_guests(self) -> None:
        now = self.now()
        for host in self.hosts.values():
            for name, qemu in sorted(host.qemu.items()):
                if qemu.phase == "starting" and now >= qemu.ready_at:
                    qemu.phase = "running"
                    vm = self.vms[name]
                    down = "" if vm.down_since is None else f" (down {now - vm.down_since:.1f}s)"
                    vm.down_since = None
                    self.log(f"host/{host.name}", f"{name} running{down}")

    def _fail_migration(self, vm: SimVm, message: str) -> None:
        migration = vm.migration
        if migration is None or migration.phase != "Running":
            return
        migration.phase = "Failed"
        migration.message = message
        target = self.hosts[migration.target]
        incoming = target.qemu.get(vm.name)
        if incoming is not None and incoming.phase == "incoming":
            del target.qemu[vm.name]

    def _advance_migrations(self) -> None:
        now = self.now()
        for vm in self.vms.values():
            migration = vm.migration
            if migration is None or migration.phase != "Running":
                continue
            source, target = self.hosts[migration.source], self.hosts[migration.target]
            if not (source.powered and source.network):
                self._fail_migration(vm, f"{source.name} unreachable")
            elif not (target.powered and target.network) or target.boot_done_at is not None:
                self._fail_migration(vm, f"{target.name} unreachable")
            elif vm.name not in source.executing():
                self._fail_migration(vm, f"the guest stopped on {source.name}")
            elif vm.name not in target.qemu:
                self._fail_migration(vm, f"the incoming guest on {target.name} is gone")
            elif now >= migration.done_at:
                del source.qemu[vm.name]
                target.qemu[vm.name] = Qemu("running")
                migration.phase = "Succeeded"
                vm.state = "Running"
                self.log(f"host/{target.name}", f"{vm.name} running (migrated from {source.name})")

    def _advance_fencing(self) -> None:
        now = self.now()
        for run in [r for r in self._fence_runs if now >= r.done_at]:
            if run not in self._fence_runs:  # its fencer died with a host powered off just now
                continue
            self._fence_runs.remove(run)
            if run.ok:
                self.power_off(run.node, f"powered off by fence method {run.method}")
            if run.takeover_by is not None:
                self._takeover(run)
            elif run.generation == self._generation:
                self._fence_results.append(
                    FenceResult(run.attempt, run.node, run.method, run.ok, run.message)
                )

    def _lease_valid(self, host: Host) -> bool:
        timings = self.timings
        return lease_valid(
            self.now(), host.last_renewal, timings.lease_ttl, timings.self_fence_margin
        )

    def _watchdog_and_self_fence(self, host: Host) -> None:
        if not host.powered or host.boot_done_at is not None:
            return
        now = self.now()
        relies_on_self_fence = host.spec.fencing.self_fence
        if not host.agent:
            if relies_on_self_fence and now >= host.last_feed + self.timings.watchdog_timeout:
                self.power_off(host.name, "watchdog reset the host")
                self.power_on(host.name)
            return
        valid = self._lease_valid(host)
        if relies_on_self_fence and not valid:
            # Past the deadline the agent destroys every domain, including late arrivals.
            host.self_fenced = True
            lost = sorted(host.qemu)
            host.qemu.clear()
            if lost:
                self.log(f"host/{host.name}", f"agent self-fenced: destroyed {', '.join(lost)}")
                self._lose([n for n in lost if n in self.vms])
        if may_feed_watchdog(
            working=True,
            self_fence_enabled=relies_on_self_fence,
            lease_valid=valid,
            self_fenced=host.self_fenced,
            self_fence_failed=False,
        ):
            host.last_feed = now

    def _agent(self, host: Host) -> None:
        """The agent's heartbeat and reports; its decisions are the shipped rules."""
        now = self.now()
        due = host.last_renewal is None or now - host.last_renewal >= self.timings.renew_interval
        if due and self._etcd_down is None:
            host.last_renewal = now
            host.lease_until = now + self.timings.lease_ttl
            host.self_fenced = False
        fence = host.fence
        if must_clean_after_fence(
            host.health, None if fence is None else fence.at, host.cleaned_fence
        ):
            assert fence is not None
            stale = sorted(host.qemu)
            host.qemu.clear()
            host.clean_since, host.cleaned_fence = now, fence.at
            text = f"destroyed {', '.join(stale)}" if stale else "nothing to destroy"
            self.log(f"host/{host.name}", f"agent found its node Fenced: {text}")
            if stale and fence.how == "ManualAck":
                self._warn_acked_but_running(host.name, stale)
            self._lose(stale)
        self._agent_converge(host)
        host.reported = frozenset(host.qemu)

    def _warn_acked_but_running(self, node: str, destroyed: list[str]) -> None:
        """The agent's Warnings when a node acknowledged as off still ran domains."""
        for emit in acked_but_running(node, destroyed):
            self._log_emit(emit)

    def _log_emit(self, emit: Emit) -> None:
        self.log(f"{emit.kind}/{emit.name}", f"{emit.type} {emit.reason}: {emit.message}")

    def _agent_converge(self, host: Host) -> None:
        """The VM reconciler's step for every VM placed or running here (`decide_domain`)."""
        blocker = start_blocker(self._lease_valid(host), host.self_fenced, host.health)
        names = set(host.qemu) | {v.name for v in self.vms.values() if v.placement == host.name}
        for name in sorted(names):
            vm = self.vms[name]
            qemu = host.qemu.get(name)
            facts = DomainFacts(
                placed_here=vm.placement == host.name,
                wanted=vm.spec.run_state == "started",
                running=qemu is not None and qemu.phase != "incoming",
                migration_owns=self._migration_owns(vm, host.name),
                ran_here=vm.state == "Running" and vm.status_node == host.name,
                gave_up_here=vm.gave_up_on == host.name,
                restarts=tuple(vm.restarts),
                policy=vm.spec.restart_policy,
                now=self.now(),
                start_blocker=blocker,
                unresponsive=self._failed_check(vm, qemu),
            )
            self._agent_act(host, vm, qemu, facts, decide_domain(facts))

    def _failed_check(self, vm: SimVm, qemu: Qemu | None) -> str | None:
        """The health check a hung guest has failed by now, per `first_failing_check`."""
        if qemu is None or qemu.hung_at is None:
            return None
        check = first_failing_check(vm.spec.health)
        if check is None or self.now() < qemu.hung_at + check[0]:
            return None
        return check[1]

    @staticmethod
    def _migration_owns(vm: SimVm, node: str) -> bool:
        """`reconcilers.migration.in_flight_migration` for the simulated migration."""
        migration = vm.migration
        return (
            migration is not None
            and migration.phase in ("Running", "Succeeded")
            and node in (migration.source, migration.target)
        )

    def _agent_act(
        self, host: Host, vm: SimVm, qemu: Qemu | None, facts: DomainFacts, action: DomainAction
    ) -> None:
        """What the real reconciler does for `action`, to the simulated host and VM status."""
        now, where = self.now(), f"host/{host.name}"
        if action == "destroy":
            del host.qemu[vm.name]
            self.log(where, f"stopped {vm.name} (not placed here)")
            self._lose([vm.name])
        elif action == "stop":
            if qemu is not None:
                del host.qemu[vm.name]
                self.log(where, f"stopped {vm.name}")
            vm.state, vm.status_node, vm.crashed_at, vm.gave_up_on = (
                "Stopped",
                host.name,
                None,
                None,
            )
            vm.restarts.clear()
        elif action == "keep" and qemu is not None and qemu.phase == "running":
            vm.state, vm.status_node, vm.crashed_at, vm.gave_up_on = (
                "Running",
                host.name,
                None,
                None,
            )
        elif action in ("start", "restart"):
            host.qemu[vm.name] = Qemu("starting", now + self.settings.start_seconds)
            self.log(where, f"starting {vm.name}")
            if action == "restart":
                vm.restarts = [*recent_restarts(vm.restarts, facts.policy, now), now]
                message = restarted_message(host.name, len(vm.restarts), facts.policy)
                self._log_emit(Emit("VirtualMachine", vm.name, "VMRestarted", message, "Warning"))
        elif action == "reset":
            assert qemu is not None and facts.unresponsive is not None
            host.qemu[vm.name] = Qemu("starting", now + self.settings.start_seconds)
            vm.down_since = now
            vm.restarts = [*recent_restarts(vm.restarts, facts.policy, now), now]
            message = unresponsive_message(
                facts.unresponsive, host.name, action, len(vm.restarts), facts.policy
            )
            self._log_emit(Emit("VirtualMachine", vm.name, "GuestUnresponsive", message, "Warning"))
        elif action == "give_up":
            vm.restarts = recent_restarts(vm.restarts, facts.policy, now)
            cause = "domain stopped unexpectedly"
            if facts.unresponsive is not None:
                cause = facts.unresponsive
                del host.qemu[vm.name]
                self._lose([vm.name])
                message = unresponsive_message(
                    cause, host.name, action, len(vm.restarts), facts.policy
                )
                self._log_emit(
                    Emit("VirtualMachine", vm.name, "GuestUnresponsive", message, "Warning")
                )
            vm.state, vm.status_node, vm.crashed_at = "Crashed", host.name, now
            vm.gave_up_on = host.name
            message = gave_up_message(host.name, len(vm.restarts), facts.policy, cause)
            self._log_emit(
                Emit("VirtualMachine", vm.name, "RestartLimitReached", message, "Warning")
            )

    def _check_copies(self) -> None:
        for vm in self.vms.values():
            hosts = sorted(h.name for h in self.hosts.values() if vm.name in h.executing())
            if len(hosts) > 1 and vm.name not in self._doubled:
                self.violation(f"{vm.name} runs on {', '.join(hosts)} at once")
            if len(hosts) > 1:
                self._doubled.add(vm.name)
            else:
                self._doubled.discard(vm.name)

    def _check_disks(self) -> None:
        """Two VMs with a guest each on one disk (not readonly for both) is a violation."""
        claims = Claims(macs=False)
        sharing: set[tuple[str, str]] = set()
        for name in sorted({vm for host in self.hosts.values() for vm in host.executing()}):
            spec = self.vms[name].spec
            clash = claims.clash(name, spec)
            if clash is not None:
                sharing.add((clash.other, name))
                if (clash.other, name) not in self._sharing:
                    self.violation(f"{clash.other} and {name} both run on {clash.resource}")
            claims.add(name, spec)
        self._sharing = sharing

    # Questions for tests ----------------------------------------------------------------------

    def running_hosts(self, vm_name: str) -> list[str]:
        return sorted(
            h.name
            for h in self.hosts.values()
            if (q := h.qemu.get(vm_name)) is not None and h.powered and q.phase == "running"
        )
