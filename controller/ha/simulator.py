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

Invariants are checked as the simulation runs (`controller/ha/sim_invariants.py`); violations
are logged and kept in `Simulator.violations`.

The engine looks at the world on the tick after anything it can see changed (a VM's view, a
node's health, lease, domains or silence, a fence result), or when its next timer fires
(`Engine.next_wakeup`); in between, a step would see what it saw and decide nothing. So a big
cluster costs engine steps only when something happens. The parts: objects in `sim_model`,
shared state and indexes in `sim_core`, the agents in `sim_agents`, the controllers and etcd in
`sim_control`, the scenarios' verbs (faults and operator commands) in `sim_commands`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from .environment import (
    Action,
    ClearFenceAck,
    ClearMigration,
    Emit,
    FenceResult,
    HaTimings,
    Migrate,
    NodeView,
    Place,
    Restart,
    SetAdmissionHold,
    SetDiskConflict,
    SetFailed,
    SetNodeHealth,
    StartFence,
    World,
)
from .sim_agents import AgentLoops
from .sim_commands import Commands
from .sim_control import Controllers
from .sim_model import (
    OFF_HOST,
    TICKS_PER_SECOND,
    DeviceBehaviour,
    FenceRun,
    Host,
    Qemu,
    SimDevice,
    SimMigration,
    SimSettings,
    SimVm,
)

__all__ = [
    "OFF_HOST",
    "TICKS_PER_SECOND",
    "DeviceBehaviour",
    "Host",
    "Qemu",
    "SimDevice",
    "SimMigration",
    "SimSettings",
    "SimVm",
    "Simulator",
]


class Simulator(AgentLoops, Controllers, Commands):
    """An `Environment` over simulated hosts; drive it with `controller.ha.engine_loop.run`."""

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
        super().__init__(hosts, vms, timings, settings, end, log, controllers)
        self._seen: dict[str, tuple[object, ...]] = {}
        """What the engine saw of each node at its last look."""
        self._acted = False
        """The engine's last step changed something (not only emitted events)."""
        self._check_invariants()

    # Environment ------------------------------------------------------------------------------

    async def observe(self) -> World:
        now = self.now()
        nodes: dict[str, NodeView] = {}
        heard = self._heard_by(self.leader)
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
                heard=heard[host.name],
                storage_lost=dict(host.storage_reported),
            )
        self._refresh_views()
        self._views_changed = self._acted = False
        self._seen = self._node_signatures()
        results = tuple(self._fence_results)
        self._fence_results.clear()
        vms = dict(self._views)
        return World(now=now, nodes=nodes, vms=vms, fence_results=results, admission=self.admission)

    def _node_signatures(self) -> dict[str, tuple[object, ...]]:
        silent = self._silent(self.leader)
        return {
            host.name: (
                host.health,
                host.fence,
                self._lease_alive(host),
                host.clean_since,
                host.fence_ack_at,
                host.reported,
                host.name in silent,
                host.spec,
                host.cpus,
                host.memory_mib,
                host.drain,
                host.storage_reported,
            )
            for host in self.hosts.values()
        }

    def _engine_has_news(self) -> bool:
        """Whether the engine would see something it did not see at its last look."""
        self._refresh_views()
        if self._acted or self._views_changed or self._fence_results:
            return True
        return self._node_signatures() != self._seen

    async def apply_step(self, actions: Sequence[Action]) -> None:
        for action in actions:
            await self.apply(action)

    async def apply(self, action: Action) -> None:
        if not isinstance(action, Emit):
            # What the engine changed may change back before the tick ends (a migration to a
            # host just cut fails at once): look again on the next tick whatever it shows.
            self._acted = True
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
            vm.restarts = (*vm.restarts, self.now())
            vm.gave_up_on = None  # dropping RestartLimitReached lets the agent start it
        elif isinstance(action, SetFailed):
            vm = self.vms[action.vm]
            vm.failed = action.failed
            if not action.failed:
                vm.restarts = ()
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
        """Advance tick by tick until the engine has news (see the module's docstring) or
        `until`, on through an etcd election (the leader cannot write); False at the end, on a
        controller restart, or when the leader died, lost etcd or was replaced."""
        while True:
            self._tick()
            while self._etcd_down is not None and not self.finished:
                self._tick()
            if self._restart_controller or self._new_term or not self.leading():
                self._restart_controller = False
                return False
            if self.finished:
                return False
            if self.now() >= until or self._engine_has_news():
                return True

    async def until_leading(self) -> None:
        """Advance until a controller leads (at once outside the hosts)."""
        while not self.finished and not self.leading():
            self._tick()
        self._new_term = False

    def _tick(self) -> None:
        if self.finished:
            return
        self.tick += 1
        for command in self._commands.pop(self.tick, []):
            command()
        self._advance()
        self._check_invariants()

    def _check_invariants(self) -> None:
        changed = self.qemu.changed
        self.qemu.changed = set()
        self.invariants.check(changed)

    def _advance(self) -> None:
        now = self.now()
        for host in self.hosts.values():
            if host.powered and host.boot_done_at is not None and now >= host.boot_done_at:
                host.boot_done_at = None
                host.agent = True
                host.last_feed = now
                self._new_session(host.name)
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

    def _advance_migrations(self) -> None:
        now = self.now()
        for name in sorted(self._migrating, key=self._order.__getitem__):
            vm = self.vms[name]
            migration = vm.migration
            if migration is None or migration.phase != "Running":
                continue
            source, target = self.hosts[migration.source], self.hosts[migration.target]
            if not (source.powered and source.network):
                self._fail_migration(vm, f"{source.name} unreachable")
            elif not (target.powered and target.network) or target.boot_done_at is not None:
                self._fail_migration(vm, f"{target.name} unreachable")
            elif not self.runs_on(source.name, vm.name):
                self._fail_migration(vm, f"the guest stopped on {source.name}")
            elif self.qemu.get(target.name, vm.name) is None:
                self._fail_migration(vm, f"the incoming guest on {target.name} is gone")
            elif now >= migration.done_at:
                self.qemu.remove(source.name, vm.name)
                self.qemu.set(target.name, vm.name, Qemu("running"))
                vm.migration = replace(migration, phase="Succeeded")
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

    # Applying the engine's actions ------------------------------------------------------------

    def _start_fence(self, action: StartFence) -> None:
        elapsed, ok, message = self._fence_outcome(self.hosts[action.node], action.method)
        self._fence_runs.append(
            FenceRun(
                action.attempt,
                action.node,
                action.method,
                self.now() + elapsed,
                ok,
                message,
                self._generation,
            )
        )

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
        if action.relocation:  # as production's Place: RestartLimitReached is dropped
            vm.relocations += 1
            vm.restarts = ()
            vm.crashed_at = None
            vm.gave_up_on = None
        if action.node is None:
            return
        elsewhere = [h for h in self.executing_hosts(vm.name) if h != action.node]
        if elsewhere:
            self.violation(f"{vm.name} placed on {action.node} while running on {elsewhere}")

    def _migrate(self, action: Migrate) -> None:
        vm = self.vms[action.vm]
        done_at = self.now() + self.settings.migrate_seconds
        if not self.runs_on(action.source, vm.name):
            message = f"{vm.name} does not run on {action.source}"
            vm.migration = SimMigration(action.source, action.target, done_at, "Failed", message)
            return
        vm.migration = SimMigration(action.source, action.target, done_at)
        vm.state = "Migrating"
        self.qemu.set(action.target, vm.name, Qemu("incoming"))
