"""Many objects' status written in few transactions (the HA leader's placements of one step).

`patch_status_many(kind, mutations, guard)` is `patch_status` for many objects at once: it
reads them (concurrently), lets each object's mutation change its status, and writes this
writer's parts in chunks that fit etcd's limit on a transaction (`--max-txn-ops`, 128 by
default, for the compares and for the operations alike). Each object is compared, as in
`update_status`, on every key it was merged from; each chunk also on `guard`.

A chunk refused reads back, in the same transaction, the keys it compared. The objects whose
keys moved are patched again one by one (`patch_status`: read again, mutate again); the others
are written again together. When no key moved, the guard is what failed: every object of the
chunk fails with `Conflict`. One object's conflict never costs the others their write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.runtime.etcd_transport import StoreError
from controller.runtime.layout import Snapshot, Stored
from controller.runtime.store_client import Compare, to_json
from controller.runtime.store_errors import Conflict, NotFound
from controller.runtime.store_keys import etcd_compares
from controller.runtime.store_writes import StoreWrites
from crds import AnyResource

from . import layout

MAX_TXN_OPS = 128
"""etcd's default `--max-txn-ops`: at most this many compares, and operations, per transaction."""
READ_CONCURRENCY = 64
"""Objects read at once before a batch write."""
BATCH_ATTEMPTS = 10

Mutation = Callable[[Any], bool | None]


@dataclass
class BatchResult:
    """Per object name: the object as written (or as read, when its mutation changed nothing),
    or the error that kept it from being written (NotFound, Conflict, StoreError)."""

    written: dict[str, AnyResource] = field(default_factory=dict)
    failed: dict[str, StoreError] = field(default_factory=dict)


@dataclass
class _Write:
    name: str
    snapshot: Snapshot
    compared: list[tuple[bytes, int]]
    key: bytes
    document: layout.Document


@dataclass
class PreparedBatch:
    """Objects read and mutated by `prepare_status_many`, to be written by `write_prepared`."""

    kind: str
    mutations: Mapping[str, Mutation]
    writes: list[_Write]
    result: BatchResult


class StoreBatch(StoreWrites):
    async def patch_status_many(
        self,
        kind: str,
        mutations: Mapping[str, Mutation],
        guard: Sequence[Compare] = (),
        max_ops: int = MAX_TXN_OPS,
    ) -> BatchResult:
        """Read each object, let its mutation change its status in place, write them all in as
        few guarded transactions as fit `max_ops`; see the module docstring.

        A mutation returns False to skip its object's write (nothing to change).
        """
        prepared = await self.prepare_status_many(kind, mutations)
        return await self.write_prepared(prepared, guard, max_ops)

    async def prepare_status_many(
        self, kind: str, mutations: Mapping[str, Mutation]
    ) -> PreparedBatch:
        """The first half of `patch_status_many`: read every object (concurrently) and mutate
        it; objects not found, or whose mutation changed nothing, are in the result already."""
        result = BatchResult()
        limit = asyncio.Semaphore(READ_CONCURRENCY)

        async def read(name: str) -> Snapshot | None:
            async with limit:
                try:
                    snapshot = await self._snapshot(kind, name)
                except StoreError as error:
                    result.failed[name] = error
                    return None
            if snapshot is None:
                result.failed[name] = NotFound(f"{kind} {name!r} not found")
            return snapshot

        names = list(mutations)
        snapshots = await asyncio.gather(*(read(name) for name in names))
        writes: list[_Write] = []
        for name, snapshot in zip(names, snapshots, strict=True):
            if snapshot is None:
                continue
            current = self._object(snapshot)
            if mutations[name](current) is False:
                result.written[name] = current
                continue
            status = current.status.model_dump(mode="json", by_alias=True, exclude_none=True)
            key, document = self._part(snapshot, status)
            writes.append(_Write(name, snapshot, self._compared(snapshot), key, document))
        return PreparedBatch(kind, mutations, writes, result)

    async def write_prepared(
        self, prepared: PreparedBatch, guard: Sequence[Compare] = (), max_ops: int = MAX_TXN_OPS
    ) -> BatchResult:
        """The second half of `patch_status_many`: the chunked, guarded writes."""
        kind, result = prepared.kind, prepared.result
        room = max_ops - len(guard)
        writes = []
        for write in prepared.writes:
            if len(write.compared) > room:
                result.failed[write.name] = StoreError(
                    f"{kind} {write.name!r} compares more keys than a transaction takes"
                )
            else:
                writes.append(write)
        await asyncio.gather(
            *(
                self._commit_chunk(kind, chunk, prepared.mutations, guard, result)
                for chunk in _chunks(writes, room)
            )
        )
        return result

    async def _commit_chunk(
        self,
        kind: str,
        chunk: list[_Write],
        mutations: Mapping[str, Mutation],
        guard: Sequence[Compare],
        result: BatchResult,
    ) -> None:
        """Write `chunk` in one transaction; on a refusal, split as the module docstring says."""
        txn = self.client.transactions
        for _ in range(BATCH_ATTEMPTS):
            if not chunk:
                return
            compared = [pair for write in chunk for pair in write.compared]
            try:
                ok, responses = await self.call(
                    self.client.transaction(
                        compare=[
                            *etcd_compares(guard),
                            *(txn.mod(key) == rev for key, rev in compared),
                        ],
                        success=[txn.put(write.key, to_json(write.document)) for write in chunk],
                        failure=[txn.get(key) for key, _ in compared],
                    ),
                    chunk[0].key,
                    "write",
                )
            except StoreError as error:
                result.failed.update((write.name, error) for write in chunk)
                return
            if ok:
                response = responses[0]
                revision = getattr(response, response.WhichOneof("response")).header.revision
                for write in chunk:
                    write.snapshot.parts[self.writer] = Stored(write.document, revision)
                    result.written[write.name] = self._object(write.snapshot)
                return
            now = {key: 0 for key, _ in compared}
            for response in responses:
                for _, kv in response:
                    now[kv.key] = kv.mod_revision
            moved = [w for w in chunk if any(now[key] != rev for key, rev in w.compared)]
            if not moved:
                for write in chunk:
                    result.failed[write.name] = Conflict(
                        f"status write of {kind} {write.name!r} refused: guard failed"
                    )
                return
            await asyncio.gather(
                *(self._patch_one(kind, w.name, mutations[w.name], guard, result) for w in moved)
            )
            retried = {write.name for write in moved}
            chunk = [write for write in chunk if write.name not in retried]
        for write in chunk:
            result.failed[write.name] = Conflict(f"{kind} {write.name!r}: batch kept conflicting")

    async def _patch_one(
        self,
        kind: str,
        name: str,
        mutate: Mutation,
        guard: Sequence[Compare],
        result: BatchResult,
    ) -> None:
        try:
            result.written[name] = await self.patch_status(kind, name, mutate, guard)
        except StoreError as error:
            result.failed[name] = error


def _chunks(writes: list[_Write], room: int) -> list[list[_Write]]:
    """`writes` in order, grouped so that no group compares more than `room` keys (each
    write compares at most `room`)."""
    chunks: list[list[_Write]] = []
    used = room
    for write in writes:
        size = len(write.compared)
        if used + size > room:
            chunks.append([])
            used = 0
        chunks[-1].append(write)
        used += size
    return chunks
