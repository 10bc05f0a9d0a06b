"""`ChaosCluster`: a `Cluster` with a timing profile, watchdogs and more faults, and
`leader_host`; import them from `e2e.harness.chaos`."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from controller.runtime import layout_keys
from controller.runtime.leader_record import current_leader
from controller.runtime.store import Store
from e2e.harness.chaos_profiles import DEFAULT_PROFILE, TimingProfile
from e2e.harness.cluster import DEFAULT_PREFIX, Cluster, ClusterError
from e2e.harness.etcd import EtcdMember
from e2e.harness.frozen import Frozen, alive
from e2e.harness.host_support import wait_until
from e2e.harness.hosts import SimulatedHost

ELECTION_NAME = "controller"
"""The election every `kvmctl controller` campaigns in."""


class ChaosCluster(Cluster):
    """A `Cluster` with a timing profile, optional 3-member etcd, watchdogs and more faults.

    The guests boot from kernel and initrd, without disks: agents run with `--no-storage`, except
    on `storage_host` (none by default), whose agent serves tgtd as in `Cluster`.
    """

    def __init__(
        self,
        kvm_hosts: Sequence[str] = ("host1", "host2", "host3"),
        *,
        profile: TimingProfile = DEFAULT_PROFILE,
        etcd_members: int = 1,
        watchdog: bool = False,
        controller_hosts: Sequence[str] | None = None,
        prefix: str = DEFAULT_PREFIX,
        etcd_hosts: Sequence[str] = (),
        storage_host: str | None = None,
    ) -> None:
        super().__init__(
            kvm_hosts,
            storage_host=storage_host,
            prefix=prefix,
            agent_args=profile.agent_args(),
            etcd_members=etcd_members,
            etcd_args=profile.etcd_args,
            etcd_hosts=etcd_hosts,
        )
        self.profile = profile
        self.etcd_members = etcd_members
        self.watchdog = watchdog
        self.controller_hosts = list(kvm_hosts if controller_hosts is None else controller_hosts)
        self._stopped_agents: dict[str, Frozen] = {}
        """Host -> its agent, stopped by `stop_agent`."""

    def stop(self) -> None:
        for name in list(self._stopped_agents):
            self.release_stopped_agent(name)
        super().stop()

    # Faults.

    def kill_agent(self, name: str) -> None:
        """SIGKILL the host's agent alone; its guests keep running."""
        os.kill(self.agents.pop(name), signal.SIGKILL)

    def stop_agent(self, name: str) -> None:
        """SIGSTOP the host's agent: it hangs, holding everything, feeding nothing.

        The agent's launcher (`nsenter`, outside the host) mirrors the stop and so cannot reap
        the agent once the host dies; a host whose init died waits for every process of its
        PID namespace to be reaped, so it would never finish dying. `restore` and `stop`
        continue the launcher (which continues the agent, if it still lives).
        """
        self._stopped_agents[name] = Frozen.freeze(self.agents[name])

    def release_stopped_agent(self, name: str) -> bool:
        """Continue the launcher of an agent stopped by `stop_agent` (see there), which
        continues the agent if it still lives; False if the agent was not stopped."""
        stopped = self._stopped_agents.pop(name, None)
        if stopped is None:
            return False
        stopped.thaw(f"agent of {name}")
        return True

    def agent_alive(self, name: str) -> bool:
        """Whether the host's agent process lives (a stopped one does; one that died with its
        host, or was killed, does not)."""
        return alive(self.agents.get(name))

    def kill_controller(self, name: str) -> None:
        """SIGKILL the controller of host `name`."""
        os.kill(self.controllers.pop(name), signal.SIGKILL)

    def kill_etcd_member(self, index: int) -> None:
        self._etcd_member(index).kill()

    def restart_etcd_member(self, index: int) -> None:
        """Start a killed member again with its data; wait until it is healthy."""
        member = self._etcd_member(index)
        member.start(state="existing")
        member.wait_healthy(60.0)

    def restore(self, name: str) -> None:
        """Power on / reconnect the host, and restart its agent or controller if they died."""
        host = self.lab[name]
        agent = self.agents.get(name)
        # A stopped agent dies only with its host: let the host finish dying.
        if self.release_stopped_agent(name) and not alive(agent):
            wait_until(lambda: not host.is_running(), 30.0, f"{name} powered off")
        super().restore(name)
        if not alive(self.agents.get(name)):
            self._spawn_agent(host)
        if name in self.controller_hosts and not alive(self.controllers.get(name)):
            self._spawn_controller(host)

    # Internals.

    def _etcd_member(self, index: int) -> EtcdMember:
        if self.etcd_hosts:
            raise ClusterError("etcd runs inside the hosts: kill or cut the host instead")
        if self.etcd is None:
            raise ClusterError("the cluster is not started")
        return self.etcd.members[index]

    def _start_daemons(self, name: str) -> None:
        host = self.lab[name]
        self._spawn_agent(host)
        if name in self.controller_hosts:
            self._spawn_controller(host)

    def _agent_argv(self, name: str) -> list[str]:
        argv = super()._agent_argv(name)
        return argv if name == self.storage_host else [*argv, "--no-storage"]

    def _spawn_agent(self, host: SimulatedHost) -> None:
        argv = self._agent_argv(host.name)
        if self.watchdog:
            host.stop_watchdog()  # the previous one watched the previous power-on's init
            fifo = host.start_watchdog(self.profile.watchdog_timeout)
            argv += ["--watchdog", str(fifo)]
        self.agents[host.name] = host.spawn(argv, log_path=host.dir / "agent.log")

    def _spawn_controller(self, host: SimulatedHost) -> None:
        argv = [*self._controller_argv(host.name), *self.profile.controller_args()]
        self.controllers[host.name] = host.spawn(argv, log_path=host.dir / "controller.log")


async def leader_host(store: Store) -> str | None:
    """The identity (host name) of the elected controller, None while there is none."""
    leader = await current_leader(
        store.client, layout_keys.absolute(store.prefix, layout_keys.leader(ELECTION_NAME))
    )
    return None if leader is None else leader.identity
