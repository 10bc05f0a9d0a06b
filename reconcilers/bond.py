"""Bond reconciler: bonded NICs on this node, optionally under a bridge carrying the addresses.

Level-triggered: every pass reads the links and converges the smallest step set from whatever is
there (no bond, a foreign slave, a wrong mode, a slave down, no bridge, wrong addresses or MTU).
Everything that would cut the cluster network (the link carrying this node's ClusterNode
`spec.addresses.cluster`, and every link below it) is refused with `DisruptionNotAllowed` unless
the Bond sets `allowDisruption`. Deleting a Bond object leaves the host's links as they are:
tearing down a node's network is a job for a person at a console, not for a controller.

Problems that retrying cannot fix right now (a missing slave, no bonding in the kernel, a name
taken by another kind of link) become `Ready=False` with a CamelCase reason and a Warning event;
nothing is created before every check passed. Link changes reach the queue through
`watch_bond_links` (netlink events), so status (active slave, carriers) follows failovers.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn

from controller.runtime.events import EventRecorder
from controller.runtime.informer import Informer, KeySink
from controller.runtime.reconcile import Result, RetryableError, set_ready
from controller.runtime.store import Store
from crds import Bond, ClusterNode
from crds.bond import BondSpec, SlaveStatus
from crds.meta import ConditionStatus
from reconcilers.drivers.netlink import Link, Netlink, NetlinkDriverError

log = logging.getLogger(__name__)

DEFAULT_RESYNC = 60.0
"""Seconds between passes over a converged bond (link events trigger passes in between)."""
WAIT_RETRY = 1.0
"""Seconds before another pass when a step waits for the kernel (a slave's carrier)."""


class BondProblem(Exception):
    """The bond cannot converge now; `reason` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class ObservedBond:
    """What the kernel shows for a Bond's links after a pass."""

    exists: bool = False
    active_slave: str | None = None
    slaves: list[SlaveStatus] = field(default_factory=list)


class Verdict(NamedTuple):
    """A condition's status, reason and message."""

    status: ConditionStatus
    reason: str
    message: str


def _is_link_local(cidr: str) -> bool:
    return ipaddress.ip_interface(cidr).ip.is_link_local


class BondConverger:
    """One convergence pass of one Bond spec over one namespace's links.

    `cluster_address` is the node's cluster-network address (None when unknown): the links
    carrying it are protected. `actions` collects what was changed, for a Normal event.
    """

    def __init__(self, nl: Netlink, spec: BondSpec, cluster_address: str | None) -> None:
        self.nl = nl
        self.spec = spec
        self.cluster_address = cluster_address
        self.actions: list[str] = []
        self.waiting: list[str] = []
        self.links: dict[str, Link] = {}
        self.protected: set[str] = set()

    async def run(self) -> None:
        """Converge; raise `BondProblem` (before changing anything) when it cannot."""
        await self.refresh()
        self.check()
        await self.converge_bond()
        if self.spec.bridge is not None:
            await self.converge_bridge(self.spec.interface)
            await self.converge_addresses(
                self.spec.bridge.name, [str(a) for a in self.spec.bridge.addresses]
            )
            await self.converge_addresses(self.spec.interface, [])
        else:
            await self.converge_addresses(
                self.spec.interface, [str(a) for a in self.spec.addresses]
            )

    async def refresh(self) -> None:
        self.links = {link.name: link for link in await self.nl.links()}
        self.protected = await self.cluster_links()

    async def cluster_links(self) -> set[str]:
        """The link carrying the cluster address and every link below it (its ports, theirs)."""
        if self.cluster_address is None:
            return set()
        carrier = None
        for name in self.links:
            cidrs = [a.cidr.split("/")[0] for a in await self.nl.addresses(name)]
            if self.cluster_address in cidrs:
                carrier = name
                break
        if carrier is None:
            return set()
        protected = {carrier}
        grew = True
        while grew:
            below = {n for n, link in self.links.items() if link.master in protected}
            grew = not below <= protected
            protected |= below
        return protected

    def _refuse_unless_allowed(self, link: str, what: str) -> None:
        if link in self.protected and not self.spec.allow_disruption:
            raise BondProblem(
                "DisruptionNotAllowed",
                f"{what} would cut the cluster network ({self.cluster_address} is carried over "
                f"{link}); set allowDisruption: true on the Bond to do it anyway",
            )

    def check(self) -> None:
        """Every precondition, before anything is changed."""
        spec = self.spec
        missing = [slave for slave in spec.slaves if slave not in self.links]
        if missing:
            raise BondProblem(
                "SlaveMissing",
                f"slave {', '.join(missing)} of bond {spec.interface} does not exist on this node",
            )
        names = [(spec.interface, "bond")]
        if spec.bridge is not None:
            names.append((spec.bridge.name, "bridge"))
        for name, kind in names:
            link = self.links.get(name)
            if link is not None and link.kind != kind:
                raise BondProblem(
                    "InterfaceConflict",
                    f"{name} exists as a {link.kind or 'plain'} link, not a {kind}; rename or "
                    "remove it, or choose another name",
                )
        for slave in spec.slaves:
            link = self.links[slave]
            if link.master != spec.interface:
                self._refuse_unless_allowed(slave, f"enslaving {slave} to {spec.interface}")
            if link.kind in ("bond", "bridge"):
                raise BondProblem(
                    "InvalidSlave", f"slave {slave} is a {link.kind}, not a network interface"
                )

    async def converge_bond(self) -> None:
        spec, nl = self.spec, self.nl
        name = spec.interface
        if name not in self.links:
            try:
                await nl.create_bond(name, spec.mode, spec.miimon)
            except NetlinkDriverError as error:
                if error.code == errno.EOPNOTSUPP:
                    raise BondProblem(
                        "BondingUnsupported",
                        f"this node's kernel has no bonding support: cannot create {name}",
                    ) from None
                raise
            self.actions.append(f"created bond {name} ({spec.mode})")
            await self.refresh()
        info = await nl.bond_info(name)
        if info.mode != spec.mode:
            self._refuse_unless_allowed(name, f"changing the mode of {name} (it must go down)")
            await self._change_mode(info.slaves)
            info = await nl.bond_info(name)
        if info.miimon != spec.miimon:
            await nl.set_bond_options(name, miimon=spec.miimon)
            self.actions.append(f"set miimon of {name} to {spec.miimon}")
        for slave in spec.slaves:
            await self._enslave(slave, name)
        await self.refresh()
        if spec.primary is not None and info.primary != spec.primary:
            await nl.set_bond_options(name, primary=spec.primary)
            self.actions.append(f"set primary of {name} to {spec.primary}")
        await self._release_foreign_slaves(name)
        for slave in spec.slaves:
            if not self.links[slave].up:
                await nl.set_up(slave)
                self.actions.append(f"set {slave} up")
        await self._converge_mtu(name)
        if not self.links[name].up:
            await nl.set_up(name)
            self.actions.append(f"set {name} up")

    async def _change_mode(self, slaves: list[str]) -> None:
        """The kernel changes the mode only of a bond that is down and has no slaves."""
        name = self.spec.interface
        for slave in slaves:
            await self.nl.release(slave)
        await self.nl.set_down(name)
        await self.nl.set_bond_options(name, mode=self.spec.mode)
        self.actions.append(f"changed mode of {name} to {self.spec.mode}")
        await self.refresh()

    async def _enslave(self, slave: str, master: str) -> None:
        link = self.links[slave]
        if link.master == master:
            return
        if link.master is not None:
            await self.nl.release(slave)
        addresses = [a.cidr for a in await self.nl.addresses(slave)]
        await self.nl.enslave(slave, master)
        for cidr in addresses:
            if not _is_link_local(cidr):
                await self.nl.del_address(slave, cidr)
        self.actions.append(f"enslaved {slave} to {master}")

    async def _release_foreign_slaves(self, name: str) -> None:
        foreign = [
            link.name
            for link in self.links.values()
            if link.master == name and link.name not in self.spec.slaves
        ]
        if not foreign:
            return
        carrying = [s for s in self.spec.slaves if self.links[s].carrier]
        if name in self.protected and not carrying and not self.spec.allow_disruption:
            self.waiting.append(
                f"releasing {', '.join(foreign)} waits until a slave of {name} has carrier"
            )
            return
        for slave in foreign:
            await self.nl.release(slave)
            self.actions.append(f"released foreign slave {slave} from {name}")
        await self.refresh()

    async def _converge_mtu(self, name: str) -> None:
        if self.spec.mtu is not None and self.links[name].mtu != self.spec.mtu:
            await self.nl.set_mtu(name, self.spec.mtu)
            self.actions.append(f"set MTU of {name} to {self.spec.mtu}")

    async def converge_bridge(self, port: str) -> None:
        """The spec's bridge exists, is up, has `port` as a port and carries the addresses
        before the port joins it (so an address on the port moves without a gap)."""
        bridge = self.spec.bridge
        assert bridge is not None
        if bridge.name not in self.links:
            await self.nl.create_bridge(bridge.name)
            self.actions.append(f"created bridge {bridge.name}")
            await self.refresh()
        if self.links[port].master != bridge.name:
            if self.links[port].master is not None:
                self._refuse_unless_allowed(port, f"moving {port} to bridge {bridge.name}")
                await self.nl.release(port)
            await self.converge_addresses(
                bridge.name, [str(a) for a in bridge.addresses], remove_extra=False
            )
            await self.nl.enslave(port, bridge.name)
            self.actions.append(f"enslaved {port} to bridge {bridge.name}")
            await self.refresh()
        await self._converge_mtu(bridge.name)
        if not self.links[bridge.name].up:
            await self.nl.set_up(bridge.name)
            self.actions.append(f"set {bridge.name} up")

    async def converge_addresses(
        self, name: str, wanted: list[str], remove_extra: bool = True
    ) -> None:
        """Exactly `wanted` (plus IPv6 link-local) on `name`; the cluster address is only ever
        removed from a link when another link already carries it, or with allowDisruption."""
        present = [a.cidr for a in await self.nl.addresses(name)]
        for cidr in wanted:
            if cidr not in present:
                await self.nl.add_address(name, cidr)
                self.actions.append(f"added {cidr} to {name}")
        if not remove_extra:
            return
        for cidr in present:
            if cidr in wanted or _is_link_local(cidr):
                continue
            if cidr.split("/")[0] == self.cluster_address and not self._carried_elsewhere(cidr):
                self._refuse_unless_allowed(name, f"removing {cidr} from {name}")
            await self.nl.del_address(name, cidr)
            self.actions.append(f"removed {cidr} from {name}")

    def _carried_elsewhere(self, cidr: str) -> bool:
        bridge = self.spec.bridge
        return bridge is not None and cidr in [str(a) for a in bridge.addresses]

    async def observe(self) -> ObservedBond:
        """Bond existence, active slave and each slave's carrier, read fresh."""
        links = {link.name: link for link in await self.nl.links()}
        bond = links.get(self.spec.interface)
        if bond is None or bond.kind != "bond":
            return ObservedBond()
        info = await self.nl.bond_info(self.spec.interface)
        slaves = [
            SlaveStatus(
                name=slave,
                carrier=slave in links and links[slave].carrier,
                active=slave == info.active_slave,
            )
            for slave in self.spec.slaves
        ]
        return ObservedBond(True, info.active_slave, slaves)


class BondReconciler:
    """Reconciles the Bonds whose `spec.node` is `node`, in network namespace `netns`."""

    def __init__(
        self,
        store: Store,
        node: str,
        recorder: EventRecorder,
        netns: str | None = None,
        resync: float = DEFAULT_RESYNC,
    ) -> None:
        self.store = store
        self.node = node
        self.recorder = recorder
        self.netns = netns
        self.resync = resync

    async def reconcile(self, key: str) -> Result:
        bond = await self.store.try_get("Bond", key)
        if not isinstance(bond, Bond) or bond.spec.node != self.node:
            return Result()
        if bond.metadata.deletion_timestamp is not None:
            return Result()
        cluster_address = await self._cluster_address()
        problem: BondProblem | None = None
        error: NetlinkDriverError | None = None
        async with Netlink(self.netns) as nl:
            converger = BondConverger(nl, bond.spec, cluster_address)
            try:
                await converger.run()
            except BondProblem as caught:
                problem = caught
            except NetlinkDriverError as caught:
                error = caught
                problem = BondProblem("NetlinkError", str(caught))
            observed = await converger.observe()
        if converger.actions:
            await self.recorder.record(bond, "Normal", "Converged", "; ".join(converger.actions))
        await self._write_status(bond, problem, converger.waiting, observed)
        if error is not None:
            raise RetryableError(f"bond {bond.spec.interface}: {error}")
        if converger.waiting:
            return Result(requeue_after=WAIT_RETRY)
        return Result(requeue_after=self.resync)

    async def _cluster_address(self) -> str | None:
        node = await self.store.try_get("ClusterNode", self.node)
        if not isinstance(node, ClusterNode):
            return None
        return str(node.spec.addresses.cluster)

    async def _write_status(
        self,
        bond: Bond,
        problem: BondProblem | None,
        waiting: list[str],
        observed: ObservedBond,
    ) -> None:
        generation = bond.metadata.generation
        without_carrier = [s.name for s in observed.slaves if not s.carrier]
        if problem is not None:
            configured = Verdict("False", problem.reason, problem.message)
        elif waiting:
            configured = Verdict("False", "Progressing", "; ".join(waiting))
        else:
            configured = Verdict("True", "Converged", f"{bond.spec.interface} matches the spec")
        if configured.status == "False":
            ready = configured
        elif observed.active_slave is None and bond.spec.mode == "active-backup":
            ready = Verdict("False", "NoActiveSlave", "the bond has no active slave")
        elif len(without_carrier) == len(observed.slaves):
            ready = Verdict("False", "NoCarrier", "no slave of the bond has carrier")
        else:
            ready = configured
        degraded = (
            Verdict("True", "SlaveNoCarrier", f"no carrier on {', '.join(without_carrier)}")
            if without_carrier
            else Verdict("False", "AllSlavesUp", "every slave has carrier")
        )
        newly_failed = False

        def mutate(current: Bond) -> bool:
            nonlocal newly_failed
            status = current.status
            before = status.model_dump()
            status.active_slave = observed.active_slave
            status.slaves = observed.slaves
            status.set_condition("Configured", *configured, observed_generation=generation)
            status.set_condition("Degraded", *degraded, observed_generation=generation)
            newly_failed = set_ready(status, *ready, generation)
            return status.model_dump() != before

        await self.store.patch_status("Bond", bond.metadata.name, mutate)
        if newly_failed:
            await self.recorder.record(bond, "Warning", ready.reason, ready.message)


def bond_keys_for_link(bonds: Iterable[Bond], node: str, link: str) -> list[str]:
    """Names of the Bonds on `node` that use link `link` (as bond, slave or bridge)."""
    keys = []
    for bond in bonds:
        spec = bond.spec
        if spec.node != node:
            continue
        names = {spec.interface, *spec.slaves}
        if spec.bridge is not None:
            names.add(spec.bridge.name)
        if link in names:
            keys.append(bond.metadata.name)
    return keys


async def watch_bond_links(
    netns: str | None, node: str, bonds: Informer, queue: KeySink
) -> NoReturn:
    """Enqueue the Bonds that use a link whenever it changes (carrier, master, up/down).

    Runs until cancelled. When the kernel dropped events (the watch fell behind: ENOBUFS), it
    watches anew and enqueues every Bond of this node, since any of their links may have
    changed unseen. Any other failure raises `NetlinkDriverError`, so the task group running
    it fails instead of carrying on without link events.
    """
    async with Netlink(netns) as nl:
        while True:
            try:
                async for event in nl.watch_links():
                    if event.action == "existing":
                        continue
                    for key in bond_keys_for_link(_cached_bonds(bonds), node, event.link.name):
                        queue.add(key)
            except NetlinkDriverError as error:
                if error.code != errno.ENOBUFS:
                    raise
                log.warning("%s; re-reading every Bond of %s", error, node)
                for bond in _cached_bonds(bonds):
                    if bond.spec.node == node:
                        queue.add(bond.metadata.name)
                continue
            raise NetlinkDriverError(f"the link watch in {netns or 'the current namespace'} ended")


def _cached_bonds(bonds: Informer) -> list[Bond]:
    return [bond for bond in bonds.list() if isinstance(bond, Bond)]
