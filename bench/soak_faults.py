"""The soak's faults on a `three-hosts` cluster (etcd and a controller on every host): injecting
one, and undoing it. `bench.soak` drives them; its docstring says what each one does.

Every fault but `double-fault` leaves a quorum: at most one etcd member is down at a time, and the
soak injects a fault only once every member is healthy again (`HostEtcd.all_healthy`). With one
member on each of three hosts, losing two hosts loses etcd's quorum; `double-fault` (a host's
power cut while another host's agent is stopped, whose watchdog resets that host a second later)
does exactly that: nothing can be fenced, recovered or even recorded until etcd has two members
again. So, once the second host died, the soak repairs the cluster as an operator would: it
powers both hosts on again, and again whenever it finds one off until the cluster is steady.
(Powering each on once is not enough: as soon as etcd answers again, the cluster fences the
hosts it had lost, a standby's takeover the old leader's host, which may be one that was just
powered on, and etcd is down to one member again.)
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from functools import partial

import aetcd

from controller.runtime.store import Store, StoreError
from e2e.harness import polling
from e2e.harness.chaos import ChaosCluster, leader_host
from e2e.harness.host_etcd import HostEtcd, HostEtcdError
from e2e.harness.host_support import LabError
from e2e.harness.topology import THREE_HOSTS, etcd_leader_host

HOSTS = THREE_HOSTS.kvm_hosts
FAULTS = (
    "power-cut",
    "etcd-leader-power-cut",
    "controller-leader-power-cut",
    "network-cut",
    "agent-kill",
    "agent-hang",
    "leader-kill",
    "etcd-member-kill",
    "etcd-disk-loss",
    "double-fault",
)
HARD_DEADLINE = 120.0
"""A VM not running again this long after a fault is a failure, not a late failover."""


class SoakError(RuntimeError):
    """The cluster did not get back to a steady state within the hard deadline."""


TRANSIENT = (StoreError, aetcd.ClientError, HostEtcdError)
"""What the harness's own etcd reads may raise while an etcd member is down or being elected."""
eventually = partial(
    polling.eventually, timeout=HARD_DEADLINE, interval=0.1, error=SoakError, retry_on=TRANSIENT
)
retrying = partial(polling.retrying, timeout=HARD_DEADLINE, error=SoakError, retry_on=TRANSIENT)


@dataclass
class Injected:
    """What a fault did."""

    description: str
    lost: frozenset[str] = frozenset()
    """Hosts whose VMs must run elsewhere (or, powered on again, anew)."""
    leader_lost: bool = False
    """The leading controller died with the fault."""
    dead: frozenset[str] | None = None
    """Hosts no VM may run on once the cycle is steady (None: `lost`; the hosts of a
    `double-fault` run again by then)."""
    etcd_member: str | None = None
    """The host whose etcd member alone was killed (restarted by `undo`)."""
    disk_lost: bool = False
    """That member's data dir is lost too (`undo` wipes it and replaces the member)."""
    repair: frozenset[str] = frozenset()
    """Hosts powered on again whenever found off until the cycle is steady (`power_on_dead`)."""

    @property
    def forbidden(self) -> frozenset[str]:
        return self.lost if self.dead is None else self.dead


