"""The object store on etcd: one key per object, compare-and-swap on every write.

Layout: `{prefix}/objects/{Kind}/{name}` holds the whole object as JSON. `resourceVersion` is
the key's etcd mod_revision; every update compares it, so a stale writer gets `Conflict`.
`update` owns metadata and spec (and bumps `generation` when the spec changes);
`update_status` owns status. Each keeps the other's part as stored, so users and controllers
never overwrite each other. Deleting an object with finalizers only sets `deletionTimestamp`;
the key goes when the last finalizer is removed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rtypes
import pydantic

from controller.etcd_transport import StoreError as StoreError
from controller.etcd_transport import TlsFiles as TlsFiles
from controller.etcd_transport import Unavailable as Unavailable
from controller.etcd_transport import certificate_user as certificate_user
from controller.etcd_transport import is_permission_denied, make_client, unavailable
from crds import KINDS, AnyResource, describe_validation_error
from crds.meta import _check_name, now

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/kvmctl"
DEFAULT_TIMEOUT = 5.0
T = TypeVar("T", bound=AnyResource)
Compare = Any  # an aetcd transaction compare (aetcd has no type hints)


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
    """Typed CRUD and watch of kvmctl objects in etcd."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        tls: TlsFiles | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self.client = make_client(self.endpoints, timeout, tls)
        self.user = tls.user() if tls else None
        """The etcd user of this client (its certificate's CN), for error messages."""

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and check that etcd answers, within the timeout."""
        await self.call(self.client.connect())
        await self.revision()

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

    def kind_prefix(self, kind: str) -> bytes:
        if kind not in KINDS:
            raise StoreError(f"unknown kind {kind!r}")
        return f"{self.prefix}/objects/{kind}/".encode()

    def key(self, kind: str, name: str) -> bytes:
        # Names are validated by the models; check again so no caller can escape the prefix.
        _check_name(name)
        return self.kind_prefix(kind) + name.encode()

    def _decode(self, kind: str, kv: aetcd.rtypes.KeyValue) -> AnyResource:
        try:
            document = json.loads(kv.value)
            document["metadata"]["resourceVersion"] = str(kv.mod_revision)
            return KINDS[kind].model.model_validate(document)
        except (ValueError, KeyError, TypeError) as error:
            key = kv.key.decode(errors="replace")
            # pydantic's own text quotes the offending input: a Secret's value would be logged.
            reason = (
                describe_validation_error(error)
                if isinstance(error, pydantic.ValidationError)
                else str(error)
            )
            raise UndecodableObject(
                f"{key}: stored value is not a valid {kind}: {reason}"
            ) from None

    def _decode_all(self, kind: str, kvs: Any) -> list[AnyResource]:
        """Decode a listing, skipping (and logging) values that are not valid objects."""
        objects = []
        for kv in kvs:
            try:
                objects.append(self._decode(kind, kv))
            except UndecodableObject as error:
                log.error("skipping %s", error)
        return objects

    @staticmethod
    def _encode(obj: AnyResource) -> bytes:
        document = obj.to_dict()
        document["metadata"].pop("resourceVersion", None)
        return json.dumps(document, separators=(",", ":")).encode()

    # Reads ---------------------------------------------------------------------------------

    async def revision(self) -> int:
        """The store's current revision (a linearizable read)."""
        probe = f"{self.prefix}/revision-probe".encode()
        reply = await self.call(self.client.get_prefix(probe), probe, "read")
        revision: int = reply.header.revision
        return revision

    async def get(self, kind: str, name: str) -> AnyResource:
        key = self.key(kind, name)
        reply = await self.call(self.client.get(key), key, "read")
        if reply is None:
            raise NotFound(f"{kind} {name!r} not found")
        return self._decode(kind, reply)

    async def try_get(self, kind: str, name: str) -> AnyResource | None:
        try:
            return await self.get(kind, name)
        except NotFound:
            return None

    async def list_objects(self, kind: str) -> tuple[list[AnyResource], int]:
        """Every object of a kind, sorted by name, and the revision the list was read at."""
        prefix = self.kind_prefix(kind)
        reply = await self.call(self.client.get_prefix(prefix), prefix, "read")
        objects = self._decode_all(kind, reply)
        return objects, reply.header.revision

    # Writes --------------------------------------------------------------------------------

    async def _swap(
        self,
        key: bytes,
        value: bytes,
        compares: list[Compare],
        lease: Any = None,
    ) -> int:
        """Put `value` at `key` if every compare holds; return the new revision."""
        txn = self.client.transactions
        ok, responses = await self.call(
            self.client.transaction(
                compare=compares, success=[txn.put(key, value, lease)], failure=[]
            ),
            key,
            "write",
        )
        if not ok:
            raise Conflict("the object was modified since it was read; read it again and retry")
        revision: int = responses[0].response_put.header.revision
        return revision

    async def create(self, obj: T, lease: Any = None, guard: Sequence[Compare] = ()) -> T:
        """Store a new object. Sets uid, generation 1 and creationTimestamp."""
        kind, name = obj.kind, obj.metadata.name
        key = self.key(kind, name)
        stored = obj.model_copy(deep=True)
        stored.metadata.uid = str(uuid.uuid4())
        stored.metadata.generation = 1
        stored.metadata.creation_timestamp = now()
        stored.metadata.deletion_timestamp = None
        txn = self.client.transactions
        try:
            revision = await self._swap(
                key, self._encode(stored), [txn.create(key) == 0, *guard], lease
            )
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

    async def _current_at_version(self, obj: AnyResource) -> tuple[AnyResource, int]:
        """The stored object and the version `obj` was read at; Conflict if they differ."""
        current = await self.get(obj.kind, obj.metadata.name)
        version = self._require_version(obj)
        if int(current.metadata.resource_version or 0) != version:
            raise Conflict(
                f"{obj.kind} {obj.metadata.name!r} was modified since it was read "
                "(stale resourceVersion)"
            )
        return current, version

    async def update(self, obj: T, lease: Any = None, guard: Sequence[Compare] = ()) -> T:
        """Write metadata and spec; status stays as stored. CAS on resourceVersion.

        A changed spec increments generation. An object being deleted whose last finalizer is
        removed here is deleted. `guard` adds compares to the same transaction (a leader's
        fencing token).
        """
        kind, name = obj.kind, obj.metadata.name
        current, version = await self._current_at_version(obj)
        stored = obj.model_copy(deep=True)
        stored.status = current.status
        stored.metadata.uid = current.metadata.uid
        stored.metadata.creation_timestamp = current.metadata.creation_timestamp
        stored.metadata.deletion_timestamp = current.metadata.deletion_timestamp
        stored.metadata.generation = current.metadata.generation or 1
        if stored.spec != current.spec:
            stored.metadata.generation += 1
        key = self.key(kind, name)
        txn = self.client.transactions
        if stored.metadata.deletion_timestamp is not None and not stored.metadata.finalizers:
            await self._delete_if(key, [txn.mod(key) == version, *guard])
            return stored
        compares = [txn.mod(key) == version, *guard]
        revision = await self._swap(key, self._encode(stored), compares, lease)
        stored.metadata.resource_version = str(revision)
        return stored

    async def update_status(self, obj: T, guard: Sequence[Compare] = ()) -> T:
        """Write status only; metadata and spec stay as stored. CAS on resourceVersion.

        `guard` adds compares to the same transaction (a leader's fencing token).
        """
        kind, name = obj.kind, obj.metadata.name
        current, version = await self._current_at_version(obj)
        stored = current.model_copy(deep=True)
        stored.status = obj.status
        key = self.key(kind, name)
        txn = self.client.transactions
        revision = await self._swap(key, self._encode(stored), [txn.mod(key) == version, *guard])
        stored.metadata.resource_version = str(revision)
        return stored  # type: ignore[return-value]

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
        """Delete an object, or mark it for deletion while finalizers remain.

        Returns the object as marked, or None when it is gone.
        """
        for _ in range(10):
            current = await self.get(kind, name)
            key = self.key(kind, name)
            version = int(current.metadata.resource_version or 0)
            txn = self.client.transactions
            try:
                if not current.metadata.finalizers:
                    await self._delete_if(key, [txn.mod(key) == version])
                    return None
                if current.metadata.deletion_timestamp is not None:
                    return current
                current.metadata.deletion_timestamp = now()
                revision = await self._swap(key, self._encode(current), [txn.mod(key) == version])
                current.metadata.resource_version = str(revision)
                return current
            except Conflict:
                continue
        raise Conflict(f"{kind} {name!r}: deletion kept conflicting; try again")

    async def _delete_if(self, key: bytes, compares: list[Compare]) -> None:
        txn = self.client.transactions
        ok, _ = await self.call(
            self.client.transaction(compare=compares, success=[txn.delete(key)], failure=[]),
            key,
            "delete",
        )
        if not ok:
            raise Conflict("the object was modified since it was read; read it again and retry")

    async def remove_finalizer(self, kind: str, name: str, finalizer: str) -> None:
        """Drop one finalizer (deleting the object if it was the last one during deletion)."""
        for _ in range(10):
            current = await self.try_get(kind, name)
            if current is None or finalizer not in current.metadata.finalizers:
                return
            current.metadata.finalizers.remove(finalizer)
            try:
                await self.update(current)
                return
            except Conflict:
                continue
        raise Conflict(f"{kind} {name!r}: removing finalizer kept conflicting")

    async def add_finalizer(self, kind: str, name: str, finalizer: str) -> AnyResource:
        for _ in range(10):
            current = await self.get(kind, name)
            if finalizer in current.metadata.finalizers:
                return current
            current.metadata.finalizers.append(finalizer)
            try:
                return await self.update(current)
            except Conflict:
                continue
        raise Conflict(f"{kind} {name!r}: adding finalizer kept conflicting")

    # Watch ---------------------------------------------------------------------------------

    async def watch(
        self,
        kind: str,
        start_revision: int,
        reconnect_delay: float = 0.5,
    ) -> AsyncIterator[WatchEvent]:
        """Events of a kind from `start_revision` on, resuming after lost connections.

        Raises `Compacted` when etcd no longer has the revision to resume from: relist.
        """
        prefix = self.kind_prefix(kind)
        # etcd refuses a watch by cancelling it on creation, which aetcd ignores (the stream
        # stays silent): read the range's keys once so a refusal is an error, not a hang.
        try:
            await self.call(self.client.get_prefix(prefix, keys_only=True), prefix, "watch")
        except PermissionDenied:
            raise
        except StoreError as error:  # connection trouble: the loop below retries
            log.info("watch of %s: permission check failed: %s", kind, error)
        next_revision = start_revision
        while True:
            try:
                stream = await self.client.watch_prefix(
                    prefix, start_revision=next_revision, prev_kv=True
                )
                async for event in stream:
                    next_revision = event.kv.mod_revision + 1
                    try:
                        decoded = self._watch_event(kind, event)
                    except UndecodableObject as error:
                        log.error("skipping watch event: %s", error)
                        continue
                    yield decoded
            except aetcd.exceptions.RevisionCompactedError as error:
                raise Compacted(error.compacted_revision) from None
            except aetcd.exceptions.ClientError as error:
                log.info("watch of %s lost (%s); resuming at %d", kind, error, next_revision)
            await asyncio.sleep(reconnect_delay)

    def _watch_event(self, kind: str, event: aetcd.rtypes.Event) -> WatchEvent:
        revision = event.kv.mod_revision
        if event.kind == aetcd.rtypes.EventKind.DELETE:
            previous = event.prev_kv
            if previous is None:  # prev_kv compacted: rebuild a bare object from the key
                raise Compacted(revision)
            obj = self._decode(kind, previous)
            obj.metadata.resource_version = str(revision)
            return WatchEvent("DELETED", obj, revision)
        obj = self._decode(kind, event.kv)
        return WatchEvent("ADDED" if event.kv.version == 1 else "MODIFIED", obj, revision)

    async def compact(self, revision: int) -> None:
        await self.call(self.client.compact(revision, physical=True))
