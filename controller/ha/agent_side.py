"""What a host agent does for the HA contract beyond its reconcilers (docs/ha.md).

- It reports the kvmctl domains that have a qemu process on its host (`{prefix}/reports/{node}`,
  `controller/ha/requests.py`), so the engine knows what may run where even after placements
  moved (a VM's own status is only written while it is placed on the reporting node).
- When it finds its node **Fenced**, it destroys every kvmctl domain it finds and reports that
  it did so after this very fence (the report names the fence's `confirmedAt`): only then does
  the engine let the node back Online. Clock offsets between hosts do not matter.
- While it is past its self-fence deadline, it keeps destroying any kvmctl domain that appears.

`HaReporter.run(...)` does all three in one loop; the agent starts it as one of its tasks and
calls `wake()` on changes of its ClusterNode and on libvirt lifecycle events.
`heartbeat_timing(HaTimings())` gives the agent the engine's timing defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime

from controller.runtime.events import EventRecorder
from controller.runtime.heartbeat import HeartbeatTiming
from controller.runtime.store import Store, StoreError
from crds import ClusterNode
from crds.event import ObjectReference
from reconcilers.drivers.libvirt import (
    LibvirtError,
    LibvirtHost,
)
from reconcilers.virtualmachine import ACTIVE_STATES, destroy_every_domain

from .agent_rules import must_clean_after_fence
from .environment import HaTimings, acked_but_running
from .requests import NodeReport, read_report, write_report

log = logging.getLogger(__name__)


def heartbeat_timing(timings: HaTimings) -> HeartbeatTiming:
    """The agent's heartbeat timing that matches the engine's `timings`.

    etcd leases have whole-second TTLs: a fractional `lease_ttl` is refused rather than rounded
    (rounding up would let the server hold the lease longer than the engine assumes).
    """
    ttl = math.floor(timings.lease_ttl)
    if ttl != timings.lease_ttl:
        raise ValueError(f"lease_ttl must be a whole number of seconds, got {timings.lease_ttl}")
    return HeartbeatTiming(ttl, timings.renew_interval, timings.self_fence_margin)


async def running_domains(host: LibvirtHost) -> frozenset[str]:
    """VMs with a kvmctl domain (owner uid in its metadata) that has a qemu process here."""
    return frozenset(
        domain.metadata.get("vm", domain.name)
        for domain in await host.list_domains()
        if domain.metadata.get("uid") and domain.state in ACTIVE_STATES
    )


class HaReporter:
    """The agent's HA duties for node `node`; see the module docstring."""

    def __init__(
        self,
        store: Store,
        node: str,
        timings: HaTimings | None = None,
        recorder: EventRecorder | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.recorder = recorder
        self.interval = (timings or HaTimings()).renew_interval
        self._written: NodeReport | None = None
        self._cleaned_fence: datetime | None = None
        self._loaded = False
        self._wake = asyncio.Event()
        self._stale = True
        """Woken since the last full look: read every domain again."""
        self._seen: frozenset[int] | None = None
        """The host's active domains (`LibvirtHost.active_domain_ids`) when last fully looked at
        and reported; None when that look did not end with the report written."""

    def wake(self) -> None:
        """Look again now (the node object changed, or a domain started or stopped)."""
        self._stale = True
        self._wake.set()

    async def run(
        self,
        own_node: Callable[[], ClusterNode | None],
        host: Callable[[], LibvirtHost | None],
        past_deadline: Callable[[], bool],
    ) -> None:
        """Until cancelled: self-fence enforcement, cleaning after a fence, reports.

        `own_node()` is the node's object from the agent's cache, `host()` the current libvirt
        connection (None while disconnected), `past_deadline()` True while the agent is past its
        self-fence deadline without a renewed lease.
        """
        while True:
            self._wake.clear()
            connection = host()
            if connection is not None:
                try:
                    await self.step(own_node(), connection, past_deadline())
                except (LibvirtError, StoreError) as error:
                    log.warning("HA report of %s: %s; retrying", self.node, error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()

    async def step(self, node: ClusterNode | None, host: LibvirtHost, past_deadline: bool) -> None:
        """One look: destroy what must not run, then report what runs (if it changed)."""
        if past_deadline:
            destroyed = await destroy_every_domain(host)
            if destroyed:
                log.error("%s is past its self-fence deadline: destroyed %s", self.node, destroyed)
            return  # etcd is presumably unreachable: no report
        if not self._loaded:
            previous = await read_report(self.store, self.node)
            self._cleaned_fence = None if previous is None else previous.cleaned_fence
            self._loaded = True
        fence = None if node is None else node.status.fence
        health = None if node is None else node.status.health
        confirmed_at = None if fence is None else fence.confirmed_at
        if must_clean_after_fence(health, confirmed_at, self._cleaned_fence):
            assert fence is not None
            destroyed = await destroy_every_domain(host)
            log.warning(
                "%s found its node Fenced (%s): destroyed %s",
                self.node,
                fence.how,
                ", ".join(destroyed) or "nothing",
            )
            if destroyed and fence.how == "ManualAck":
                await self._warn_acked_but_running(destroyed)
            self._cleaned_fence = fence.confirmed_at
        # Between wakes (libvirt events, node changes) one cheap listing tells whether a full
        # one (every domain's XML) could find anything new since the last report.
        active = await host.active_domain_ids()
        written = self._written
        fence_reported = written is not None and written.cleaned_fence == self._cleaned_fence
        if not self._stale and fence_reported and active == self._seen:
            return
        self._stale, self._seen = False, None
        domains = await running_domains(host)
        if written is None or written.domains != domains or not fence_reported:
            report = NodeReport(domains, self._cleaned_fence, datetime.now(UTC))
            await write_report(self.store, self.node, report)
            self._written = report
        self._seen = active

    async def _warn_acked_but_running(self, destroyed: list[str]) -> None:
        """An operator acknowledged this node as off while it ran VMs: say so where they look."""
        if self.recorder is None:
            return
        for emit in acked_but_running(self.node, sorted(destroyed)):
            involved = ObjectReference(kind=emit.kind, name=emit.name)
            await self.recorder.record(involved, emit.type, emit.reason, "%s", emit.message)
