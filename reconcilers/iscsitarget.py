"""IscsiTarget reconciler: one tgtd target per object, on the node named in its spec.

Each pass checks everything first (IQN not taken by another target, every backing store allowed
by this node's ClusterNode `spec.storage` and present, the CHAP secret readable) and changes
nothing when a check fails: the object gets `Ready=False` with the reason (`IqnConflict`,
`BackingStoreNotAllowed`, `BackingStoreMissing`, `SecretMissing`) and a Warning event.

A backing store is allowed when, symlinks resolved, it is one of `storage.allowedDevices` or a
file under one of `storage.exportRoots`: an IscsiTarget cannot export /etc/shadow.

The target id is allocated once and kept in `status.tid`, written *before* the target is created:
a target in tgtd with this object's IQN but another tid is therefore never ours (`IqnConflict`),
even after a crash between the two steps. LUNs, ACL entries and CHAP bindings are changed one by
one, so initiators using other LUNs keep their sessions. Deletion (a finalizer) refuses while
initiators are connected unless the object is annotated `kvmctl.io/force-delete: "true"`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable

from controller.runtime.events import EventRecorder
from controller.runtime.layout import NODE_FINALIZERS
from controller.runtime.reconcile import Result, RetryableError, set_ready
from controller.runtime.store import Store
from crds import ClusterNode, IscsiTarget, Secret
from crds.clusternode import StorageExports, exportable_root
from crds.iscsitarget import IscsiTargetSpec, LunStatus
from crds.meta import ConditionStatus
from reconcilers.drivers.tgt import Target, TgtAdm, TgtError, TgtUnavailable

log = logging.getLogger(__name__)

FINALIZER = NODE_FINALIZERS["IscsiTarget"]
FORCE_DELETE = "kvmctl.io/force-delete"
DEFAULT_RESYNC = 30.0
"""Seconds between passes (sessions come and go without any event kvmctl could watch)."""
DELETE_RETRY = 5.0


class TargetProblem(Exception):
    """The target cannot converge now; nothing was changed. `reason` is CamelCase."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def acl_entries(spec: IscsiTargetSpec) -> list[str]:
    """tgtd's ACL entries for a spec: `ALL`, or initiator addresses and names."""
    if spec.acl.allow_all:
        return ["ALL"]
    return [str(a) for a in spec.acl.initiator_addresses] + list(spec.acl.initiator_names)


def backing_store_allowed(path: str, exports: StorageExports) -> bool:
    """Whether `path`, symlinks resolved, is an allowed device or lies under an export root."""
    real = os.path.realpath(path)
    if real in {os.path.realpath(device) for device in exports.allowed_devices}:
        return True
    for root in exports.export_roots:
        resolved = os.path.realpath(root)  # a root may be a symlink: to /etc it allows nothing
        if (
            exportable_root(resolved)
            and real != resolved
            and os.path.commonpath([real, resolved]) == resolved
        ):
            return True
    return False


def backing_store_size(path: str) -> int:
    """Bytes in a file or block device."""
    with open(path, "rb") as device:
        return device.seek(0, os.SEEK_END)