class Faults:
    def __init__(self, cluster: ChaosCluster, store: Store, rng: random.Random) -> None:
        self.cluster = cluster
        self.store = store
        self.rng = rng

    @property
    def etcd(self) -> HostEtcd:
        if self.cluster.host_etcd is None:
            raise SoakError("the soak needs etcd inside the hosts")
        return self.cluster.host_etcd

    async def etcd_healthy(self) -> bool:
        return await asyncio.to_thread(self.etcd.all_healthy)

    async def etcd_leader(self) -> str:
        leader: str = await eventually(
            partial(asyncio.to_thread, etcd_leader_host, self.cluster), "an etcd leader"
        )
        return leader

    async def inject(self, fault: str, leader: str) -> Injected:
        """Apply `fault`; `leader` is the host of the leading controller."""
        cluster = self.cluster
        host = self.rng.choice(HOSTS)
        if fault == "etcd-leader-power-cut":
            host = await self.etcd_leader()
        elif fault == "controller-leader-power-cut":
            host = leader
        if fault in ("power-cut", "etcd-leader-power-cut", "controller-leader-power-cut"):
            await asyncio.to_thread(cluster.kill_host, host)
            return Injected(f"{fault} {host}", frozenset({host}), host == leader)
        if fault == "network-cut":
            await asyncio.to_thread(cluster.cut_network, host)
            return Injected(f"{fault} {host}", frozenset({host}), host == leader)
        # A killed or hung agent stops feeding its watchdog, which resets the host.
        if fault == "agent-kill":
            cluster.kill_agent(host)
            return Injected(f"{fault} {host}", frozenset({host}), host == leader)
        if fault == "agent-hang":
            cluster.stop_agent(host)
            return Injected(f"{fault} {host}", frozenset({host}), host == leader)
        if fault == "leader-kill":
            cluster.kill_controller(leader)
            return Injected(f"{fault} {leader}", leader_lost=True)
        if fault in ("etcd-member-kill", "etcd-disk-loss"):
            await asyncio.to_thread(self.etcd.kill_member, host)
            # The disk loss (its data dir wiped) is the first step of `undo`'s replacement.
            disk_lost = fault == "etcd-disk-loss"
            return Injected(f"{fault} {host}", etcd_member=host, disk_lost=disk_lost)
        if fault == "double-fault":
            return await self.double_fault(leader)
        raise ValueError(f"unknown fault {fault!r}")

    async def double_fault(self, leader: str) -> Injected:
        """Stop one host's agent and cut another's power; once the first host died too (its
        watchdog or a fence), power both on again (see the module docstring)."""
        cut, hung = self.rng.sample(HOSTS, 2)
        self.cluster.stop_agent(hung)
        await asyncio.to_thread(self.cluster.kill_host, cut)
        await eventually(lambda: not self.cluster.agent_alive(hung), f"{hung} reset")
        for name in (cut, hung):
            await self.power_on(name)
        return Injected(
            f"double-fault power-cut {cut} + agent-hang {hung}",
            frozenset({cut, hung}),
            leader in (cut, hung),
            dead=frozenset(),
            repair=frozenset({cut, hung}),
        )

    async def undo(self, injected: Injected) -> float | None:
        """Restart or replace the killed etcd member (the seconds a replacement took to be
        healthy), power every host on, reconnect it, restart killed agents and controllers."""
        member = injected.etcd_member
        rejoined = None
        if member is not None and injected.disk_lost:
            loop = asyncio.get_running_loop()
            began = loop.time()
            try:
                await asyncio.to_thread(self.etcd.replace_member, member)
            except HostEtcdError as error:
                raise SoakError(
                    f"etcd member {member} did not rejoin after its disk loss: {error}"
                ) from error
            rejoined = loop.time() - began
        elif member is not None:
            try:
                await asyncio.to_thread(self.etcd.start_member, member)
            except HostEtcdError as error:
                raise SoakError(f"etcd member {member} did not restart: {error}") from error
        for name in HOSTS:
            await self.power_on(name)
        return rejoined

    async def power_on_dead(self, names: frozenset[str]) -> None:
        """Power on those of `names` found off, as an operator repairing a cluster that lost
        etcd's quorum would: once etcd answers again, the cluster rightly fences a host it had
        lost (its lease expired) even if it was just powered on, and with two of three hosts off
        etcd has no quorum again."""
        for name in sorted(names):
            if not self.cluster.lab[name].is_running():
                print(f"  {name} is off again (fenced once etcd answered): powering it on")
                await self.power_on(name)

    async def power_on(self, name: str) -> None:
        """`restore` the host, again if it died meanwhile: a fence pulls the power of a host
        that was lost (its lease expired) even while it powers on again."""

        async def restored() -> bool:
            try:
                await asyncio.to_thread(self.cluster.restore, name)
            except (LabError, HostEtcdError, TimeoutError) as error:
                print(f"  {name} died while powering on ({error}): again", flush=True)
                return False
            return True

        await eventually(restored, f"{name} powered on")


async def leading_controller(store: Store) -> str:
    leader: str = await eventually(partial(leader_host, store), "a leading controller")
    return leader
