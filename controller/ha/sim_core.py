"""The simulator's state and what every part of it uses: the clock and log, power, losing a
guest, and the indexes that let a tick look only at what changed.

Every VM reports its changes (`SimVm.watch`) and every qemu process change goes through the
`QemuTable`: both tell the agents concerned to look at the VM again (`_pending`), and the
invariants and the engine's views which VMs changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from crds.clusterpolicy import AdmissionPolicy

from .environment import (
    Emit,
    FenceResult,
    HaTimings,
    Heard,
    MigrationView,
    SetNodeHealth,
    VmView,
)
from .sim_invariants import Invariants, QemuTable
from .sim_model import OFF_HOST, TICKS_PER_SECOND, FenceRun, Host, Qemu, SimSettings, SimVm


class SimCore:
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
        self._fence_runs: list[FenceRun] = []
        self._fence_results: list[FenceResult] = []
        self._lost_seen: dict[str, float] = {}
        self._controller_since = 0.0
        self._restart_controller = False
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
        self._heard: dict[str, dict[str, Heard]] = {}
        """Per observing controller, the direct heartbeats it heard from each host."""
        self._session_at: dict[str, float] = {}
        """When each host's current agent session began (its heartbeats before do not count)."""
        self._etcd_down: tuple[float, float] | None = None
        self._takeover_method: dict[tuple[str, int], int] = {}
        self._order = {name: index for index, name in enumerate(self.vms)}
        self._host_order = {name: index for index, name in enumerate(self.hosts)}
        self._pending: dict[str, set[str]] = {name: set() for name in self.hosts}
        """Per host, the VMs its agent must look at again (they changed since it last did)."""
        self._hung: dict[str, set[str]] = {name: set() for name in self.hosts}
        """Per host, the VMs whose guest hung there (`hang`): looked at every tick until reset."""
        self._placed: dict[str, set[str]] = {name: set() for name in self.hosts}
        self._placed_on: dict[str, str | None] = {}
        self._migrating: set[str] = set()
        """VMs with a migration in phase Running."""
        self._changed_vms: set[str] = set(self.vms)
        """VMs changed since the engine's views were last refreshed."""
        self._views: dict[str, VmView] = {}
        self._views_changed = True
        """Whether a view changed since the engine last looked."""
        self._blockers: dict[str, str | None] = {}
        """Per host, why its agent could not start domains when it last converged."""
        self.qemu = QemuTable(self._qemu_touched)
        self.invariants = Invariants(
            lambda name: self.vms[name].spec, self._order, self.executing_hosts, self.violation
        )
        for host in hosts:
            if host.last_renewal is not None:
                host.lease_until = host.last_renewal + timings.lease_ttl
        for vm in vms:
            vm.watch(self._vm_changed)
            self._vm_changed(vm)
            if vm.placement is not None and vm.spec.run_state == "started":
                self.qemu.set(vm.placement, vm.name, Qemu("running"))
                vm.state, vm.status_node = "Running", vm.placement
        for host in hosts:
            host.reported = self.qemu.names(host.name)

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

    def _log_emit(self, emit: Emit) -> None:
        self.log(f"{emit.kind}/{emit.name}", f"{emit.type} {emit.reason}: {emit.message}")

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

    # What changed -----------------------------------------------------------------------------

    def _vm_changed(self, vm: SimVm) -> None:
        """A field of `vm` changed: its placement node's and its hosts' agents look again."""
        self._changed_vms.add(vm.name)
        self.qemu.changed.add(vm.name)
        old = self._placed_on.get(vm.name)
        if old != vm.placement:
            if old is not None:
                self._placed[old].discard(vm.name)
            if vm.placement is not None:
                self._placed[vm.placement].add(vm.name)
            self._placed_on[vm.name] = vm.placement
        if vm.placement is not None:
            self._pending[vm.placement].add(vm.name)
        for host in self.qemu.hosts_of(vm.name):
            self._pending[host].add(vm.name)
        if vm.migration is not None and vm.migration.phase == "Running":
            self._migrating.add(vm.name)
        else:
            self._migrating.discard(vm.name)

    def _view(self, vm: SimVm) -> VmView:
        migration = vm.migration
        return VmView(
            name=vm.name,
            spec=vm.spec,
            placement=vm.placement,
            state=vm.state if vm.status_node == vm.placement else "Stopped",
            crashed_at=vm.crashed_at,
            restarts=vm.restarts,
            relocations=vm.relocations,
            failed=vm.failed,
            migration=None
            if migration is None
            else MigrationView(
                migration.source, migration.target, migration.phase, migration.message
            ),
            disk_conflict=vm.disk_conflict,
            admission_hold=vm.admission_hold,
        )

    def _refresh_views(self) -> None:
        """Rebuild the views of the VMs that changed; note whether any view did."""
        for name in sorted(self._changed_vms, key=self._order.__getitem__):
            view = self._view(self.vms[name])
            if self._views.get(name) != view:
                self._views[name] = view
                self._views_changed = True
        self._changed_vms.clear()

    def _qemu_touched(self, host: str, vm: str) -> None:
        self._pending[host].add(vm)

    def relevant(self, host: str) -> set[str]:
        """The VMs placed on `host` or with a process there (what its agent converges)."""
        return set(self.qemu.on(host)) | self._placed[host]

    # Guests -----------------------------------------------------------------------------------

    def executing_hosts(self, vm: str) -> list[str]:
        """The powered hosts where a guest of `vm` runs or is about to (not incoming), sorted."""
        return sorted(
            host
            for host, qemu in self.qemu.hosts_of(vm).items()
            if qemu.phase != "incoming" and self.hosts[host].powered
        )

    def runs_on(self, host: str, vm: str) -> bool:
        """A guest of `vm` runs or is about to run on `host` (not an incoming migration)."""
        qemu = self.qemu.get(host, vm)
        return qemu is not None and qemu.phase != "incoming" and self.hosts[host].powered

    def running_hosts(self, vm_name: str) -> list[str]:
        return sorted(
            host
            for host, qemu in self.qemu.hosts_of(vm_name).items()
            if self.hosts[host].powered and qemu.phase == "running"
        )

    def _new_session(self, node: str) -> None:
        """A new agent session: it must be heard anew before its silence means anything."""
        self._session_at[node] = self.now()

    def _lose(self, vm_names: list[str]) -> None:
        for name in vm_names:
            if not self.executing_hosts(name):
                self.vms[name].down_since = self.now()

    def _fail_migration(self, vm: SimVm, message: str) -> None:
        migration = vm.migration
        if migration is None or migration.phase != "Running":
            return
        vm.migration = replace(migration, phase="Failed", message=message)
        incoming = self.qemu.get(migration.target, vm.name)
        if incoming is not None and incoming.phase == "incoming":
            self.qemu.remove(migration.target, vm.name)

    # Power and node health --------------------------------------------------------------------

    def power_off(self, name: str, why: str = "powered off") -> None:
        host = self.hosts[name]
        if not host.powered:
            return
        lost = self.executing_on(name)
        host.powered = False
        host.agent = False
        host.boot_done_at = None
        host.self_fence_victims.clear()  # the agent's memory goes with the power
        self.qemu.clear(name)
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

    def executing_on(self, host: str) -> list[str]:
        """The VMs with a guest that runs or is about to run on `host`, sorted."""
        if not self.hosts[host].powered:
            return []
        return sorted(name for name, q in self.qemu.on(host).items() if q.phase != "incoming")

    def power_on(self, name: str) -> None:
        host = self.hosts[name]
        if host.powered:
            return
        host.powered = True
        host.boot_done_at = self.now() + self.settings.boot_seconds
        self.log(f"host/{name}", "powered on, booting")

    def _set_health(self, action: SetNodeHealth) -> None:
        host = self.hosts[action.node]
        host.health = action.health
        host.fence = action.fence
        if action.health == "Fenced" and action.fence is not None:
            running = self.executing_on(host.name)
            if running and action.fence.how != "ManualAck":
                self.violation(
                    f"{host.name} declared fenced ({action.fence.how}) while running "
                    f"{', '.join(running)}"
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

    def _lease_alive(self, host: Host) -> bool:
        if host.lease_until is None:
            return False
        return self._etcd_down is not None or self.now() < host.lease_until
