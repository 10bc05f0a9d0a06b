"""One convergence pass of a Bond spec over a namespace's links (`BondConverger`): every check
first, then the steps (the bond and its slaves, the bridge, addresses, MTU), refusing what would
cut the cluster network. The reconciler that runs it is `bond.py`.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, field

from crds.bond import BondSpec, SlaveStatus
from reconcilers.drivers.netlink import Link, Netlink, NetlinkDriverError


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
