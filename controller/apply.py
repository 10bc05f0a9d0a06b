"""Declarative apply: make stored objects match manifests, as `kubectl apply` does.

The manifest owns spec, labels and annotations: fields removed from the file are removed from
the object. Everything else (status, finalizers, uid, generation) belongs to the store and the
controllers and survives. Kinds are written in dependency order.

Before anything is written, a batch in which two VMs would share a disk or a MAC address (with
each other or with a stored VM) is refused whole (`controller/exclusive.py` states the rule).
Two applies racing each other can still both pass: the HA controller checks disks again before
it places a VM.

A batch that starts a VM, grows one or changes where it may run, cordons a node or shrinks its
capacity is also checked against the ClusterPolicy's admission control
(`controller/ha/admission.py`): in mode enforce it is refused whole when the cluster after it
would not meet the policy; in mode warn it is applied with a warning. The HA controller checks
again when it starts a VM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from controller.exclusive import Claims
from controller.ha import admission
from controller.runtime.store import Conflict, Store, StoreError
from crds import APPLY_ORDER, AnyResource, ClusterNode, ClusterPolicy, VirtualMachine
from crds.clusterpolicy import POLICY_NAME

Outcome = Literal["created", "configured", "unchanged"]
CONCURRENCY = 32
PREFETCH_THRESHOLD = 20


@dataclass(frozen=True)
class Applied:
    object: AnyResource
    outcome: Outcome


SERVER_OWNED_ANNOTATION_PREFIX = "fence.kvmctl.io/"
"""Annotations that fence_kvmctl sets while a VM is fenced off; apply keeps them."""


def merged(existing: AnyResource, manifest: AnyResource) -> AnyResource:
    """The object `existing` becomes when `manifest` is applied to it.

    While a guest cluster holds a VM fenced off (a `fence.kvmctl.io/` annotation), apply and
    sync keep its run state and shutdown timeout: re-applying a manifest must not power on a VM
    that a fence agent powered off.
    """
    result = existing.model_copy(deep=True)
    result.spec = manifest.spec.model_copy(deep=True)
    result.metadata.labels = dict(manifest.metadata.labels)
    fence_owned = {
        key: value
        for key, value in existing.metadata.annotations.items()
        if key.startswith(SERVER_OWNED_ANNOTATION_PREFIX)
    }
    result.metadata.annotations = {**manifest.metadata.annotations, **fence_owned}
    if fence_owned and isinstance(result, VirtualMachine) and isinstance(existing, VirtualMachine):
        result.spec.run_state = existing.spec.run_state
        result.spec.shutdown_timeout_seconds = existing.spec.shutdown_timeout_seconds
    return result


class ExclusiveResourceError(ValueError):
    """Two VMs would use one disk or one MAC address; nothing of the batch was written."""


async def find_clash(
    store: Store, objects: Sequence[AnyResource], leaving: Collection[str] = ()
) -> str | None:
    """One line naming two VMs of the batch, or of the batch and the store, that would share a
    disk or a MAC address; None when there are none.

    Stored VMs replaced by the batch count as the batch's version; `leaving` names stored VMs
    the caller deletes right after applying (a GitOps prune), which do not count.
    """
    batch = [obj for obj in objects if isinstance(obj, VirtualMachine)]
    if not batch:
        return None
    listed, _ = await store.list_objects("VirtualMachine")
    skipped = {vm.metadata.name for vm in batch} | set(leaving)
    claims = Claims()
    where: dict[str, str] = {}
    for stored in listed:
        name = stored.metadata.name
        if isinstance(stored, VirtualMachine) and name not in skipped:
            claims.add(name, stored.spec)
            deleting = stored.metadata.deletion_timestamp is not None
            where[name] = "in the store, being deleted" if deleting else "in the store"
    for vm in batch:
        name = vm.metadata.name
        clash = claims.clash(name, vm.spec)
        if clash is not None:
            return (
                f"VirtualMachine {name!r} and VirtualMachine {clash.other!r} "
                f"({where.get(clash.other, 'in this apply')}) both use {clash.resource}: "
                f"{clash.rule}"
            )
        claims.add(name, vm.spec)
    return None


class AdmissionRefused(ValueError):
    """The batch would break the cluster's admission policy (mode enforce); nothing was written."""


