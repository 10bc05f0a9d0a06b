"""The object store on etcd: keys by writer, compare-and-swap on every write.

Each object is a spec key plus one status part per writer (controller/runtime/layout.py has the keys
and the merge rule); reads merge them, in one consistent read, into the one object callers see.
`resourceVersion` is the highest mod_revision of the keys merged; every write compares each of them,
so a stale writer gets `Conflict`. `update` owns metadata and spec (and bumps `generation` when the
spec changes); `update_status` writes the store's writer's part only. Deleting an object with
finalizers only sets `deletionTimestamp`; its keys go (all in one transaction) when the last
finalizer is removed, by the controller's garbage collection when that last finalizer was a node's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rtypes
import aetcd.utils
import aetcd.watcher
import grpc
import pydantic

from controller.runtime.etcd_transport import StoreError as StoreError
from controller.runtime.etcd_transport import TlsFiles as TlsFiles
from controller.runtime.etcd_transport import Unavailable as Unavailable
from controller.runtime.etcd_transport import certificate_user as certificate_user
from controller.runtime.etcd_transport import is_permission_denied, make_client, unavailable
from controller.runtime.layout import KindView, Snapshot, Stored
from crds import KINDS, AnyResource, describe_validation_error
from crds.meta import now

from . import layout

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/kvmctl"
DEFAULT_TIMEOUT = 5.0
T = TypeVar("T", bound=AnyResource)
Compare = Any  # an aetcd transaction compare (aetcd has no type hints)
_Range = tuple[bytes, bytes | None]  # a key, or [key, range_end)


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class Conflict(StoreError):
    """The object changed since it was read (stale resourceVersion) or a guard failed."""


class PermissionDenied(StoreError):
    """etcd's RBAC refused the request: this client's user lacks the permission."""


class UndecodableObject(StoreError):
    """A stored value that is not a valid object (written by something other than kvmctl)."""


class Compacted(StoreError):
    """A watch asked for a revision etcd has compacted away: relist."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision {revision} was compacted")
        self.revision = revision


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: AnyResource
    revision: int


