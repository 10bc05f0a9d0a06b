"""The host agent's libvirt connection (`controller/agent.py`): opened, watched, reopened.

`open` retries until libvirtd answers. `run` (the VM controller's "libvirt events" source)
lists the host's kvmctl domains, enqueues their VMs and every VM of this node, then hands each
lifecycle and watchdog event to `on_event`; a lost connection is closed and reopened, and
everything is looked at again. Every new or lost connection is passed to `on_host`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from controller.agent_vms import NodeVms
from controller.runtime.informer import Informer, KeySink
from crds import AnyResource
from reconcilers.drivers.libvirt import DomainEvent, LibvirtError, LibvirtHost, LibvirtUnavailable

log = logging.getLogger(__name__)

RECONNECT_DELAY = 1.0


class LibvirtLink:
    """Node `node`'s connection to libvirt at `uri`; see the module docstring."""

    def __init__(
        self,
        node: str,
        uri: str,
        vms: Informer[AnyResource],
        vm_filter: NodeVms,
        on_event: Callable[[DomainEvent, KeySink], None],
        on_host: Callable[[LibvirtHost | None], None],
    ) -> None:
        self.node = node
        self.uri = uri
        self.vms = vms
        self.vm_filter = vm_filter
        self.on_event = on_event
        self.on_host = on_host
        self.host: LibvirtHost | None = None

    def _set(self, host: LibvirtHost | None) -> None:
        self.host = host
        self.on_host(host)

    async def open(self) -> LibvirtHost:
        """Connect, retrying until libvirt answers."""
        while True:
            try:
                host = await LibvirtHost.connect(self.uri)
            except LibvirtError as error:
                log.warning("%s; retrying", error)
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            self._set(host)
            return host

    async def close(self) -> None:
        if self.host is not None:
            await self.host.close()

    async def run(self, vm_queue: KeySink) -> None:
        """Hand every libvirt event to `on_event`; reconnect when the connection is lost."""
        while True:
            host = self.host
            if host is None:
                host = await self.open()
            with host.events() as events:
                try:
                    domains = await host.list_domains()
                    own = [d.metadata.get("vm", d.name) for d in domains if d.metadata.get("uid")]
                    self.vm_filter.listed(own)
                    for name in own:
                        vm_queue.add(name)
                    for vm in self.vms.list():
                        if self.vm_filter.concerns(vm):
                            vm_queue.add(vm.metadata.name)
                    async for event in events:
                        self.on_event(event, vm_queue)
                except LibvirtUnavailable as error:
                    log.warning("libvirt on %s lost: %s; reconnecting", self.node, error)
            self._set(None)
            await host.close()
            await asyncio.sleep(RECONNECT_DELAY)
