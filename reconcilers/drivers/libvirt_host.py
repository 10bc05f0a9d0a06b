"""`LibvirtHost`: one libvirt connection with its calls on the host's domains.

Each method is one libvirt action on one domain, run in a worker thread (libvirt-python
blocks) so the asyncio loop never waits on the daemon. The connection and its events come from
`LibvirtConnection` (libvirt_connection.py), `migrate` from libvirt_migration.py and
`guest_ping` from libvirt_agent.py.
"""

from __future__ import annotations

import asyncio
import logging

import libvirt

from .libvirt_agent import GuestAgentCalls
from .libvirt_domains import DomainInfo, DomainState, NodeCapacity, domain_info, domain_state
from .libvirt_errors import DomainNotFound, DomainStateConflict
from .libvirt_migration import MigrationCalls

log = logging.getLogger(__name__)

_UNDEFINE_FLAGS = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | (
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)


class LibvirtHost(MigrationCalls, GuestAgentCalls):
    """One libvirt connection, standing for one host. Create it with `connect()`."""

    async def node_info(self) -> NodeCapacity:
        def query() -> NodeCapacity:
            info = self._connection.getInfo()
            return NodeCapacity(
                cpus=int(info[2]),
                memory_mib=int(info[1]),
                hostname=str(self._connection.getHostname()),
            )

        return await self._call("read node info", query)

    async def list_domains(self) -> list[DomainInfo]:
        """Every domain on the host, defined or running (one undefined meanwhile is left out)."""

        def query() -> list[DomainInfo]:
            infos = []
            for domain in self._connection.listAllDomains(0):
                try:
                    infos.append(domain_info(domain))
                except libvirt.libvirtError as error:
                    if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return infos

        return await self._call("list domains", query)

    async def active_domain_ids(self) -> frozenset[int]:
        """The IDs of the domains with a process: one call returning numbers, no domain object
        or XML read. libvirt gives every start a new ID, so a domain started, stopped or
        replaced changes the set; a change of state or metadata does not."""
        return await self._call(
            "list active domain IDs",
            lambda: frozenset(int(i) for i in self._connection.listDomainsID()),
        )

    async def active_domain_names(self) -> frozenset[str]:
        """The names of the domains with a process (no XML read)."""

        def query() -> frozenset[str]:
            domains = self._connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            return frozenset(str(domain.name()) for domain in domains)

        return await self._call("list active domains", query)

    async def lookup(self, name: str) -> DomainInfo | None:
        """The domain called `name`, or None if there is none."""
        try:
            return await self._call(
                f"look up domain {name!r}", lambda: domain_info(self._domain(name))
            )
        except DomainNotFound:
            return None

    async def state(self, name: str) -> DomainState:
        state_number = await self._call(
            f"read state of domain {name!r}", lambda: self._domain(name).state()[0]
        )
        return domain_state(state_number)

    async def domain_xml(self, name: str, inactive: bool = False) -> str:
        """The domain's XML as libvirt holds it (`inactive`: the definition for the next boot)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return await self._call(
            f"read XML of domain {name!r}", lambda: str(self._domain(name).XMLDesc(flags))
        )

    async def define(self, xml: str) -> None:
        """Define (create or replace) a persistent domain; a running one gets the new
        definition at its next start."""
        await self._call("define domain", lambda: self._connection.defineXML(xml))

    async def start(self, name: str) -> None:
        await self._call(f"start domain {name!r}", lambda: self._domain(name).create())

    async def reset(self, name: str) -> None:
        """Reset the running domain in place, like pressing its reset button (virDomainReset)."""
        await self._call(f"reset domain {name!r}", lambda: self._domain(name).reset(0))

    async def destroy(self, name: str) -> None:
        """Stop the domain at once, like pulling the power cord."""
        await self._call(f"destroy domain {name!r}", lambda: self._domain(name).destroy())

    async def undefine(self, name: str) -> None:
        """Remove the definition (a running domain keeps running, as a transient one)."""
        await self._call(
            f"undefine domain {name!r}", lambda: self._domain(name).undefineFlags(_UNDEFINE_FLAGS)
        )

    async def shutdown(self, name: str, timeout: float, poll_interval: float = 0.2) -> bool:
        """Ask the guest to power off (ACPI) and wait up to `timeout` seconds for it; then
        destroy it. True if it shut down by itself (or was already off)."""
        if await self.state(name) is DomainState.SHUTOFF:
            return True
        try:
            await self._call(f"shut down domain {name!r}", lambda: self._domain(name).shutdown())
        except DomainStateConflict:
            if await self.state(name) is DomainState.SHUTOFF:
                return True  # it stopped between the look and the request
            raise
        deadline = self._loop.time() + timeout
        while True:
            if await self.state(name) is DomainState.SHUTOFF:
                return True
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(poll_interval, remaining))
        log.warning("domain %r did not shut down within %.0f s: destroying it", name, timeout)
        try:
            await self.destroy(name)
        except DomainStateConflict:
            return True  # it went off between the last look and the destroy
        return False
