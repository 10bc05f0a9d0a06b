"""The state one `Engine.step` works on, shared by the engine's parts (`engine.py`).

The transient state the engine keeps between steps (fence progress, reported warnings, VMs
being recovered, drained nodes), the views of the step being decided and the actions so far,
and the helpers every part uses: emitting events, setting timers, placing a VM.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.exclusive import Claims, KnownResources
from crds.clusternode import NodeHealth

from .environment import (
    Action,
    Emit,
    EventType,
    HaTimings,
    NodeView,
    Place,
    VmView,
    World,
)
from .placement import DiskHolders, Usage
from .storage_loss import StorageLossWatch


@dataclass
class _Fencing:
    """Progress of fencing one node: which method is next, what is in flight, the backoff."""

    backoff: float
    method_index: int = 0
    attempt: int | None = None
    retry_at: float = 0.0
    announced: bool = False


class EngineCore:
    """What every part of the engine shares; see `Engine`."""

    _world: World
    _actions: list[Action]
    _health: dict[str, NodeHealth]
    _placement: dict[str, str | None]
    _usage: Usage
    _migrations: int
    _silent: frozenset[str]
    _nodes: dict[str, NodeView]
    _reported_on: dict[str, set[str]]
    """VM -> the nodes whose agent reports a domain of it."""
    _disks: DiskHolders
    _disk_blocked: set[str]
    _held: set[str]
    _plan: dict[str, str] | None
    _planned: bool

    def __init__(self, timings: HaTimings | None = None) -> None:
        self.timings = timings or HaTimings()
        self._known = KnownResources(Claims(macs=False))
        self._fencing: dict[str, _Fencing] = {}
        self._next_attempt = 1
        self._reported: dict[str, tuple[str, str]] = {}
        self._recovering: set[str] = set()
        self._drained: set[str] = set()
        self._storage = StorageLossWatch()
        self.next_wakeup: float | None = None
        """The earliest time a timer of the engine fires (self-fence grace, fence retry, restart
        window); when a node may turn silent is the loop's to watch (`engine_loop.silence_look`)."""

    @property
    def _now(self) -> float:
        return self._world.now

    def _emit(
        self, node_or_vm: NodeView | VmView, reason: str, message: str, type_: EventType = "Normal"
    ) -> None:
        if isinstance(node_or_vm, NodeView):
            emit = Emit("ClusterNode", node_or_vm.name, reason, message, type_)
        else:
            emit = Emit("VirtualMachine", node_or_vm.name, reason, message, type_)
        self._actions.append(emit)

    def _wake_at(self, when: float) -> None:
        if self.next_wakeup is None or when < self.next_wakeup:
            self.next_wakeup = when

    def _report(self, vm: VmView, reason: str, message: str) -> None:
        """A Warning, emitted again only when it changes."""
        if self._reported.get(vm.name) != (reason, message):
            self._reported[vm.name] = (reason, message)
            self._emit(vm, reason, message, "Warning")

    def _place(self, vm: VmView, node: str | None, relocation: bool = False) -> None:
        old = self._placement[vm.name]
        if old is not None:
            self._usage.remove(vm.name, vm.spec, old)
        if node is not None:
            self._usage.add(vm.name, vm.spec, node)
            self._disks.add(vm)
            if self._plan is not None and self._plan.get(vm.name) != node:
                self._plan = None  # admission's plan no longer describes the world
        self._placement[vm.name] = node
        self._reported.pop(vm.name, None)
        self._actions.append(Place(vm.name, node, relocation))
