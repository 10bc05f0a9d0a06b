"""The controllers and etcd as the simulator models them: direct heartbeats heard by each
controller, the leader key and elections, a standby fencing a silent leader's host and taking
over (docs/ha.md), and etcd losing its leader (no renewal, no expiry, then every lease extended).
"""

from __future__ import annotations

from .environment import (
    Emit,
    FenceConfirmation,
    Heard,
    SetNodeHealth,
    break_gap,
    power_fenced,
    silent_nodes,
)
from .sim_core import SimCore
from .sim_model import OFF_HOST, FenceRun, Host


class Controllers(SimCore):
    def leading(self) -> bool:
        """A leader runs, reaches etcd and holds the leader key."""
        if not self.controllers:
            return True
        host = self.hosts[self.leader]
        return self._leader_alive and host.powered and host.network and self._etcd_down is None

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

    def _listen(self) -> None:
        observers = [c for c in self.controllers if self._controller_up(c)]
        if not self.controllers:
            observers = [OFF_HOST]
        now = self.now()
        gap = break_gap(self.timings.suspect_after)
        for observer in observers:
            connected = observer == OFF_HOST or self.hosts[observer].network
            heard = self._heard.setdefault(observer, {})
            for host in self.hosts.values():
                local = host.name == observer
                if self._sends(host) and (local or (connected and host.network)):
                    previous = heard.get(host.name)
                    new_run = previous is None or now - previous.last > gap
                    since = now if new_run or previous is None else previous.since
                    heard[host.name] = Heard(last=now, since=since)

    def _heard_by(self, observer: str) -> dict[str, Heard | None]:
        """What `observer` heard of each host in its agent's current session (as production's
        `WorldViews._heard`)."""
        heard = self._heard.get(observer, {})
        views: dict[str, Heard | None] = {}
        for name in self.hosts:
            seen = heard.get(name)
            fresh = seen is not None and seen.last >= self._session_at.get(name, seen.last)
            views[name] = seen if fresh else None
        return views

    def _silent(self, observer: str) -> frozenset[str]:
        return silent_nodes(self._heard_by(observer), self.now(), self.timings.suspect_after)

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
            if not self.hosts[standby].network or self.leader not in self._silent(standby):
                continue
            if not power_fenced(leader.spec):
                self._lead(standby, f"{leader.name} is silent and has no power fencing")
                return
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
        run = FenceRun(0, leader.name, method, done_at, ok, message, -1, standby, self.term)
        self._fence_runs.append(run)

    def _takeover(self, run: FenceRun) -> None:
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
