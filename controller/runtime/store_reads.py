"""The store's reads: one object's keys read consistently and merged, or a whole kind."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar, overload

import aetcd.utils

from controller.runtime.layout import Snapshot
from controller.runtime.store_client import Compare, Range, StoreClient, kind_of
from controller.runtime.store_errors import Conflict, NotFound, UndecodableObject
from crds import AnyResource

from . import layout

log = logging.getLogger(__name__)

R = TypeVar("R", bound=AnyResource)


class StoreReads(StoreClient):
    async def _read(
        self, ranges: Sequence[Range], compares: Sequence[Compare] = ()
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
        first: list[Range] = [(spec_key, None), *((key, None) for key in also)]
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

    def _more_parts(self, snapshot: Snapshot, read: Sequence[str]) -> list[Range]:
        """What else to read: the relevant nodes' parts (every part of the kind for None)."""
        kind, name = snapshot.kind, snapshot.name
        if not layout.has_parts(kind):
            return []
        nodes = snapshot.relevant()
        if nodes is None:
            start = self.raw_key(layout.parts_range(kind))
            return [(start, aetcd.utils.prefix_range_end(start))]
        ranges: list[Range] = []
        for node in sorted(nodes):
            try:
                writer = layout.node_writer(node)
            except ValueError:
                continue  # not a node name: no part can be there
            if writer not in read:
                ranges.append((self.part_key(kind, name, writer), None))
        return ranges

    @overload
    async def get(self, kind: type[R], name: str) -> R: ...
    @overload
    async def get(self, kind: str, name: str) -> AnyResource: ...
    async def get(self, kind: str | type[AnyResource], name: str) -> AnyResource:
        """The object (`get(VirtualMachine, name)` is typed a VirtualMachine), or NotFound."""
        kind = kind_of(kind)
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

    @overload
    async def try_get(self, kind: type[R], name: str) -> R | None: ...
    @overload
    async def try_get(self, kind: str, name: str) -> AnyResource | None: ...
    async def try_get(self, kind: str | type[AnyResource], name: str) -> AnyResource | None:
        try:
            return await self.get(kind_of(kind), name)
        except NotFound:
            return None

    @overload
    async def list_objects(self, kind: type[R]) -> tuple[list[R], int]: ...
    @overload
    async def list_objects(self, kind: str) -> tuple[list[AnyResource], int]: ...
    async def list_objects(self, kind: str | type[AnyResource]) -> tuple[list[Any], int]:
        """Every object of a kind, sorted by name, and the revision the list was read at."""
        kind = kind_of(kind)
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