def _admission_change(old: AnyResource | None, new: AnyResource) -> str | None:
    """What `new` does that can cost failover capacity (None: nothing)."""
    if isinstance(new, VirtualMachine) and new.spec.run_state == "started":
        if not isinstance(old, VirtualMachine) or old.spec.run_state != "started":
            return f"starting {label(new)}"
        spec, before = new.spec, old.spec
        if spec.vcpus > before.vcpus or spec.memory_mib > before.memory_mib:
            return f"growing {label(new)}"
        if (spec.failover_domain, spec.anti_affinity) != (
            before.failover_domain,
            before.anti_affinity,
        ):
            return f"changing where {label(new)} may run"
    if isinstance(new, ClusterNode) and isinstance(old, ClusterNode):
        if new.spec.cordoned and not old.spec.cordoned:
            return f"cordoning {label(new)}"
        capacity, before_capacity = new.spec.capacity, old.spec.capacity
        if capacity is not None and (
            before_capacity is None
            or capacity.cpus < before_capacity.cpus
            or capacity.memory_mib < before_capacity.memory_mib
        ):
            return f"setting a smaller capacity on {label(new)}"
    return None


async def check_admission(
    store: Store, objects: Sequence[AnyResource], warn: Callable[[str], None]
) -> None:
    """Refuse (AdmissionRefused) or `warn` about a batch that breaks the admission policy.

    The policy is the batch's ClusterPolicy if it has one, else the stored one. Applying a
    policy the cluster does not meet is allowed, with a warning.
    """
    if not any(isinstance(o, VirtualMachine | ClusterNode | ClusterPolicy) for o in objects):
        return
    in_batch = next((o for o in objects if isinstance(o, ClusterPolicy)), None)
    policy_object = in_batch or await store.try_get("ClusterPolicy", POLICY_NAME)
    policy = policy_object.spec.admission if isinstance(policy_object, ClusterPolicy) else None
    if policy is None:
        return
    after: dict[tuple[str, str], AnyResource] = {}
    for kind in ("ClusterNode", "VirtualMachine"):
        listed, _ = await store.list_objects(kind)
        after.update(((kind, obj.metadata.name), obj) for obj in listed)
    changes: list[str] = []
    for obj in objects:
        key = (obj.kind, obj.metadata.name)
        old = after.get(key)
        new = fresh(obj) if old is None else merged(old, obj)
        change = _admission_change(old, new)
        if change is not None:
            changes.append(change)
        if isinstance(new, ClusterNode | VirtualMachine):
            after[key] = new
    nodes = [o for o in after.values() if isinstance(o, ClusterNode)]
    vms = [o for o in after.values() if isinstance(o, VirtualMachine)]
    verdict = admission.check(policy, *admission.views(nodes, vms))
    if verdict.ok:
        return
    rule = f"admission control ({policy.describe()})"
    if not changes:
        if in_batch is not None:
            warn(f"{rule} is not met by the cluster now: {verdict.reason}")
        return
    what = ", ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")
    if policy.mode == "enforce":
        raise AdmissionRefused(f"{what} would break {rule}: {verdict.reason}; nothing was applied")
    warn(f"{what} breaks {rule}: {verdict.reason}")


def _same(a: AnyResource, b: AnyResource) -> bool:
    return (a.spec, a.metadata.labels, a.metadata.annotations) == (
        b.spec,
        b.metadata.labels,
        b.metadata.annotations,
    )


def fresh(manifest: AnyResource) -> AnyResource:
    """A manifest stripped of what only the store sets, ready to be created."""
    obj = manifest.model_copy(deep=True)
    obj.status = type(obj.status)()
    meta = obj.metadata
    meta.uid = meta.resource_version = meta.creation_timestamp = meta.deletion_timestamp = None
    meta.generation = None
    meta.finalizers = []
    return obj


async def apply_one(
    store: Store,
    manifest: AnyResource,
    dry_run: bool = False,
    known: AnyResource | Literal["unknown"] | None = "unknown",
) -> Applied:
    """Create or update one object; retries when a controller writes in between.

    `known` is the stored object if the caller already read it (None: it does not exist).
    """
    for _ in range(20):
        if known == "unknown":
            existing = await store.try_get(manifest.kind, manifest.metadata.name)
        else:
            existing, known = known, "unknown"
        if existing is None:
            if dry_run:
                return Applied(fresh(manifest), "created")
            try:
                return Applied(await store.create(fresh(manifest)), "created")
            except Conflict:
                continue
        desired = merged(existing, manifest)
        if _same(existing, desired):
            return Applied(existing, "unchanged")
        if dry_run:
            return Applied(desired, "configured")
        try:
            return Applied(await store.update(desired), "configured")
        except Conflict:
            continue
    raise Conflict(f"{manifest.kind} {manifest.metadata.name!r} kept changing during apply")