def _fingerprint(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


class IscsiTargetReconciler:
    """Reconciles the IscsiTargets whose `spec.node` is `node` through `adm`'s tgtd."""

    def __init__(
        self,
        store: Store,
        node: str,
        recorder: EventRecorder,
        adm: TgtAdm,
        resync: float = DEFAULT_RESYNC,
    ) -> None:
        self.store = store
        self.node = node
        self.recorder = recorder
        self.adm = adm
        self.resync = resync
        self._tgtd_lock = asyncio.Lock()
        """Serializes tid allocation and target changes between this node's objects."""
        self._passwords: dict[str, str] = {}
        """CHAP account -> fingerprint of the password this process gave tgtd (tgtd never shows
        passwords: an account first seen by this process is set again once)."""

    async def reconcile(self, key: str) -> Result:
        target = await self.store.try_get("IscsiTarget", key)
        if not isinstance(target, IscsiTarget) or target.spec.node != self.node:
            return Result()
        try:
            async with self._tgtd_lock:
                if target.metadata.deletion_timestamp is not None:
                    return await self._delete(target)
                if FINALIZER not in target.metadata.finalizers:
                    added = await self.store.add_finalizer("IscsiTarget", key, FINALIZER)
                    assert isinstance(added, IscsiTarget)
                    target = added
                return await self._converge(target)
        except TargetProblem as problem:
            await self._set_ready(target, "False", problem.reason, problem.message)
            return Result(requeue_after=self.resync)
        except TgtUnavailable as error:
            await self._set_ready(target, "False", "TgtdUnavailable", str(error))
            raise RetryableError(str(error)) from None
        except TgtError as error:
            await self._set_ready(target, "False", "TgtadmFailed", str(error))
            raise RetryableError(str(error)) from None

    # -- converging ---------------------------------------------------------------------------

    async def _converge(self, obj: IscsiTarget) -> Result:
        spec = obj.spec
        targets = await self.adm.show()
        await self._check_iqn(obj, targets)
        await self._check_backing_stores(spec)
        password = await self._chap_password(spec)
        tid = await self._claim_tid(obj, targets)
        current = next((t for t in targets if t.tid == tid), None)
        actions: list[str] = []
        if current is None:
            await self.adm.new_target(tid, spec.iqn)
            actions.append(f"created target {tid} ({spec.iqn})")
        await self._converge_luns(obj, tid, current, actions)
        await self._converge_acl(spec, tid, current, actions)
        await self._converge_chap(spec, tid, current, password, actions)
        if actions:
            await self.recorder.record(obj, "Normal", "Configured", "; ".join(actions))
        [shown] = [t for t in await self.adm.show() if t.tid == tid]
        await self._write_status(obj, shown)
        return Result(requeue_after=self.resync)

    async def _check_iqn(self, obj: IscsiTarget, targets: list[Target]) -> None:
        spec = obj.spec
        objects, _ = await self.store.list_objects("IscsiTarget")
        earlier = [
            other.metadata.name
            for other in objects
            if isinstance(other, IscsiTarget)
            and other.metadata.name != obj.metadata.name
            and other.spec.node == self.node
            and other.spec.iqn == spec.iqn
            and _age_order(other) < _age_order(obj)
        ]
        if earlier:
            raise TargetProblem(
                "IqnConflict",
                f"IQN {spec.iqn} is already served on {self.node} by IscsiTarget {earlier[0]}",
            )
        for target in targets:
            if target.iqn == spec.iqn and target.tid != obj.status.tid:
                raise TargetProblem(
                    "IqnConflict",
                    f"tgtd on {self.node} already has a target {target.tid} named {spec.iqn} "
                    "that this object does not own; remove it or choose another IQN",
                )

    async def _check_backing_stores(self, spec: IscsiTargetSpec) -> None:
        node = await self.store.try_get("ClusterNode", self.node)
        exports = node.spec.storage if isinstance(node, ClusterNode) else StorageExports()
        refused = [
            lun.backing_store
            for lun in spec.luns
            if not await asyncio.to_thread(backing_store_allowed, lun.backing_store, exports)
        ]
        if refused:
            raise TargetProblem(
                "BackingStoreNotAllowed",
                f"backing store {', '.join(refused)} is not under an exportRoot nor one of the "
                f"allowedDevices of ClusterNode {self.node} (spec.storage); nothing was exported",
            )
        missing = [
            lun.backing_store
            for lun in spec.luns
            if not await asyncio.to_thread(os.path.exists, lun.backing_store)
        ]
        if missing:
            raise TargetProblem(
                "BackingStoreMissing",
                f"backing store {', '.join(missing)} does not exist on {self.node}; "
                "nothing was changed",
            )

    async def _chap_password(self, spec: IscsiTargetSpec) -> str | None:
        if spec.chap is None:
            return None
        ref = spec.chap.secret_ref
        secret = await self.store.try_get("Secret", ref.name)
        if not isinstance(secret, Secret) or ref.key not in secret.spec.data:
            raise TargetProblem("SecretMissing", f"CHAP secret {ref.name!r} has no key {ref.key!r}")
        return secret.spec.data[ref.key]

    async def _claim_tid(self, obj: IscsiTarget, targets: list[Target]) -> int:
        """This object's tid: kept from status when still free or ours, else the lowest id that
        neither tgtd nor another object of this node uses, written to status first."""
        by_tid = {t.tid: t for t in targets}
        tid = obj.status.tid
        if tid is not None and (tid not in by_tid or by_tid[tid].iqn == obj.spec.iqn):
            return tid
        objects, _ = await self.store.list_objects("IscsiTarget")
        claimed = {
            other.status.tid
            for other in objects
            if isinstance(other, IscsiTarget)
            and other.spec.node == self.node
            and other.metadata.name != obj.metadata.name
        }
        tid = next(
            n for n in range(1, len(by_tid) + len(claimed) + 2) if n not in {*by_tid, *claimed}
        )

        def record_tid(current: IscsiTarget) -> None:
            current.status.tid = tid

        await self.store.patch_status("IscsiTarget", obj.metadata.name, record_tid)
        obj.status.tid = tid
        return tid

    async def _converge_luns(
        self, obj: IscsiTarget, tid: int, current: Target | None, actions: list[str]
    ) -> None:
        present = {lun.number: lun for lun in current.luns if lun.number != 0} if current else {}
        wanted = {lun.lun: lun.backing_store for lun in obj.spec.luns}
        for number, lun in present.items():
            if wanted.get(number) != lun.backing_store_path:
                await self.adm.delete_lun(tid, number)
                actions.append(f"removed LUN {number} ({lun.backing_store_path})")
        for number, path in wanted.items():
            if number not in present or present[number].backing_store_path != path:
                await self.adm.add_lun(tid, number, path)
                actions.append(f"added LUN {number} ({path})")

    async def _converge_acl(
        self, spec: IscsiTargetSpec, tid: int, current: Target | None, actions: list[str]
    ) -> None:
        present = (
            [*current.acl_addresses, *current.acl_initiator_names] if current is not None else []
        )
        wanted = acl_entries(spec)
        for entry in wanted:
            if entry not in present:
                if entry.startswith(("iqn.", "eui.")):
                    await self.adm.bind_initiator_name(tid, entry)
                else:
                    await self.adm.bind_address(tid, entry)
                actions.append(f"allowed {entry}")
        for entry in present:
            if entry not in wanted:
                if current is not None and entry in current.acl_initiator_names:
                    await self.adm.unbind_initiator_name(tid, entry)
                else:
                    await self.adm.unbind_address(tid, entry)
                actions.append(f"disallowed {entry}")

    async def _converge_chap(
        self,
        spec: IscsiTargetSpec,
        tid: int,
        current: Target | None,
        password: str | None,
        actions: list[str],
    ) -> None:
        bound = list(current.accounts) if current is not None else []
        user = spec.chap.username if spec.chap is not None else None
        for account in bound:
            if account != user:
                await self.adm.unbind_account(tid, account)
                actions.append(f"stopped requiring CHAP user {account}")
        if user is None or password is None:
            return
        if self._passwords.get(user) != _fingerprint(password):
            if user in await self.adm.list_accounts():
                await self.adm.delete_account(user)  # also unbinds it everywhere
                bound = []
            await self.adm.new_account(user, password)
            self._passwords[user] = _fingerprint(password)
        if user not in bound:
            await self.adm.bind_account(tid, user)
            actions.append(f"required CHAP user {user}")

    # -- deleting -----------------------------------------------------------------------------

    async def _delete(self, obj: IscsiTarget) -> Result:
        tid = obj.status.tid
        ours = [t for t in await self.adm.show() if t.tid == tid and t.iqn == obj.spec.iqn]
        if ours:
            [target] = ours
            initiators = sorted({session.initiator for session in target.sessions})
            forced = obj.metadata.annotations.get(FORCE_DELETE) == "true"
            if initiators and not forced:
                await self._set_ready(
                    obj,
                    "False",
                    "DeleteBlocked",
                    f"{len(initiators)} initiator(s) connected ({', '.join(initiators)}); "
                    f'disconnect them or annotate {FORCE_DELETE}: "true"',
                )
                return Result(requeue_after=DELETE_RETRY)
            await self.adm.delete_target(target.tid, force=bool(initiators))
            await self._forget_accounts(target.accounts)
            await self.recorder.record(
                obj, "Normal", "TargetDeleted", f"deleted target {target.tid} ({target.iqn})"
            )
        await self.store.remove_finalizer("IscsiTarget", obj.metadata.name, FINALIZER)
        return Result()

    async def _forget_accounts(self, accounts: tuple[str, ...]) -> None:
        """Delete CHAP accounts no remaining target binds."""
        still_bound = {a for t in await self.adm.show() for a in t.accounts}
        for account in accounts:
            if account not in still_bound:
                await self.adm.delete_account(account)
                self._passwords.pop(account, None)

    # -- status -------------------------------------------------------------------------------

    async def _write_status(self, obj: IscsiTarget, shown: Target) -> None:
        luns = []
        for lun in shown.luns:
            if lun.number == 0 or lun.backing_store_path is None:
                continue
            size = await asyncio.to_thread(backing_store_size, lun.backing_store_path)
            luns.append(
                LunStatus(lun=lun.number, size_bytes=size, backing_store=lun.backing_store_path)
            )
        sessions = sorted(
            f"{session.initiator} ({', '.join(session.addresses)})" for session in shown.sessions
        )
        message = f"target {shown.tid} serves {len(luns)} LUN(s) to {len(sessions)} session(s)"

        def mutate(current: IscsiTarget) -> None:
            current.status.tid = shown.tid
            current.status.luns = luns
            current.status.sessions = sessions

        await self._set_ready(obj, "True", "Serving", message, mutate)

    async def _set_ready(
        self,
        obj: IscsiTarget,
        status: ConditionStatus,
        reason: str,
        message: str,
        also: Callable[[IscsiTarget], None] | None = None,
    ) -> None:
        """Set Ready (and, through `also`, other status fields); a Warning event when Ready
        newly turns False with this reason."""
        generation = obj.metadata.generation
        newly_failed = False

        def mutate(current: IscsiTarget) -> bool:
            nonlocal newly_failed
            before = current.status.model_dump()
            if also is not None:
                also(current)
            newly_failed = set_ready(current.status, status, reason, message, generation)
            return current.status.model_dump() != before

        updated = await self.store.patch_status("IscsiTarget", obj.metadata.name, mutate)
        if newly_failed:
            await self.recorder.record(updated, "Warning", reason, message)


def _age_order(obj: IscsiTarget) -> tuple[str, str]:
    created = obj.metadata.creation_timestamp
    return (created.isoformat() if created else "", obj.metadata.name)
