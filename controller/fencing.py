"""The controller's side of fence devices: Secrets scoped to nodes, running a method, warnings.

A device's `secretParameters` name Secrets; the controller reads them (an agent cannot) and hands
the values to the agent on stdin. A ClusterNode may use only a Secret meant for it: labelled
`kvmctl.io/node: <that node>`, or `kvmctl.io/usage: fencing` (shared by every node's devices,
like one BMC password). Anything else (a CHAP secret, another node's password) is refused at
fence time with a message saying which label is missing.

`run_method` runs one fence method of a node: what the leader's engine and a standby taking over
both do (every device `off`, then `status` must say off, within its timeout).

`FenceChecker` is a leader-only reconciler of ClusterNodes: at the start of each term and
whenever a ClusterNode's spec changes it checks every device the way the fence runner will
(allow-list, the agent's metadata, secrets) and records an `InvalidFenceDevice` Warning per
problem, so the admin learns of a device that cannot work before a node has to be fenced with
it. (Status updates do not trigger a check; a Secret relabelled later is seen at the next spec
change, term, or fence.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controller.runtime.controller import Controller
from controller.runtime.events import EventRecorder
from controller.runtime.informer import SharedInformers
from controller.runtime.manager import Term
from controller.runtime.reconcile import Result
from controller.runtime.store import NotFound, Store, StoreError
from crds import ClusterNode, Secret
from crds.clusternode import ClusterNodeSpec
from crds.clusternode import FenceDevice as FenceDeviceSpec
from reconcilers.drivers.fence import FenceRunner
from reconcilers.drivers.fence_policy import MANUAL_AGENTS, FenceConfigError, FenceDevice

log = logging.getLogger(__name__)

NODE_LABEL = "kvmctl.io/node"
USAGE_LABEL = "kvmctl.io/usage"
FENCING_USAGE = "fencing"
INVALID_DEVICE = "InvalidFenceDevice"


def secret_serves(secret: Secret, node: str) -> bool:
    """Whether `node`'s fence devices may use `secret`."""
    labels = secret.metadata.labels
    return labels.get(NODE_LABEL) == node or labels.get(USAGE_LABEL) == FENCING_USAGE


async def runner_device(store: Store, node: str, spec: FenceDeviceSpec) -> FenceDevice:
    """The runner's device, with secret parameters read from the Secrets meant for `node`."""
    secret_values: dict[str, str] = {}
    for parameter, ref in spec.secret_parameters.items():
        where = f"ClusterNode {node} fence device {spec.agent} parameter {parameter!r}"
        try:
            secret = await store.get("Secret", ref.name)
        except NotFound:
            raise FenceConfigError(f"{where}: Secret {ref.name!r} not found") from None
        if not isinstance(secret, Secret) or not secret_serves(secret, node):
            raise FenceConfigError(
                f"{where}: Secret {ref.name!r} is not for fencing {node}: an admin labels it "
                f"{NODE_LABEL}={node} or {USAGE_LABEL}={FENCING_USAGE}"
            )
        if ref.key not in secret.spec.data:
            raise FenceConfigError(f"{where}: Secret {ref.name!r} has no key {ref.key!r}")
        secret_values[parameter] = secret.spec.data[ref.key]
    return FenceDevice(spec.agent, dict(spec.parameters), secret_values)


async def run_method(
    store: Store, runner: FenceRunner, node: ClusterNode, method_name: str
) -> tuple[bool, str]:
    """(True, message) once every device of the method confirmed power off, else why not.

    Raises FenceConfigError (a Secret missing or not meant for the node), StoreError or OSError.
    """
    name = node.metadata.name
    method = next((m for m in node.spec.fencing.methods if m.name == method_name), None)
    if method is None:
        return False, f"no fence method {method_name!r} on {name}"
    devices = [await runner_device(store, name, spec) for spec in method.devices]
    for index, (spec, device) in enumerate(zip(method.devices, devices, strict=True)):
        outcome = await runner.power_off_and_confirm(device, spec.timeout_seconds)
        if not outcome.succeeded:
            return False, f"device {index} ({device.agent}): {outcome.message}"
    return True, "every device confirmed power off"


async def fencing_problems(store: Store, runner: FenceRunner, node: ClusterNode) -> list[str]:
    """What would make a fence device of `node` fail before its agent runs, one line each."""
    problems: list[str] = []
    for method in node.spec.fencing.methods:
        for index, spec in enumerate(method.devices):
            if spec.agent in MANUAL_AGENTS:
                continue
            try:
                await runner.validate(await runner_device(store, node.metadata.name, spec))
            except (FenceConfigError, OSError) as error:
                problems.append(f"method {method.name} device {index}: {error}")
    return problems


class FenceChecker:
    """Leader-only: warn about ClusterNodes whose fence devices cannot work (module docstring)."""

    def __init__(
        self,
        store: Store,
        informers: SharedInformers,
        runner: FenceRunner,
        recorder: EventRecorder,
        term: Callable[[], Term],
    ) -> None:
        """`term()` is the term leading now: each term checks every node once more."""
        self.store = store
        self.nodes = informers.informer("ClusterNode")
        self.runner = runner
        self.recorder = recorder
        self.term = term
        self._checked: dict[str, tuple[int, ClusterNodeSpec]] = {}
        """Per node, the term and the spec last checked."""

    def controller(self) -> Controller:
        return Controller("fence-check", "ClusterNode", self, leader_only=True)

    async def reconcile(self, key: str) -> Result:
        node = self.nodes.get(key)
        if not isinstance(node, ClusterNode):
            self._checked.pop(key, None)
            return Result()
        token = self.term().token
        if self._checked.get(key) != (token, node.spec):
            await self._check(node, token)
        return Result()

    async def _check(self, node: ClusterNode, token: int) -> None:
        name = node.metadata.name
        try:
            problems = await fencing_problems(self.store, self.runner, node)
        except StoreError as error:
            log.warning("fence devices of %s not checked: %s", name, error)
            return
        self._checked[name] = (token, node.spec)
        for problem in problems:
            log.warning("ClusterNode %s: fence %s", name, problem)
            # The whole text as the template: each distinct problem is its own Event.
            await self.recorder.record(node, "Warning", INVALID_DEVICE, f"fence {problem}")
