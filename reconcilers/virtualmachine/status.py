"""What the agent writes to a VirtualMachine's status, only while the VM is placed on its node.

Each function here is a pure mutation of a VM's status (True if it changed something); the
`StatusWriter` applies one to etcd's copy with the placement guard.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from controller.runtime import layout_keys
from controller.runtime.leader_record import CONTROLLER_ELECTION
from controller.runtime.reconcile import RetryableError
from controller.runtime.store import NotFound, Store, StoreError
from crds import VirtualMachine
from reconcilers.drivers.domain_xml import DomainSpec
from reconcilers.drivers.libvirt import DomainInfo, DomainState, LibvirtHost


def placed_on(vm: VirtualMachine, node: str) -> bool:
    placement = vm.status.placement
    return placement is not None and placement.node == node


class StatusWriter:
    """Writes VM status as node `node`'s agent."""

    def __init__(self, store: Store, node: str) -> None:
        self.store = store
        self.node = node

    async def fresh_if_placed_here(self, vm: VirtualMachine) -> VirtualMachine | None:
        """The VM as etcd has it now (a linearizable read) if it is still to run here, else None.

        The placement must carry the current term's token (the controller leader key's create
        revision, read in the same transaction): a placement of a deposed leader starts nothing
        until the new leader stamps it with its own.
        """
        name = vm.metadata.name
        leader = layout_keys.absolute(self.store.prefix, layout_keys.leader(CONTROLLER_ELECTION))
        try:
            fresh, term = await self.store.get_with_term("VirtualMachine", name, leader)
        except NotFound:
            return None
        except StoreError as error:
            raise RetryableError(f"re-reading {name} before start: {error}") from None
        if not (
            isinstance(fresh, VirtualMachine)
            and fresh.metadata.uid == vm.metadata.uid
            and fresh.metadata.deletion_timestamp is None
            and fresh.spec.run_state == "started"
            and placed_on(fresh, self.node)
        ):
            return None
        placement = fresh.status.placement
        if placement is not None and placement.token != term:
            message = (
                f"not started on {self.node}: placed under term {placement.token}, "
                f"the controller's current term is {term or 'none'}"
            )
            await self.patch(
                fresh,
                lambda vm_: vm_.status.set_condition(
                    "Ready", "False", "WaitingForTerm", message, vm.metadata.generation
                ),
            )
            return None
        return fresh

    async def patch(self, vm: VirtualMachine, mutate: Callable[[Any], bool]) -> None:
        """Write status with `mutate`, only while the VM (same uid) is still placed here.

        Nothing is read or written when `mutate` changes nothing on `vm` (the cached copy, at a
        resync): were etcd's copy different, its watch event brings the VM back here."""

        def guarded(current: Any) -> bool:
            if not isinstance(current, VirtualMachine) or not self.owns(current, vm):
                return False
            return mutate(current)

        if not guarded(vm.model_copy(deep=True)):
            return
        try:
            await self.store.patch_status("VirtualMachine", vm.metadata.name, guarded)
        except NotFound:
            return
        except StoreError as error:
            raise RetryableError(f"writing status of {vm.metadata.name}: {error}") from None

    async def started(
        self, host: LibvirtHost, vm: VirtualMachine, desired: DomainSpec, restarts: list[datetime]
    ) -> None:
        """Running, as libvirt reports the domain just started (guarded as `patch`)."""
        domain = await host.lookup(vm.metadata.name)
        await self.patch(vm, lambda vm_: set_running(vm_, self.node, domain, desired, restarts))

    def owns(self, current: Any, vm: VirtualMachine | None = None) -> bool:
        """Whether this agent may write `current`'s status (placed here; the uid of `vm`)."""
        if not isinstance(current, VirtualMachine) or not placed_on(current, self.node):
            return False
        return vm is None or current.metadata.uid == vm.metadata.uid


def set_running(
    vm: VirtualMachine,
    node: str,
    domain: DomainInfo | None,
    desired: DomainSpec,
    restarts: list[datetime],
) -> bool:
    """Running (or Paused) on `node`, with `RestartRequired` saying whether the spec changed."""
    status = vm.status
    metadata = domain.metadata if domain is not None else {}
    current = metadata.get("specHash") == desired.metadata["specHash"]
    if current:
        running_generation = vm.metadata.generation
        changed = status.set_condition(
            "RestartRequired", "False", "UpToDate", "", vm.metadata.generation
        )
    else:
        generation = metadata.get("generation", "")
        running_generation = int(generation) if generation.isdigit() else None
        changed = status.set_condition(
            "RestartRequired",
            "True",
            "SpecChanged",
            "the spec changed while the domain runs; it applies at the next start",
            vm.metadata.generation,
        )
    paused = domain is not None and domain.state is DomainState.PAUSED
    state: Literal["Paused", "Running"] = "Paused" if paused else "Running"
    changed |= status.set_condition("Ready", "True", state, f"{state.lower()} on {node}")
    changed |= status.drop_condition("RestartLimitReached")
    new = (state, node, domain.uuid if domain else None, running_generation, restarts)
    old = (
        status.state,
        status.node,
        status.domain_uuid,
        status.running_generation,
        status.restarts,
    )
    if new != old:
        (
            status.state,
            status.node,
            status.domain_uuid,
            status.running_generation,
            status.restarts,
        ) = new
        changed = True
    return changed


def set_crashed(vm: VirtualMachine, node: str, restarts: list[datetime], message: str) -> bool:
    """Crashed for good on `node`: past the restart policy, left down."""
    status = vm.status
    changed = status.set_condition(
        "RestartLimitReached", "True", "TooManyRestarts", message, vm.metadata.generation
    )
    changed |= status.set_condition("Ready", "False", "Crashed", message)
    if (status.state, status.node, status.restarts) != ("Crashed", node, restarts):
        status.state, status.node, status.restarts = "Crashed", node, restarts
        changed = True
    return changed


def set_stopped(vm: VirtualMachine, node: str, generation: int | None) -> bool:
    """Stopped (or Disabled) on `node` as its runState asks."""
    status = vm.status
    reason = "Disabled" if vm.spec.run_state == "disabled" else "Stopped"
    changed = status.set_condition(
        "Ready", "False", reason, f"runState is {reason.lower()}", observed_generation=generation
    )
    changed |= status.drop_condition("RestartLimitReached")
    changed |= status.drop_condition("RestartRequired")
    if (status.state, status.node, status.restarts) != ("Stopped", node, []):
        status.state, status.node, status.restarts = "Stopped", node, []
        changed = True
    return changed


def set_migrating(vm: VirtualMachine) -> bool:
    if vm.status.state == "Migrating":
        return False
    vm.status.state = "Migrating"
    return True