def in_apply_order(objects: Sequence[AnyResource]) -> list[list[AnyResource]]:
    """Objects grouped by kind, in the order kinds are written."""
    rank = {kind: index for index, kind in enumerate(APPLY_ORDER)}
    groups: dict[str, list[AnyResource]] = {}
    for obj in objects:
        groups.setdefault(obj.kind, []).append(obj)
    return [groups[kind] for kind in sorted(groups, key=lambda k: rank.get(k, len(rank)))]


class PartialApply(StoreError):
    """Apply stopped at a store failure: what it applied before, and what it did not."""

    def __init__(
        self, applied: list[Applied], not_applied: list[AnyResource], error: StoreError
    ) -> None:
        """`not_applied[0]` is the object whose write failed with `error`."""
        total = len(applied) + len(not_applied)
        super().__init__(
            f"applied {len(applied)} of {total} objects, then {label(not_applied[0])} failed: "
            f"{error}; applied: {_sample([a.object for a in applied])}; "
            f"not applied: {_sample(not_applied)}"
        )
        self.applied = applied
        self.not_applied = not_applied


def label(obj: AnyResource) -> str:
    return f"{obj.kind.lower()}/{obj.metadata.name}"


def _sample(objects: Sequence[AnyResource], shown: int = 3) -> str:
    """The first few labels of `objects` and how many more; readable for thousands."""
    if not objects:
        return "none"
    names = ", ".join(label(obj) for obj in objects[:shown])
    rest = len(objects) - shown
    return f"{names} and {rest} more" if rest > 0 else names


async def apply_all(
    store: Store,
    objects: Sequence[AnyResource],
    dry_run: bool = False,
    warn: Callable[[str], None] = lambda _line: None,
) -> list[Applied]:
    """Apply every object, kind by kind; objects of one kind are written concurrently.

    For many objects of a kind, one list replaces a read per object. Raises
    ExclusiveResourceError, before writing anything, when two VMs would share a disk or MAC,
    and AdmissionRefused when the batch breaks an enforced admission policy (`warn` gets the
    line when the policy only warns).
    On a store failure no further object is started, the writes in flight finish, and
    `PartialApply` says which objects were applied and which were not (the failed one first).
    """
    clash = await find_clash(store, objects)
    if clash is not None:
        raise ExclusiveResourceError(f"{clash}; nothing was applied")
    await check_admission(store, objects, warn)
    limit = asyncio.Semaphore(CONCURRENCY)
    failures: list[tuple[AnyResource, StoreError]] = []

    async def bounded(
        obj: AnyResource, known: AnyResource | Literal["unknown"] | None
    ) -> Applied | None:
        async with limit:
            if failures:
                return None
            try:
                return await apply_one(store, obj, dry_run, known)
            except StoreError as error:
                failures.append((obj, error))
                return None

    results: list[Applied] = []
    not_applied: list[AnyResource] = []
    for group in in_apply_order(objects):
        if failures:
            not_applied.extend(group)
            continue
        stored: dict[str, AnyResource | Literal["unknown"] | None] = {}
        if len(group) > PREFETCH_THRESHOLD:
            try:
                listed, _ = await store.list_objects(group[0].kind)
            except StoreError as error:
                failures.append((group[0], error))
                not_applied.extend(group)
                continue
            by_name = {obj.metadata.name: obj for obj in listed}
            stored = {obj.metadata.name: by_name.get(obj.metadata.name) for obj in group}
        outcomes = await asyncio.gather(
            *(bounded(obj, stored.get(obj.metadata.name, "unknown")) for obj in group)
        )
        for obj, outcome in zip(group, outcomes, strict=True):
            if outcome is None:
                not_applied.append(obj)
            else:
                results.append(outcome)
    if failures:
        failed, cause = failures[0]
        not_applied.sort(key=lambda obj: obj is not failed)  # stable: the failed one first
        raise PartialApply(results, not_applied, cause)
    return results
