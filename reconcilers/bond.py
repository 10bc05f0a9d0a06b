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

The parts: this module (reconcile and status), `bond_converge.py` (the checks and steps of a
pass), `bond_links.py` (link events to the queue).
"""

from __future__ import annotations

from typing import NamedTuple

from controller.runtime.events import EventRecorder
from controller.runtime.reconcile import Result, RetryableError, set_ready
from controller.runtime.store import Store
from crds import Bond, ClusterNode
from crds.meta import ConditionStatus
from reconcilers.bond_converge import BondConverger, BondProblem, ObservedBond
from reconcilers.drivers.netlink import Netlink, NetlinkDriverError

DEFAULT_RESYNC = 60.0
"""Seconds between passes over a converged bond (link events trigger passes in between)."""
WAIT_RETRY = 1.0
"""Seconds before another pass when a step waits for the kernel (a slave's carrier)."""


class Verdict(NamedTuple):
    """A condition's status, reason and message."""

    status: ConditionStatus
    reason: str
    message: str


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
