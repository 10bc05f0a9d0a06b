"""Running one fence method of a ClusterNode: what the leader's engine and a standby taking
over both do (every device `off`, then `status` must say off, within its timeout)."""

from __future__ import annotations

from controller.store import NotFound, Store
from crds import ClusterNode, Secret
from crds.clusternode import FenceDevice as FenceDeviceSpec
from reconcilers.drivers.fence import FenceConfigError, FenceDevice, FenceRunner


async def run_method(
    store: Store, runner: FenceRunner, node: ClusterNode, method_name: str
) -> tuple[bool, str]:
    """(True, message) once every device of the method confirmed power off, else why not.

    Raises FenceConfigError (a missing Secret), StoreError or OSError."""
    name = node.metadata.name
    method = next((m for m in node.spec.fencing.methods if m.name == method_name), None)
    if method is None:
        return False, f"no fence method {method_name!r} on {name}"
    devices = [await _device(store, name, spec) for spec in method.devices]
    for index, (spec, device) in enumerate(zip(method.devices, devices, strict=True)):
        outcome = await runner.power_off_and_confirm(device, spec.timeout_seconds)
        if not outcome.succeeded:
            return False, f"device {index} ({device.agent}): {outcome.message}"
    return True, "every device confirmed power off"


async def _device(store: Store, node: str, spec: FenceDeviceSpec) -> FenceDevice:
    """The runner's device, with secret parameters read from their Secrets (never logged)."""
    secret_values: dict[str, str] = {}
    for parameter, ref in spec.secret_parameters.items():
        where = f"ClusterNode {node} fence device {spec.agent} parameter {parameter!r}"
        try:
            secret = await store.get("Secret", ref.name)
        except NotFound:
            raise FenceConfigError(f"{where}: Secret {ref.name!r} not found") from None
        if not isinstance(secret, Secret) or ref.key not in secret.spec.data:
            raise FenceConfigError(f"{where}: Secret {ref.name!r} has no key {ref.key!r}")
        secret_values[parameter] = secret.spec.data[ref.key]
    return FenceDevice(spec.agent, dict(spec.parameters), secret_values)
