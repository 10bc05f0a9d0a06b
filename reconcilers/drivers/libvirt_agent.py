"""Calls to a domain's qemu-guest-agent, through libvirt (`libvirt_qemu.qemuAgentCommand`).

`GuestAgentCalls` is one of the bases of `LibvirtHost` (libvirt_host.py).
"""

from __future__ import annotations

import libvirt
import libvirt_qemu

from .libvirt_connection import LibvirtConnection

GUEST_PING = '{"execute":"guest-ping"}'
_NO_AGENT_ANSWER = (
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    libvirt.VIR_ERR_AGENT_UNSYNCED,
    libvirt.VIR_ERR_NO_SUPPORT,
)
"""Errors of a guest-agent command that mean "no answer": the agent is not connected or did
not answer in time (86), answered libvirt's `guest-sync` wrongly (97), or this connection's
driver has no guest agents at all (the test driver)."""


class GuestAgentCalls(LibvirtConnection):
    """The guest-agent calls of a libvirt connection."""

    async def guest_ping(self, name: str, timeout: int) -> bool:
        """Send `guest-ping` to the domain's qemu-guest-agent and wait up to `timeout` seconds:
        True if it answered, False if it did not (not connected, no answer in time, or no
        guest agents on this driver). DomainStateConflict if the domain is not running."""

        def ping() -> bool:
            domain = self._domain(name)
            try:
                libvirt_qemu.qemuAgentCommand(domain, GUEST_PING, timeout, 0)
            except libvirt.libvirtError as error:
                if error.get_error_code() in _NO_AGENT_ANSWER:
                    return False
                raise
            return True

        return await self._call(f"ping the guest agent of {name!r}", ping)
