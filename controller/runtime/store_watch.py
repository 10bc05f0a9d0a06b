"""The store's watch: a kind's merged objects as events, resuming after lost connections."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import aetcd
import aetcd.exceptions
import aetcd.rtypes
import aetcd.utils
import grpc
import pydantic

from controller.runtime.etcd_transport import StoreError
from controller.runtime.layout import KindView
from controller.runtime.store_client import StoreClient
from controller.runtime.store_errors import Compacted, PermissionDenied, UndecodableObject
from crds import KINDS, AnyResource, describe_validation_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: AnyResource
    revision: int


class StoreWatch(StoreClient):
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
