"""Raw keys of the store's etcd, typed: what code outside the runtime uses instead of aetcd.

`store.keys` reads, writes, deletes and transacts on keys that are not objects (requests,
reports, claims, results, the layout marker). Values and compares are frozen dataclasses;
the aetcd client stays inside controller/runtime. Every request goes through `Store.call`, so
connection trouble is `Unavailable` and an RBAC refusal is `PermissionDenied` naming the key.

A transaction's compares are `KeyCompare`s or raw compares the runtime built (a leader's
fencing guard, `leader_record.guard_compare`); both go into the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aetcd

from controller.runtime.store_client import Compare, StoreClient

Key = bytes | str
"""A full key (with the cluster's prefix); a str is UTF-8 encoded."""


def _bytes(key: Key) -> bytes:
    return key.encode() if isinstance(key, str) else key


@dataclass(frozen=True)
class KeyValue:
    """One stored key, as etcd returned it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int
    """The lease id the key is attached to; 0 when none."""

    @classmethod
    def of(cls, kv: Any) -> KeyValue:
        return cls(
            key=bytes(kv.key),
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            version=int(kv.version),
            lease=int(kv.lease),
        )


@dataclass(frozen=True)
class KeyCompare:
    """A transaction's condition on one key: its `target` equals `expected`."""

    target: Literal["create", "mod", "version", "value"]
    key: bytes
    expected: int | bytes

    @classmethod
    def created(cls, key: Key, revision: int) -> KeyCompare:
        """The key's create revision is `revision` (0: the key does not exist)."""
        return cls("create", _bytes(key), revision)

    @classmethod
    def modified(cls, key: Key, revision: int) -> KeyCompare:
        """The key's mod revision is `revision` (0: the key does not exist)."""
        return cls("mod", _bytes(key), revision)

    @classmethod
    def version(cls, key: Key, version: int) -> KeyCompare:
        """The key's version (writes since its creation) is `version` (0: it does not exist)."""
        return cls("version", _bytes(key), version)

    @classmethod
    def value(cls, key: Key, value: bytes) -> KeyCompare:
        """The key holds `value` (false when the key does not exist)."""
        return cls("value", _bytes(key), value)

    def etcd(self) -> Compare:
        """The aetcd compare (for the runtime's own transactions)."""
        make = {
            "create": aetcd.transactions.Create,
            "mod": aetcd.transactions.Mod,
            "version": aetcd.transactions.Version,
            "value": aetcd.transactions.Value,
        }[self.target]
        return make(self.key) == self.expected


def etcd_compares(compares: Iterable[KeyCompare | Compare]) -> list[Compare]:
    """`compares` as aetcd compares: KeyCompares converted, raw ones (guards) as they are."""
    return [c.etcd() if isinstance(c, KeyCompare) else c for c in compares]


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int | None = None

    def __init__(self, key: Key, value: bytes, lease: int | None = None) -> None:
        object.__setattr__(self, "key", _bytes(key))
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "lease", lease or None)


@dataclass(frozen=True)
class Delete:
    key: bytes

    def __init__(self, key: Key) -> None:
        object.__setattr__(self, "key", _bytes(key))


@dataclass(frozen=True)
class Get:
    key: bytes

    def __init__(self, key: Key) -> None:
        object.__setattr__(self, "key", _bytes(key))


Operation = Put | Delete | Get
OpResult = KeyValue | bool | None
"""Per operation of the branch that ran: Get the KeyValue (None if absent), Delete whether the
key existed, Put None."""


def _etcd_operation(op: Operation) -> Any:
    if isinstance(op, Put):
        return aetcd.transactions.Put(op.key, op.value, lease=op.lease)
    if isinstance(op, Delete):
        return aetcd.transactions.Delete(op.key)
    return aetcd.transactions.Get(op.key)


def _result(op: Operation, response: Any) -> OpResult:
    if isinstance(op, Get):
        return KeyValue.of(response[0][1]) if response else None
    if isinstance(op, Delete):
        return bool(response.response_delete_range.deleted > 0)
    return None


class StoreKeys:
    """Raw-key requests on `store`'s connection (`store.keys`)."""

    def __init__(self, store: StoreClient) -> None:
        self._store = store

    async def get(self, key: Key, serializable: bool = False) -> KeyValue | None:
        """The key, or None. `serializable`: any member may answer, possibly stale."""
        raw = _bytes(key)
        client = self._store.client
        kv = await self._store.call(client.get(raw, serializable=serializable), raw, "read")
        return None if kv is None else KeyValue.of(kv)

    async def get_prefix(self, prefix: Key) -> list[KeyValue]:
        """Every key starting with `prefix`, in key order."""
        raw = _bytes(prefix)
        reply = await self._store.call(self._store.client.get_prefix(raw), raw, "read")
        return [KeyValue.of(kv) for kv in reply]

    async def put(self, key: Key, value: bytes, lease: int | None = None) -> None:
        raw = _bytes(key)
        put = self._store.client.put(raw, value, lease=lease or None)
        await self._store.call(put, raw, "write")

    async def delete(self, key: Key) -> bool:
        """Delete the key; True if it existed."""
        raw = _bytes(key)
        deleted = await self._store.call(self._store.client.delete(raw), raw, "delete")
        return deleted is not None

    async def transaction(
        self,
        compares: Sequence[KeyCompare | Compare],
        success: Sequence[Operation] = (),
        failure: Sequence[Operation] = (),
        *,
        key: Key | None = None,
        action: str = "write",
    ) -> tuple[bool, list[OpResult]]:
        """If every compare holds run `success`, else `failure`: (whether they held, the results
        of the operations run). `key` and `action` name the request in a PermissionDenied (by
        default the first operation's key)."""
        named = _bytes(key) if key is not None else next((op.key for op in success), None)
        ok, responses = await self._store.call(
            self._store.client.transaction(
                compare=etcd_compares(compares),
                success=[_etcd_operation(op) for op in success],
                failure=[_etcd_operation(op) for op in failure],
            ),
            named,
            action,
        )
        ran = success if ok else failure
        return bool(ok), [_result(op, r) for op, r in zip(ran, responses, strict=True)]