class Store:
    """Typed CRUD and watch of kvmctl objects in etcd, as `writer` (controller/runtime/layout.py).

    `writer` is whose status part `update_status`/`patch_status` write and whose part holds
    the finalizers `add_finalizer` adds: "controller" (also what the admin and the CLI use), or
    "node.NODE" for NODE's agent.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        tls: TlsFiles | None = None,
        writer: str = layout.CONTROLLER,
    ) -> None:
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self.writer = layout.check_writer(writer)
        self.client = make_client(self.endpoints, timeout, tls)
        self.user = tls.user() if tls else None
        """The etcd user of this client (its certificate's CN), for error messages."""

    def as_writer(self, writer: str) -> Store:
        """This store (same connection) writing as `writer`."""
        view = copy.copy(self)
        view.writer = layout.check_writer(writer)
        return view

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, check_layout: bool = True) -> None:
        """Connect and check that etcd answers, within the timeout, and the key layout."""
        await self.call(self.client.connect())
        await self.revision()
        if check_layout:
            await self.check_layout()

    async def close(self) -> None:
        await self.client.close()

    def relative(self, key: bytes) -> str:
        """`key` without the cluster's prefix, as messages show it."""
        return key.decode(errors="replace").removeprefix(f"{self.prefix}/")

    def _permission_denied(self, action: str, key: bytes | None) -> PermissionDenied:
        what = f"the {action} of {self.relative(key)}" if key is not None else f"a {action}"
        who = f"user {self.user}" if self.user else "this client's etcd user"
        return PermissionDenied(f"etcd refused {what}: {who} lacks permission")

    async def call(
        self,
        awaitable: Awaitable[Any],
        key: bytes | None = None,
        action: str = "request",
        *,
        waits: float = 0.0,
    ) -> Any:
        """Run one etcd request, turning connection trouble into `Unavailable`.

        `action` ("read", "write", "delete") and `key` name the request in a `PermissionDenied`.
        `waits`: seconds the request may legitimately wait on top of the usual timeout (a lock
        acquisition waiting for another holder).
        """
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the request completes, and a cancelled task must stop.
            async with asyncio.timeout(self.timeout + 1 + waits):
                return await awaitable
        except (
            aetcd.exceptions.ConnectionFailedError,
            aetcd.exceptions.ConnectionTimeoutError,
        ) as e:
            raise unavailable(self.client, e) from None
        except TimeoutError as e:
            raise unavailable(self.client, e) from None
        except aetcd.exceptions.ClientError as e:
            if is_permission_denied(e):
                raise self._permission_denied(action, key) from None
            raise StoreError(f"etcd request failed: {e}") from None

    # Keys ----------------------------------------------------------------------------------

    def raw_key(self, relative: str) -> bytes:
        return f"{self.prefix}/{relative}".encode()

    def kind_prefix(self, kind: str) -> bytes:
        """The range holding every key (spec and status parts) of a kind."""
        if kind not in KINDS:
            raise StoreError(f"unknown kind {kind!r}")
        return self.raw_key(layout.kind_range(kind))

    def key(self, kind: str, name: str) -> bytes:
        """The spec key of an object (for Events: of this writer's Event)."""
        self.kind_prefix(kind)
        # Names are validated by the models; check again so no caller can escape the prefix.
        return self.raw_key(layout.spec_key(kind, name, self.writer))

    def part_key(self, kind: str, name: str, writer: str | None = None) -> bytes:
        """`writer`'s (by default this store's) status part of an object."""
        self.kind_prefix(kind)
        return self.raw_key(layout.part_key(kind, name, writer or self.writer))

    def _stored(self, kv: Any) -> Stored:
        try:
            document = json.loads(kv.value)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            key = kv.key.decode(errors="replace")
            raise UndecodableObject(f"{key}: stored value is not JSON: {error}") from None
        return Stored(document, int(kv.mod_revision))

    def _object(self, snapshot: Snapshot) -> AnyResource:
        kind = snapshot.kind
        try:
            return KINDS[kind].model.model_validate(snapshot.merged())
        except (ValueError, KeyError, TypeError) as error:
            key = f"{self.prefix}/{snapshot.spec_key}"
            # pydantic's own text quotes the offending input: a Secret's value would be logged.
            reason = (
                describe_validation_error(error)
                if isinstance(error, pydantic.ValidationError)
                else str(error)
            )
            raise UndecodableObject(
                f"{key}: stored value is not a valid {kind}: {reason}"
            ) from None

    def _view(self, kind: str, kvs: Iterable[Any]) -> KindView:
        """The keys of a kind, grouped; undecodable values are logged and left out."""
        view = KindView(kind)
        for kv in kvs:
            try:
                view.load(self.relative(kv.key), self._stored(kv))
            except UndecodableObject as error:
                log.error("skipping %s", error)
        return view

    def _spec_document(self, obj: AnyResource, finalizers: Sequence[str]) -> bytes:
        document = obj.to_dict()
        document["metadata"].pop("resourceVersion", None)
        document["metadata"]["finalizers"] = list(finalizers)
        if layout.has_parts(obj.kind):
            document.pop("status", None)
        return to_json(document)

    # Reads ---------------------------------------------------------------------------------

    async def revision(self) -> int:
        """The store's current revision (a linearizable read)."""
        probe = f"{self.prefix}/revision-probe".encode()
        reply = await self.call(self.client.get_prefix(probe), probe, "read")
        revision: int = reply.header.revision
        return revision

    async def check_layout(self) -> None:
        """Refuse a store still in the previous layout (`objects/...`): it must be migrated."""
        marker = self.raw_key(layout.LAYOUT_KEY)
        old = self.raw_key(layout.OLD_OBJECTS)
        try:
            if await self.call(self.client.get(marker), marker, "read") is not None:
                return
            reply = await self.call(self.client.get_prefix(old, keys_only=True), old, "read")
        except PermissionDenied:
            return  # roles of this layout cannot read the old range: nothing to check
        if len(reply):
            raise StoreError(
                f"the store at {self.prefix} uses the old key layout (objects/...): "
                "run `kvmctl admin migrate-store` once"
            )

    async def _read(
        self, ranges: Sequence[_Range], compares: Sequence[Compare] = ()
    ) -> tuple[bool, dict[bytes, Any]]:
        """Read keys (or ranges) in one transaction if `compares` hold: (ok, {key: kv or None})."""
        txn = self.client.transactions
        ok, responses = await self.call(
            self.client.transaction(
                compare=list(compares),
                success=[txn.get(key, range_end) for key, range_end in ranges],
                failure=[],
            ),
            ranges[0][0],
            "read",
        )
        found: dict[bytes, Any] = {key: None for key, range_end in ranges if range_end is None}
        for response in responses if ok else []:
            for _, kv in response:
                found[kv.key] = kv
        return ok, found

    async def _snapshot(self, kind: str, name: str) -> Snapshot | None:
        snapshot, _ = await self._snapshot_and(kind, name)
        return snapshot

    async def _snapshot_and(
        self, kind: str, name: str, also: Sequence[bytes] = ()
    ) -> tuple[Snapshot | None, dict[bytes, Any]]:
        """Every key of an object that counts, and the keys `also`, read consistently.

        The spec, the controller's and this writer's parts and `also` come in one transaction;
        the parts of the relevant nodes (known only from those) in a second one that holds
        only while the first keys are unchanged, so all of them are one state of etcd.
        The snapshot is None if the object does not exist.
        """
        spec_key = self.key(kind, name)
        writers = [layout.CONTROLLER]
        if self.writer != layout.CONTROLLER:
            writers.append(self.writer)
        first: list[_Range] = [(spec_key, None), *((key, None) for key in also)]
        if layout.has_parts(kind):
            first += [(self.part_key(kind, name, writer), None) for writer in writers]
        txn = self.client.transactions
        for _ in range(10):
            _, found = await self._read(first)
            extra_keys = {key: found[key] for key in also}
            spec = found[spec_key]
            if spec is None:
                return None, extra_keys
            snapshot = Snapshot(kind, name, self._stored(spec), self.relative(spec_key))
            for writer in writers if layout.has_parts(kind) else []:
                kv = found[self.part_key(kind, name, writer)]
                if kv is not None:
                    snapshot.parts[writer] = self._stored(kv)
            more = self._more_parts(snapshot, writers)
            if not more:
                return snapshot, extra_keys
            unchanged = [txn.mod(k) == (kv.mod_revision if kv else 0) for k, kv in found.items()]
            ok, extra = await self._read(more, unchanged)
            if ok:
                for kv in extra.values():
                    ref = kv and layout.parse_key(kind, self.relative(kv.key))
                    if ref and ref.writer and ref.name == name:
                        snapshot.parts[ref.writer] = self._stored(kv)
                return snapshot, extra_keys
        raise Conflict(f"{kind} {name!r} kept changing while being read; try again")

    def _more_parts(self, snapshot: Snapshot, read: Sequence[str]) -> list[_Range]:
        """What else to read: the relevant nodes' parts (every part of the kind for None)."""
        kind, name = snapshot.kind, snapshot.name
        if not layout.has_parts(kind):
            return []
        nodes = snapshot.relevant()
        if nodes is None:
            start = self.raw_key(layout.parts_range(kind))
            return [(start, aetcd.utils.prefix_range_end(start))]
        ranges: list[_Range] = []
        for node in sorted(nodes):
            try:
                writer = layout.node_writer(node)
            except ValueError:
                continue  # not a node name: no part can be there
            if writer not in read:
                ranges.append((self.part_key(kind, name, writer), None))
        return ranges

    async def get(self, kind: str, name: str) -> AnyResource:
        snapshot = await self._snapshot(kind, name)
        if snapshot is None:
            raise NotFound(f"{kind} {name!r} not found")
        return self._object(snapshot)

    async def get_with_term(self, kind: str, name: str, leader_key: str) -> tuple[AnyResource, int]:
        """The object and the current term: the leader key's create revision (0: no leader),
        read in the same transaction, so a placement's token can be checked against it."""
        key = leader_key.encode()
        snapshot, found = await self._snapshot_and(kind, name, [key])
        if snapshot is None:
            raise NotFound(f"{kind} {name!r} not found")
        leader = found[key]
        return self._object(snapshot), int(leader.create_revision) if leader else 0

    async def try_get(self, kind: str, name: str) -> AnyResource | None:
        try:
            return await self.get(kind, name)
        except NotFound:
            return None

    async def list_objects(self, kind: str) -> tuple[list[AnyResource], int]:
        """Every object of a kind, sorted by name, and the revision the list was read at."""
        prefix = self.kind_prefix(kind)
        reply = await self.call(self.client.get_prefix(prefix), prefix, "read")
        objects = []
        for snapshot in self._view(kind, reply).snapshots():
            try:
                objects.append(self._object(snapshot))
            except UndecodableObject as error:
                log.error("skipping %s", error)
        objects.sort(key=lambda obj: obj.metadata.name)
        return objects, reply.header.revision

    # Writes --------------------------------------------------------------------------------

    def _compares(self, snapshot: Snapshot) -> list[Compare]:
        """Every key the object was merged from (and this writer's part) is as it was read."""
        txn = self.client.transactions
        kind, name = snapshot.kind, snapshot.name
        compares = [txn.mod(self.raw_key(snapshot.spec_key)) == snapshot.spec.revision]
        if layout.has_parts(kind):
            nodes = snapshot.relevant() or set()
            writers = {layout.CONTROLLER, self.writer, *snapshot.parts}
            for node in nodes:
                with contextlib.suppress(ValueError):
                    writers.add(layout.node_writer(node))
            for writer in sorted(writers):
                part = snapshot.parts.get(writer)
                compares.append(
                    txn.mod(self.part_key(kind, name, writer)) == (part.revision if part else 0)
                )
        return compares

    async def _commit(
        self, compares: Sequence[Compare], ops: Sequence[Any], key: bytes, action: str = "write"
    ) -> int:
        """Run `ops` if every compare holds; the new revision, or Conflict."""
        ok, responses = await self.call(
            self.client.transaction(compare=list(compares), success=list(ops), failure=[]),
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
        kind, name = snapshot.kind, snapshot.name
        if not layout.has_parts(kind):
            raise StoreError(f"{kind} has no status parts")
        if status is None:
            status = snapshot.merged().get("status") or {}
        if finalizers is None:
            counted = snapshot.counted().get(self.writer)
            finalizers = list(layout._finalizers(counted.document)) if counted else []
        document = layout.part_document(snapshot.uid, status, finalizers)
        key = self.part_key(kind, name)
        txn = self.client.transactions
        revision = await self._commit(
            [*self._compares(snapshot), *guard], [txn.put(key, to_json(document))], key
        )
        snapshot.parts[self.writer] = Stored(document, revision)
        return self._object(snapshot)

    async def patch_status(
        self,
        kind: str,
        name: str,
        mutate: Callable[[Any], bool | None],
        guard: Sequence[Compare] = (),
        attempts: int = 10,
    ) -> AnyResource:
        """Read, let `mutate` change the status in place, write; retry on conflicts.

        `mutate` returns False to skip the write (nothing to change).
        """
        for _ in range(attempts):
            current = await self.get(kind, name)
            if mutate(current) is False:
                return current
            try:
                return await self.update_status(current, guard)
            except Conflict:
                if guard and not await self._guard_holds(guard):
                    raise Conflict(
                        f"status write of {kind} {name!r} refused: guard failed"
                    ) from None
        raise Conflict(f"{kind} {name!r}: status write kept conflicting; try again")

    async def _guard_holds(self, guard: Sequence[Compare]) -> bool:
        ok, _ = await self.call(
            self.client.transaction(compare=list(guard), success=[], failure=[])
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

    # Watch ---------------------------------------------------------------------------------

    async def _range_at(self, prefix: bytes, revision: int) -> list[Any]:
        """Every key under `prefix` as it was at `revision`."""
        request = aetcd.rpc.RangeRequest(
            key=prefix, range_end=aetcd.utils.prefix_range_end(prefix), revision=revision
        )

        async def ask() -> Any:
            await self.client.connect()
            try:
                return await self.client.kvstub.Range(
                    request, timeout=self.timeout, metadata=self.client.metadata
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                    raise Compacted(revision) from None
                aetcd.exceptions._handle_exception(error)

        reply = await self.call(ask(), prefix, "watch")
        return [aetcd.rtypes.KeyValue(kv) for kv in reply.kvs]

    async def _view_at(self, kind: str, revision: int, reconnect_delay: float) -> KindView:
        """The kind as it was at `revision` (empty before the first); retries connection loss."""
        if revision < 1:
            return KindView(kind)
        while True:
            try:
                return self._view(kind, await self._range_at(self.kind_prefix(kind), revision))
            except (PermissionDenied, Compacted):
                raise
            except StoreError as error:
                log.info("watch of %s: reading revision %d failed: %s", kind, revision, error)
            await asyncio.sleep(reconnect_delay)

    async def watch(
        self,
        kind: str,
        start_revision: int,
        reconnect_delay: float = 0.5,
    ) -> AsyncIterator[WatchEvent]:
        """Events of a kind's merged objects from `start_revision` on, resuming after lost
        connections. A change to a part that does not count for its object yields nothing.

        Raises `Compacted` when etcd no longer has the revision to resume from: relist.
        """
        prefix = self.kind_prefix(kind)
        # The kind as it was just before, to merge each changed key with the object's others
        # (this read also turns a refused watch into an error, not a silent stream).
        view = await self._view_at(kind, start_revision - 1, reconnect_delay)
        next_revision = start_revision
        while True:
            try:
                stream = await self.client.watch_prefix(prefix, start_revision=next_revision)
                async for event in stream:
                    next_revision = event.kv.mod_revision + 1
                    for change in self._changes(kind, view, event):
                        yield change
            except aetcd.exceptions.RevisionCompactedError as error:
                raise Compacted(error.compacted_revision) from None
            except aetcd.exceptions.ClientError as error:
                log.info("watch of %s lost (%s); resuming at %d", kind, error, next_revision)
            await asyncio.sleep(reconnect_delay)

    def _changes(self, kind: str, view: KindView, event: aetcd.rtypes.Event) -> list[WatchEvent]:
        revision = event.kv.mod_revision
        stored = None
        if event.kind != aetcd.rtypes.EventKind.DELETE:
            try:
                stored = self._stored(event.kv)
            except UndecodableObject as error:
                log.error("skipping watch event: %s", error)
                return []
        changes = []
        for before, after in view.set(self.relative(event.kv.key), stored):
            document = after if after is not None else before
            assert document is not None
            type_: Literal["ADDED", "MODIFIED", "DELETED"] = (
                "DELETED" if after is None else "ADDED" if before is None else "MODIFIED"
            )
            document["metadata"]["resourceVersion"] = str(revision)
            try:
                obj = KINDS[kind].model.model_validate(document)
            except pydantic.ValidationError as error:
                log.error("skipping watch event of %s: %s", kind, describe_validation_error(error))
                continue
            changes.append(WatchEvent(type_, obj, revision))
        return changes

    async def compact(self, revision: int) -> None:
        await self.call(self.client.compact(revision, physical=True))


def to_json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
