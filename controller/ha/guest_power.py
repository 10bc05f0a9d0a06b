"""A guest-cluster VM's power as kvmctl's records tell it, and the spec edits that fence it.

Used by the leader's guest fencing (controller/ha/guest_fence.py). The records: the VM's
status (written by its host's agent), the health of the host it last ran on (`status.node`),
and that host's agent report of running domains (`{prefix}/reports/{node}`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from controller.runtime import layout_keys
from controller.runtime.store import Store, StoreError
from crds import ClusterNode, VirtualMachine

from .guest_requests import GUEST_CLUSTER_LABEL
from .requests import RequestFormatError, parse_report

log = logging.getLogger(__name__)

SAVED_TIMEOUT_ANNOTATION = "fence.kvmctl.io/shutdown-timeout-seconds"
"""The VM's own shutdownTimeoutSeconds while a fence `off` holds it at 0."""
PowerState = Literal["on", "off"]


@dataclass(frozen=True)
class Observation:
    """The stored VM and what kvmctl knows about the host it last ran on (`status.node`)."""

    vm: VirtualMachine
    host_health: str | None = None
    """That node's ClusterNode health; None if unknown."""
    report: tuple[int, frozenset[str]] | None = None
    """That node's agent report: its etcd revision and the domains with a qemu process there;
    None if there is none."""


def power_state(seen: Observation, after: int) -> PowerState | None:
    """What kvmctl's records say about the VM's domain; None when they cannot tell.

    A VM reported running is off all the same when its host was fenced while it is placed
    elsewhere, or when its host's agent wrote a report after revision `after` without it
    (the agent does not write the status of a VM that is no longer placed on its node).
    """
    vm, status = seen.vm, seen.vm.status
    placed_on = status.placement.node if status.placement is not None else None
    if status.state in ("Running", "Paused", "Migrating"):
        if seen.host_health == "Fenced" and placed_on != status.node:
            return "off"
        if seen.report is not None:
            revision, domains = seen.report
            if revision > after and vm.metadata.name not in domains:
                return "off"
        return "on"
    if status.state in ("Stopped", "Crashed"):
        return "off"
    if placed_on is None and status.node is None:
        return "off"  # never placed, never seen running
    return None


def off_confirmed(seen: Observation, request: int, generation: int) -> bool:
    """Off, by a report that comes after our stop request (revision `request`, generation
    `generation`).

    The agent's Ready condition carries no observedGeneration yet; when it does, a report
    older than the request is not taken as a confirmation.
    """
    if seen.vm.spec.run_state == "started" or power_state(seen, request) != "off":
        return False
    ready = seen.vm.status.condition("Ready")
    observed = ready.observed_generation if ready is not None else None
    return observed is None or observed >= generation


def describe(vm: VirtualMachine) -> str:
    status = vm.status
    where = f" on {status.node}" if status.node else ""
    placed = status.placement.node if status.placement is not None else "nowhere"
    ready = status.condition("Ready")
    detail = f": {ready.message}" if ready is not None and ready.message else ""
    return f"state {status.state}{where}, placed {placed}{detail}"


def revision(vm: VirtualMachine) -> int:
    return int(vm.metadata.resource_version or 0)


def stop_now(vm: VirtualMachine) -> bool:
    """runState stopped (disabled stays) and no graceful shutdown; True if anything changed."""
    spec, annotations = vm.spec, vm.metadata.annotations
    if spec.run_state == "started":
        spec.run_state = "stopped"
    elif spec.shutdown_timeout_seconds == 0:
        return False
    if spec.shutdown_timeout_seconds != 0 and SAVED_TIMEOUT_ANNOTATION not in annotations:
        annotations[SAVED_TIMEOUT_ANNOTATION] = str(spec.shutdown_timeout_seconds)
    spec.shutdown_timeout_seconds = 0
    return True


def start(vm: VirtualMachine) -> bool:
    """runState started and the saved shutdown timeout back; True if anything changed."""
    spec, annotations = vm.spec, vm.metadata.annotations
    saved = annotations.pop(SAVED_TIMEOUT_ANNOTATION, None)
    if spec.run_state == "started" and saved is None:
        return False
    spec.run_state = "started"
    if saved is not None and saved.isdigit():
        spec.shutdown_timeout_seconds = int(saved)
    return True


def guest_cluster(vm: VirtualMachine) -> str | None:
    """The guest cluster `vm` belongs to; None if none (or it is being deleted)."""
    if vm.metadata.deletion_timestamp is not None:
        return None
    return vm.metadata.labels.get(GUEST_CLUSTER_LABEL)


async def observe(store: Store, vm: VirtualMachine) -> Observation:
    """`vm` with its last host's health and report; unreadable ones count as unknown."""
    node = vm.status.node
    if node is None:
        return Observation(vm)
    health = None
    try:
        obj = await store.get("ClusterNode", node)
        health = obj.status.health if isinstance(obj, ClusterNode) else None
    except StoreError as error:
        log.debug("cannot read ClusterNode %s: %s", node, error)
    report = None
    key = layout_keys.absolute(store.prefix, layout_keys.report(node))
    try:
        kv = await store.keys.get(key)
        if kv is not None:
            report = (kv.mod_revision, parse_report(key, kv.value).domains)
    except (StoreError, RequestFormatError) as error:
        log.debug("cannot read the report of %s: %s", node, error)
    return Observation(vm, health, report)
