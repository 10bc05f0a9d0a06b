"""Which changes of its own ClusterNode wake an agent's VM reconciles and its HA report.

The VM reconciles decide on the node's health (`Agent.start_blocker`); the HA report on its
fence record and health; a spec change (generation) may matter to either. Most writes of the
object change none of that: the agent's own status report every `status_interval` (capacity,
version, libvirt URI), the controller's heartbeat bookkeeping. Waking on each of them
reconciled every VM of the host and read every domain's XML once more per write.
"""

from __future__ import annotations

from crds import AnyResource, ClusterNode


def acted_on(node: ClusterNode) -> tuple[object, ...]:
    """What of the node the agent's VM reconciles and HA report decide on."""
    meta, status = node.metadata, node.status
    return (meta.uid, meta.generation, meta.deletion_timestamp, status.health, status.fence)


class OwnNodeChanges:
    """`changed(obj)`: whether `obj` is node `node` and differs in `acted_on` from the last
    one this filter let through (the first one passes)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._last: tuple[object, ...] | None = None

    def changed(self, obj: AnyResource) -> bool:
        if obj.metadata.name != self.node or not isinstance(obj, ClusterNode):
            return False
        key = acted_on(obj)
        if key == self._last:
            return False
        self._last = key
        return True
