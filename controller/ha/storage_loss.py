"""Storage-path loss: a node's agent reports a path lost that VMs placed there need.

Pure decision code for the engine (docs/ha.md, "Storage-path loss"). The agent checks the paths
the VMs' disks depend on (`Disk.storage_path`: `vg NAME`, `iscsi TARGET`, `file PATH`) and
reports the broken ones in its ClusterNode status (`NodeView.storage_lost`). For an Online node
with a live lease that runs or has placed a started VM needing a lost path, the node's policy
(`spec.fencing.storageLoss`) decides:

- `warn` (the default): a `StorageLost` Warning naming the node, the paths and the VMs;
- `fence`: the same Warning, then, once the path has been lost for `graceSeconds`, the node is
  fenced through the ordinary path (Unknown, Fencing, power off confirmed, Fenced) and only then
  are its VMs recovered, on nodes that report the VM's paths healthy (`placement.ineligibility`).
  Not fenced (only warned) when the node has no power fencing method (self-fencing needs the
  lease to expire, which a healthy agent never lets happen), or when no other node could run
  any of the VMs with a healthy path (the path is lost everywhere: fencing would recover
  nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .environment import Emit, NodeView, VmView, World, power_fenced
from .placement import Usage, ineligibility


@dataclass(frozen=True)
class StorageLoss:
    """What the engine does about one node's lost storage."""

    paths: tuple[str, ...]
    """The lost paths some VM placed or running on the node needs."""
    vms: tuple[str, ...]
    fence_at: float | None
    """When the node is to be fenced (None: never, only warned)."""
    message: str


def storage_loss(
    node: NodeView,
    nodes: Mapping[str, NodeView],
    vms: Mapping[str, VmView],
    usage: Usage,
) -> StorageLoss | None:
    """The decision for `node`, or None when no started VM there needs a lost path."""
    if not node.storage_lost or not node.lease_alive:
        return None
    if node.health not in ("Online", "Unknown", "Fencing"):
        return None
    affected: dict[str, frozenset[str]] = {}
    for vm in vms.values():
        if vm.spec.run_state != "started":
            continue
        if vm.placement != node.name and vm.name not in node.domains:
            continue
        lost = vm.spec.storage_paths() & node.storage_lost.keys()
        if lost:
            affected[vm.name] = lost
    if not affected:
        return None
    paths = tuple(sorted(set().union(*affected.values())))
    names = tuple(sorted(affected))
    head = f"{node.name} lost storage path {', '.join(paths)} needed by {', '.join(names)}"
    policy = node.spec.fencing.storage_loss
    if policy.action == "warn":
        return StorageLoss(paths, names, None, f"{head}: only warned (storageLoss.action warn)")
    if not power_fenced(node.spec):
        message = f"{head}: not fenced (storage-loss fencing needs a power fence method)"
        return StorageLoss(paths, names, None, message)
    movable = [
        name
        for name in names
        if any(
            ineligibility(name, vms[name].spec, other, usage, vms) is None
            for other in nodes.values()
            if other.name != node.name
        )
    ]
    if not movable:
        message = f"{head}: not fenced: no other node can run them with a healthy path"
        return StorageLoss(paths, names, None, message)
    lost_at = min(node.storage_lost[path] for path in paths)
    fence_at = lost_at + policy.grace_seconds
    message = (
        f"{head}: fencing the node once lost for {policy.grace_seconds} s, to recover "
        f"{', '.join(movable)} where the path is healthy"
    )
    return StorageLoss(paths, names, fence_at, message)


class StorageLossWatch:
    """The engine's per-step look at storage loss, and which Warnings it already gave."""

    def __init__(self) -> None:
        self._reported: dict[str, str] = {}
        self.fence: dict[str, StorageLoss] = {}
        """The nodes to fence now, with the loss that decided it."""

    def step(self, world: World, usage: Usage) -> tuple[list[Emit], float | None]:
        """Decide for every node; the Warnings to emit and the next grace deadline."""
        self.fence = {}
        emits: list[Emit] = []
        wake: float | None = None
        for node in sorted(world.nodes.values(), key=lambda n: n.name):
            loss = storage_loss(node, world.nodes, world.vms, usage)
            if loss is None:
                if self._reported.pop(node.name, None) is not None and not node.storage_lost:
                    emits.append(
                        Emit("ClusterNode", node.name, "StorageRestored", "no path lost any more")
                    )
                continue
            if self._reported.get(node.name) != loss.message:
                self._reported[node.name] = loss.message
                emits.append(Emit("ClusterNode", node.name, "StorageLost", loss.message, "Warning"))
            if loss.fence_at is None:
                continue
            if world.now >= loss.fence_at:
                self.fence[node.name] = loss
            elif wake is None or loss.fence_at < wake:
                wake = loss.fence_at
        return emits, wake

    def why(self, node: str) -> str:
        """The NodeLost reason of a node fenced for its storage."""
        loss = self.fence[node]
        return (
            f"storage path {', '.join(loss.paths)} lost (needed by {', '.join(loss.vms)}): "
            "fencing before recovering them elsewhere"
        )


class FirstSeen:
    """When this controller first saw each node's lost paths (production's `storage_lost`):
    later than the agent's own `since`, hence a longer grace, and on the controller's clock."""

    def __init__(self) -> None:
        self._since: dict[str, dict[str, float]] = {}

    def seen(self, node: str, paths: list[str], now: float) -> dict[str, float]:
        before = self._since.get(node, {})
        current = {path: before.get(path, now) for path in paths}
        self._since[node] = current
        return current
