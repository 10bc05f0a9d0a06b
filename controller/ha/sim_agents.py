"""The simulated agents: lease renewal, the watchdog and self-fence, cleaning a node found
Fenced, and the VM reconciler's step for each domain. Every decision is the shipped agent's
(`controller/ha/agent_rules.py`, `controller/runtime/self_fence.py`).

An agent looks only at the VMs that changed since it last looked (`_pending`), or at all of
its VMs when what allows it to start domains changed: `decide_domain` is pure, and a decision
that acts changes the VM or its process, so it is looked at again on the next tick.
"""

from __future__ import annotations

from controller.runtime.self_fence import lease_valid, may_feed_watchdog

from .agent_rules import (
    DomainAction,
    DomainFacts,
    decide_domain,
    failure_warnings,
    first_failing_check,
    must_clean_after_fence,
    recent_restarts,
    start_blocker,
)
from .environment import Emit, acked_but_running
from .sim_core import SimCore
from .sim_model import Host, Qemu, SimVm

_NOT_YET = "<not converged yet>"


class AgentLoops(SimCore):
    def _advance_guests(self) -> None:
        now = self.now()
        starting = sorted(self.qemu.starting, key=lambda e: (self._host_order[e[0]], e[1]))
        for host_name, name in starting:
            qemu = self.qemu.get(host_name, name)
            if qemu is not None and now >= qemu.ready_at:
                self.qemu.set(host_name, name, Qemu("running"))
                vm = self.vms[name]
                down = "" if vm.down_since is None else f" (down {now - vm.down_since:.1f}s)"
                vm.down_since = None
                self.log(f"host/{host_name}", f"{name} running{down}")

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
            lost = self.qemu.clear(host.name)
            host.self_fence_victims.update(lost)
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
            stale = self.qemu.clear(host.name)
            host.clean_since, host.cleaned_fence = now, fence.at
            text = f"destroyed {', '.join(stale)}" if stale else "nothing to destroy"
            self.log(f"host/{host.name}", f"agent found its node Fenced: {text}")
            if stale and fence.how == "ManualAck":
                self._warn_acked_but_running(host.name, stale)
            self._lose(stale)
        self._agent_converge(host)
        host.reported = self.qemu.names(host.name)
        if {path for path, _ in host.storage_reported} != host.storage_cut:
            since = dict(host.storage_reported)
            host.storage_reported = tuple(
                (path, since.get(path, now)) for path in sorted(host.storage_cut)
            )

    def _warn_acked_but_running(self, node: str, destroyed: list[str]) -> None:
        """The agent's Warnings when a node acknowledged as off still ran domains."""
        for emit in acked_but_running(node, destroyed):
            self._log_emit(emit)

    def _agent_converge(self, host: Host) -> None:
        """The VM reconciler's step for the VMs placed or running here (`decide_domain`)."""
        blocker = start_blocker(self._lease_valid(host), host.self_fenced, host.health)
        if self._blockers.get(host.name, _NOT_YET) == blocker:
            placed, here = self._placed[host.name], self.qemu.on(host.name)
            names = {n for n in self._pending[host.name] if n in placed or n in here}
        else:
            self._blockers[host.name] = blocker
            names = self.relevant(host.name)
        self._pending[host.name] = set()
        names |= self._still_hung(host.name)
        for name in sorted(names):
            vm = self.vms[name]
            qemu = self._watchdog_power_off(host, vm, self.qemu.get(host.name, name))
            hung = self._failed_check(vm, qemu)
            facts = DomainFacts(
                placed_here=vm.placement == host.name,
                wanted=vm.spec.run_state == "started",
                running=qemu is not None and qemu.phase != "incoming",
                migration_owns=self._migration_owns(vm, host.name),
                ran_here=vm.state == "Running" and vm.status_node == host.name,
                gave_up_here=vm.gave_up_on is not None and vm.status_node == host.name,
                restarts=vm.restarts,
                policy=vm.spec.restart_policy,
                now=self.now(),
                start_blocker=blocker,
                unresponsive=host.watchdog_stopped.get(name) if hung is None else hung[0],
                self_fence_victim=name in host.self_fence_victims,
            )
            action = decide_domain(facts)
            if action in ("start", "restart", "destroy", "forget"):
                host.self_fence_victims.discard(name)  # as the reconciler does
            self._agent_act(host, vm, qemu, facts, action)

    def _still_hung(self, node: str) -> set[str]:
        """The VMs whose guest hangs on `node` (forgetting those reset or gone since)."""
        hung = self._hung[node]
        for name in list(hung):
            qemu = self.qemu.get(node, name)
            if qemu is None or qemu.hung_at is None:
                hung.discard(name)
        return set(hung)

    def _failed_check(self, vm: SimVm, qemu: Qemu | None) -> tuple[str, bool] | None:
        """The health check a hung guest has failed by now and whether QEMU then stops it, per
        `first_failing_check`."""
        if qemu is None or qemu.hung_at is None:
            return None
        check = first_failing_check(vm.spec.health)
        if check is None or self.now() < qemu.hung_at + check[0]:
            return None
        return check[1], check[2]

    def _watchdog_power_off(self, host: Host, vm: SimVm, qemu: Qemu | None) -> Qemu | None:
        """QEMU powers a hung guest off when its watchdog fires with a stopping action; the
        agent remembers why (`watchdog_stopped`). The guest's process after that."""
        failed = self._failed_check(vm, qemu)
        if failed is None or not failed[1]:
            return qemu
        self.qemu.remove(host.name, vm.name)
        self.log(f"host/{host.name}", f"{vm.name} powered off by its watchdog")
        self._lose([vm.name])
        host.watchdog_stopped[vm.name] = failed[0]
        return None

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
            self.qemu.remove(host.name, vm.name)
            self.log(where, f"stopped {vm.name} (not placed here)")
            self._lose([vm.name])
        elif action == "stop":
            host.watchdog_stopped.pop(vm.name, None)
            if qemu is not None:
                self.qemu.remove(host.name, vm.name)
                self.log(where, f"stopped {vm.name}")
            vm.state, vm.status_node, vm.crashed_at, vm.gave_up_on = (
                "Stopped",
                host.name,
                None,
                None,
            )
            vm.restarts = ()
        elif action == "keep" and qemu is not None and qemu.phase == "running":
            vm.state, vm.status_node, vm.crashed_at, vm.gave_up_on = (
                "Running",
                host.name,
                None,
                None,
            )
        elif action in ("start", "restart"):
            host.watchdog_stopped.pop(vm.name, None)
            self.qemu.set(host.name, vm.name, Qemu("starting", now + self.settings.start_seconds))
            self.log(where, f"starting {vm.name}")
            if action == "restart":
                vm.restarts = (*recent_restarts(vm.restarts, facts.policy, now), now)
                self._warn(host, vm, facts, action)
        elif action == "reset":
            assert qemu is not None and facts.unresponsive is not None
            self.qemu.set(host.name, vm.name, Qemu("starting", now + self.settings.start_seconds))
            vm.down_since = now
            vm.restarts = (*recent_restarts(vm.restarts, facts.policy, now), now)
            self._warn(host, vm, facts, action)
        elif action == "give_up":
            vm.restarts = tuple(recent_restarts(vm.restarts, facts.policy, now))
            host.watchdog_stopped.pop(vm.name, None)
            if facts.running:  # a hung guest: destroyed
                self.qemu.remove(host.name, vm.name)
                self._lose([vm.name])
            vm.state, vm.status_node, vm.crashed_at = "Crashed", host.name, now
            vm.gave_up_on = host.name
            self._warn(host, vm, facts, action)

    def _warn(self, host: Host, vm: SimVm, facts: DomainFacts, action: DomainAction) -> None:
        """The reconciler's Warnings of a restart, reset or give-up (`failure_warnings`)."""
        for reason, message in failure_warnings(facts, action, host.name, len(vm.restarts)):
            self._log_emit(Emit("VirtualMachine", vm.name, reason, message, "Warning"))
