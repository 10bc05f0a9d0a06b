"""The store's writes: compare-and-swap transactions on every key an object was merged from."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from controller.runtime.etcd_transport import StoreError
from controller.runtime.layout import Snapshot, Stored
from controller.runtime.store_client import Compare, to_json
from controller.runtime.store_errors import AlreadyExists, Conflict, NotFound
from controller.runtime.store_keys import etcd_compares
from controller.runtime.store_reads import StoreReads
from crds import AnyResource
from crds.meta import now

from . import layout

T = TypeVar("T", bound=AnyResource)


class StoreWrites(StoreReads):
    def _compared(self, snapshot: Snapshot) -> list[tuple[bytes, int]]:
        """Every key the object was merged from (and this writer's part), with the mod
        revision it was read at (0: absent)."""
        kind, name = snapshot.kind, snapshot.name
        compared = [(self.raw_key(snapshot.spec_key), snapshot.spec.revision)]
        if layout.has_parts(kind):
            nodes = snapshot.relevant() or set()
            writers = {layout.CONTROLLER, self.writer, *snapshot.parts}
            for node in nodes:
                with contextlib.suppress(ValueError):
                    writers.add(layout.node_writer(node))
            for writer in sorted(writers):
                part = snapshot.parts.get(writer)
                compared.append((self.part_key(kind, name, writer), part.revision if part else 0))
        return compared

    def _compares(self, snapshot: Snapshot) -> list[Compare]:
        """Every key the object was merged from (and this writer's part) is as it was read."""
        txn = self.client.transactions
        return [txn.mod(key) == revision for key, revision in self._compared(snapshot)]

    async def _commit(
        self, compares: Sequence[Compare], ops: Sequence[Any], key: bytes, action: str = "write"
    ) -> int:
        """Run `ops` if every compare holds; the new revision, or Conflict."""
        ok, responses = await self.call(
            self.client.transaction(compare=etcd_compares(compares), success=list(ops), failure=[]),
            key,
            action,
        )
        if not ok:
            raise Conflict("the object was modified since it was read; read it again and retry")
        response = responses[0]
        reply = getattr(response, response.WhichOneof("response"))
        revision: int = reply.header.revision
        return revision

    async def create(self, obj: T, lease: Any = None, guard: Sequence[Compare] = ()) -> T:
        """Store a new object. Sets uid, generation 1 and creationTimestamp.

        A status given is written as this writer's part, in the same transaction.
        """
        kind, name = obj.kind, obj.metadata.name
        key = self.key(kind, name)
        stored = obj.model_copy(deep=True)
        stored.metadata.uid = str(uuid.uuid4())
        stored.metadata.generation = 1
        stored.metadata.creation_timestamp = now()
        stored.metadata.deletion_timestamp = None
        txn = self.client.transactions
        ops = []
        status = stored.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        default = type(stored.status)().model_dump(mode="json", by_alias=True, exclude_none=True)
        if layout.has_parts(kind) and status != default:
            part = layout.part_document(stored.metadata.uid, status, [])
            ops.append(txn.put(self.part_key(kind, name), to_json(part)))
        ops.append(txn.put(key, self._spec_document(stored, stored.metadata.finalizers), lease))
        try:
            revision = await self._commit([txn.create(key) == 0, *guard], ops, key)
        except Conflict:
            if guard and await self.try_get(kind, name) is None:
                raise Conflict(f"write of {kind} {name!r} refused: guard failed") from None
            raise AlreadyExists(f"{kind} {name!r} already exists") from None
        stored.metadata.resource_version = str(revision)
        return stored

    def _require_version(self, obj: AnyResource) -> int:
        version = obj.metadata.resource_version
        if version is None or not version.isdigit():
            raise StoreError(f"{obj.kind} {obj.metadata.name!r}: update needs a resourceVersion")
        return int(version)

    async def _snapshot_at_version(self, obj: AnyResource) -> Snapshot:
        """The stored object's keys if it is still at the version `obj` was read at."""
        version = self._require_version(obj)
        snapshot = await self._snapshot(obj.kind, obj.metadata.name)
        if snapshot is None:
            raise NotFound(f"{obj.kind} {obj.metadata.name!r} not found")
        if snapshot.version() != version:
            raise Conflict(
                f"{obj.kind} {obj.metadata.name!r} was modified since it was read "
                "(stale resourceVersion)"
            )
        return snapshot

    async def update(self, obj: T, lease: Any = None, guard: Sequence[Compare] = ()) -> T:
        """Write metadata and spec; status stays as stored. CAS on every key of the object.

        A changed spec increments generation. Finalizers held by status parts stay theirs (only
        their writer removes them). An object being deleted whose last finalizer is removed
        here is deleted. `guard` adds compares to the same transaction (a leader's fencing
        token).
        """
        snapshot = await self._snapshot_at_version(obj)
        current = self._object(snapshot)
        stored = obj.model_copy(deep=True)
        stored.status = current.status
        for field in ("uid", "creation_timestamp", "deletion_timestamp"):
            setattr(stored.metadata, field, getattr(current.metadata, field))
        stored.metadata.generation = current.metadata.generation or 1
        if stored.spec != current.spec:
            stored.metadata.generation += 1
        held = snapshot.part_finalizers()
        own = [f for f in stored.metadata.finalizers if f not in held]
        stored.metadata.finalizers = [*own, *(f for f in current.metadata.finalizers if f in held)]
        if stored.metadata.deletion_timestamp is not None and not stored.metadata.finalizers:
            await self._delete_all(snapshot, guard)
            return stored
        key = self.raw_key(snapshot.spec_key)
        txn = self.client.transactions
        put = txn.put(key, self._spec_document(stored, own), lease)
        revision = await self._commit([*self._compares(snapshot), *guard], [put], key)
        stored.metadata.resource_version = str(revision)
        return stored

    async def update_status(self, obj: T, guard: Sequence[Compare] = ()) -> T:
        """Write this writer's status part; metadata and spec stay as stored.

        CAS on every key the object was merged from. `guard` adds compares to the same
        transaction (a leader's fencing token). Returns the object as merged after the write
        (a node's value of a controller-only field does not show).
        """
        snapshot = await self._snapshot_at_version(obj)
        status = obj.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        stored = await self._write_part(snapshot, status, guard=guard)
        return stored  # type: ignore[return-value]

    async def _write_part(
        self,
        snapshot: Snapshot,
        status: dict[str, Any] | None = None,
        finalizers: Sequence[str] | None = None,
        guard: Sequence[Compare] = (),
    ) -> AnyResource:
        """Put this writer's part (status: the merged one; finalizers: as stored by default)."""
        key, document = self._part(snapshot, status, finalizers)
        txn = self.client.transactions
        revision = await self._commit(
            [*self._compares(snapshot), *guard], [txn.put(key, to_json(document))], key
        )
        snapshot.parts[self.writer] = Stored(document, revision)
        return self._object(snapshot)

    def _part(
        self,
        snapshot: Snapshot,
        status: dict[str, Any] | None = None,
        finalizers: Sequence[str] | None = None,
    ) -> tuple[bytes, layout.Document]:
        """This writer's part key and document (status: the merged one by default;
        finalizers: as stored by default)."""
        kind, name = snapshot.kind, snapshot.name
        if not layout.has_parts(kind):
            raise StoreError(f"{kind} has no status parts")
        if status is None:
            status = snapshot.merged().get("status") or {}
        if finalizers is None:
            counted = snapshot.counted().get(self.writer)
            finalizers = list(layout._finalizers(counted.document)) if counted else []
        return self.part_key(kind, name), layout.part_document(snapshot.uid, status, finalizers)

    async def patch_status(
        self,
        kind: str,
        name: str,
        mutate: Callable[[Any], bool | None],
        guard: Sequence[Compare] = (),
        attempts: int = 10,
    ) -> AnyResource:
        """Read, let `mutate` change the status in place, write; retry on conflicts.

        `mutate` returns False to skip the write (nothing to change). One read per attempt:
        the write compares every key at the revision that read found.
        """
        for _ in range(attempts):
            snapshot = await self._snapshot(kind, name)
            if snapshot is None:
                raise NotFound(f"{kind} {name!r} not found")
            current = self._object(snapshot)
            if mutate(current) is False:
                return current
            status = current.status.model_dump(mode="json", by_alias=True, exclude_none=True)
            try:
                return await self._write_part(snapshot, status, guard=guard)
            except Conflict:
                if guard and not await self._guard_holds(guard):
                    raise Conflict(
                        f"status write of {kind} {name!r} refused: guard failed"
                    ) from None
        raise Conflict(f"{kind} {name!r}: status write kept conflicting; try again")

    async def _guard_holds(self, guard: Sequence[Compare]) -> bool:
        ok, _ = await self.call(
            self.client.transaction(compare=etcd_compares(guard), success=[], failure=[])
        )
        return bool(ok)

    async def delete(self, kind: str, name: str) -> AnyResource | None:
        """Delete an object (every key of it), or mark it for deletion while finalizers remain.

        Returns the object as marked, or None when it is gone.
        """
        for _ in range(10):
            snapshot = await self._snapshot(kind, name)
            if snapshot is None:
                raise NotFound(f"{kind} {name!r} not found")
            current = self._object(snapshot)
            try:
                if not current.metadata.finalizers:
                    await self._delete_all(snapshot)
                    return None
                if current.metadata.deletion_timestamp is not None:
                    return current
                current.metadata.deletion_timestamp = now()
                key = self.raw_key(snapshot.spec_key)
                spec_finalizers = list(layout._finalizers(snapshot.spec.document))
                put = self.client.transactions.put(
                    key, self._spec_document(current, spec_finalizers)
                )
                revision = await self._commit(self._compares(snapshot), [put], key)
                current.metadata.resource_version = str(revision)
                return current
            except Conflict:
                continue
        raise Conflict(f"{kind} {name!r}: deletion kept conflicting; try again")

    async def _delete_all(self, snapshot: Snapshot, guard: Sequence[Compare] = ()) -> None:
        """Delete the spec and every status part of an object in one transaction (CAS)."""
        kind, name = snapshot.kind, snapshot.name
        spec = self.raw_key(snapshot.spec_key)
        txn = self.client.transactions
        ops = [txn.delete(spec)]  # first: a watcher sees the object deleted, not thinned out
        if layout.has_parts(kind):
            parts = self.raw_key(layout.parts_range(kind))
            reply = await self.call(self.client.get_prefix(parts, keys_only=True), parts, "read")
            for kv in reply:
                ref = layout.parse_key(kind, self.relative(kv.key))
                if ref is not None and ref.name == name:
                    ops.append(txn.delete(kv.key))
        await self._commit([*self._compares(snapshot), *guard], ops, spec, "delete")

    async def collect_garbage(self, kind: str, name: str) -> bool:
        """Delete an object being deleted that has no finalizer left; True if it was.

        Its last finalizer's writer may be an agent, which cannot delete the object's keys:
        the controller does it here.
        """
        snapshot = await self._snapshot(kind, name)
        if snapshot is None:
            return False
        current = self._object(snapshot)
        if current.metadata.deletion_timestamp is None or current.metadata.finalizers:
            return False
        await self._delete_all(snapshot)
        return True

    async def remove_finalizer(self, kind: str, name: str, finalizer: str) -> None:
        """Drop one finalizer of this writer's (the controller also drops the spec's).

        The object is deleted if it was the last one during deletion and this writer may
        delete it (the controller); otherwise the controller's garbage collection does.
        """
        for _ in range(10):
            snapshot = await self._snapshot(kind, name)
            if snapshot is None or finalizer not in snapshot.finalizers():
                return
            counted = snapshot.counted().get(self.writer)
            own = list(layout._finalizers(counted.document)) if counted else []
            in_spec = finalizer in layout._finalizers(snapshot.spec.document)
            try:
                if in_spec and self.writer == layout.CONTROLLER:
                    current = self._object(snapshot)
                    current.metadata.finalizers.remove(finalizer)
                    await self.update(current)
                    if finalizer not in own:
                        return
                    continue
                if finalizer not in own:
                    raise StoreError(
                        f"{kind} {name!r}: finalizer {finalizer} is not {self.writer}'s to remove"
                    )
                own.remove(finalizer)
                others = [
                    f
                    for writer, part in snapshot.counted().items()
                    if writer != self.writer
                    for f in layout._finalizers(part.document)
                ]
                remaining = [*layout._finalizers(snapshot.spec.document), *others, *own]
                deleting = (snapshot.spec.document.get("metadata") or {}).get("deletionTimestamp")
                if deleting and not remaining and self.writer == layout.CONTROLLER:
                    await self._delete_all(snapshot)
                else:
                    await self._write_part(snapshot, finalizers=own)
                return
            except Conflict:
                continue
        raise Conflict(f"{kind} {name!r}: removing finalizer kept conflicting")

    async def add_finalizer(self, kind: str, name: str, finalizer: str) -> AnyResource:
        """Add a finalizer to this writer's part."""
        for _ in range(10):
            snapshot = await self._snapshot(kind, name)
            if snapshot is None:
                raise NotFound(f"{kind} {name!r} not found")
            if finalizer in snapshot.finalizers():
                return self._object(snapshot)
            counted = snapshot.counted().get(self.writer)
            own = list(layout._finalizers(counted.document)) if counted else []
            try:
                return await self._write_part(snapshot, finalizers=[*own, finalizer])
            except Conflict:
                continue
        raise Conflict(f"{kind} {name!r}: adding finalizer kept conflicting")
