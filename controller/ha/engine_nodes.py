"""Node health: losing a node, fencing it (methods, retries, self-fence, acks), Online again."""

from __future__ import annotations

from crds.clusternode import NodeHealth

from .engine_core import EngineCore, _Fencing
from .environment import (
    ClearFenceAck,
    FenceConfirmation,
    FenceHow,
    NodeView,
    SetNodeHealth,
    StartFence,
    power_fenced,
)


class NodeDecisions(EngineCore):
    """The node half of a step: each node's health and its fencing."""

    def _set_health(
        self, node: NodeView, health: NodeHealth, fence: FenceConfirmation | None
    ) -> None:
        self._health[node.name] = health
        self._actions.append(SetNodeHealth(node.name, health, fence))

    def _suspected(self, node: NodeView) -> bool:
        """Power-fenced and silent on the cluster network: fenced without waiting for the lease.

        Self-fencing nodes are never suspected on silence: their recovery needs the lease's
        server-side expiry (docs/ha.md)."""
        if not power_fenced(node.spec):
            return False
        return node.name in self._silent

    def _lost(self, node: NodeView) -> bool:
        """Lease gone, silent, or to be fenced for its lost storage (`storage_loss.py`)."""
        return not node.lease_alive or self._suspected(node) or node.name in self._storage.fence

    def _node_step(self, node: NodeView) -> None:
        health = self._health[node.name]
        if health in ("Online", "Offline", "Fenced") and node.fence_ack_at is not None:
            self._actions.append(ClearFenceAck(node.name))
            if health == "Online":
                self._emit(
                    node,
                    "FenceAckIgnored",
                    "the node is Online: an acknowledgement only counts while it is lost",
                    "Warning",
                )
        if health == "Online":
            if not self._lost(node):
                return
            self._set_health(node, "Unknown", None)
            if node.name in self._storage.fence:
                why = self._storage.why(node.name)
            elif node.lease_alive and node.heard is not None:
                silent = self._now - node.heard.last
                why = f"no direct heartbeat for {silent:.1f}s (its lease is still held)"
            else:
                why = "heartbeat lease expired"
            self._emit(node, "NodeLost", why, "Warning")
            health = "Unknown"
        if health in ("Unknown", "Offline"):
            if not self._lost(node):
                self._set_health(node, "Online", None)
                self._emit(node, "NodeOnline", "agent holds its heartbeat lease")
                return
            if not self._may_run_anything(node):
                if health != "Offline":
                    self._set_health(node, "Offline", None)
                    self._emit(node, "NodeOffline", "no lease, and nothing placed or running there")
                return
            self._set_health(node, "Fencing", None)
            self._fencing[node.name] = _Fencing(backoff=self.timings.fence_retry_initial)
            health = "Fencing"
        if health == "Fencing":
            self._fence_step(node)
        elif health == "Fenced":
            fence = node.fence
            clean = node.clean_since is not None and (fence is None or node.clean_since >= fence.at)
            if node.lease_alive and clean:
                self._set_health(node, "Online", None)
                self._emit(node, "NodeOnline", "agent is back and destroyed every stale domain")

    def _may_run_anything(self, node: NodeView) -> bool:
        if node.domains:
            return True
        for vm in self._world.vms.values():
            if vm.placement == node.name:
                return True
            migration = vm.migration
            if (
                migration is not None
                and migration.phase in ("Running", "Succeeded")
                and node.name in (migration.source, migration.target)
            ):
                return True
        return False

    def _fenced(self, node: NodeView, how: FenceHow, method: str | None, message: str) -> None:
        self._fencing.pop(node.name, None)
        self._set_health(node, "Fenced", FenceConfirmation(how, self._now, method))
        self._emit(node, "NodeFenced", message)

    def _fence_step(self, node: NodeView) -> None:
        progress = self._fencing.setdefault(
            node.name, _Fencing(backoff=self.timings.fence_retry_initial)
        )
        methods = node.spec.fencing.methods
        for result in self._world.fence_results:
            if result.node != node.name or result.attempt != progress.attempt:
                continue
            progress.attempt = None
            if result.ok:
                self._fenced(
                    node, "PowerOff", result.method, f"method {result.method} confirmed power off"
                )
                return
            self._emit(
                node, "FencingFailed", f"method {result.method}: {result.message}", "Warning"
            )
            progress.method_index += 1
        if node.fence_ack_at is not None:
            self._actions.append(ClearFenceAck(node.name))
            self._fenced(node, "ManualAck", None, "an operator acknowledged the node is off")
            return
        if not self._lost(node) and progress.attempt is None:
            self._fencing.pop(node.name)
            self._set_health(node, "Online", None)
            self._emit(node, "NodeOnline", "lease renewed before fencing completed")
            return
        if node.spec.fencing.self_fence:
            lost_at = node.lease_lost_at if node.lease_lost_at is not None else self._now
            safe_at = lost_at + self.timings.recovery_grace
            if not progress.announced:
                progress.announced = True
                self._emit(
                    node,
                    "FencingStarted",
                    "relying on self-fencing: the agent destroyed its VMs before its lease "
                    f"expired; safe at {safe_at:.1f}",
                )
            if self._now >= safe_at:
                self._fenced(
                    node, "SelfFence", None, "lease expired and the self-fence grace passed"
                )
            else:
                self._wake_at(safe_at)
            return
        if progress.attempt is not None:
            return
        if self._now < progress.retry_at:
            self._wake_at(progress.retry_at)
            return
        if progress.method_index >= len(methods):
            if methods:
                message = f"all {len(methods)} fence methods failed; nothing is recovered"
            else:
                message = (
                    "no fence method and self-fencing not allowed: make sure the node is off, "
                    f"then run `kvmctl fence ack {node.name}`"
                )
            self._emit(
                node, "FencingFailed", f"{message}; retrying in {progress.backoff:.0f}s", "Warning"
            )
            progress.retry_at = self._now + progress.backoff
            progress.backoff = min(progress.backoff * 2, self.timings.fence_retry_max)
            progress.method_index = 0
            self._wake_at(progress.retry_at)
            return
        method = methods[progress.method_index]
        progress.attempt = self._next_attempt
        self._next_attempt += 1
        agents = ", ".join(device.agent for device in method.devices)
        self._emit(node, "FencingStarted", f"method {method.name} ({agents})")
        self._actions.append(StartFence(node.name, method.name, progress.attempt))
