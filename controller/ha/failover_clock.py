"""Times failovers for `kvmctl_failover_duration_seconds`: from the moment this controller knew
a node was lost (its lease gone, on the loop's clock) to the moment a VM recovered from it is
reported Running on its new node, labelled by how the node was fenced (`PowerOff`,
`SelfFence`, `ManualAck`).

Kept per term: a failover the controller did not finish timing when its term ended is not
measured (the next leader does not know when the node was lost).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controller.runtime import telemetry
from crds import VirtualMachine


@dataclass(frozen=True)
class _Pending:
    target: str
    lost_at: float
    fence: str


class FailoverClock:
    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def started(self, vm: str, target: str, lost_at: float, fence: str) -> None:
        """`vm` was placed on `target` after its node, lost at `lost_at`, was fenced."""
        self._pending[vm] = _Pending(target, lost_at, fence)

    def observe(self, vms: Iterable[VirtualMachine], now: float) -> None:
        """Record the failovers whose VM now runs on its target; forget those placed elsewhere."""
        current = {vm.metadata.name: vm for vm in vms}
        for name, pending in list(self._pending.items()):
            vm = current.get(name)
            placement = None if vm is None else vm.status.placement
            if vm is None or placement is None or placement.node != pending.target:
                del self._pending[name]
            elif vm.status.state == "Running" and vm.status.node == pending.target:
                telemetry.record_failover(max(0.0, now - pending.lost_at), pending.fence)
                del self._pending[name]
