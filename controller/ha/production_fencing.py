"""Fence attempts of the HA engine, run in tasks; their results feed the next `World`."""

from __future__ import annotations

import logging

from controller.fencing import run_method
from controller.runtime import telemetry
from controller.runtime.store import StoreError
from crds import ClusterNode
from reconcilers.drivers.fence_policy import FenceConfigError

from .environment import FenceResult, StartFence
from .production_core import EnvironmentCore

log = logging.getLogger(__name__)


class FenceRuns(EnvironmentCore):
    """Running `StartFence`: the method's devices, powered off and confirmed."""

    async def _fence(self, action: StartFence) -> None:
        ok, message = False, ""
        try:
            ok, message = await self._run_method(action.node, action.method)
        except (FenceConfigError, StoreError, OSError) as error:
            message = str(error)
        log.info(
            "fence attempt %d of %s, method %s: %s (%s)",
            action.attempt,
            action.node,
            action.method,
            "confirmed off" if ok else "failed",
            message,
        )
        telemetry.count_fence(action.node, action.method, ok)
        self._fence_results.append(
            FenceResult(action.attempt, action.node, action.method, ok, message)
        )
        self._changed.set()

    async def _run_method(self, node_name: str, method_name: str) -> tuple[bool, str]:
        node = self._informers["ClusterNode"].get(node_name)
        if not isinstance(node, ClusterNode):
            return False, f"ClusterNode {node_name} not found"
        return await run_method(self.store, self.fence_runner, node, method_name)
