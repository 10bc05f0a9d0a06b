"""The store's watch: a kind's merged objects as events, resuming after lost connections."""

from __future__ import annotations

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
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from controller.runtime.etcd_transport import StoreError
from controller.runtime.layout import KindView
from controller.runtime.store_client import StoreClient
from controller.runtime.store_errors import Compacted, PermissionDenied, UndecodableObject
from crds import KINDS, AnyResource, describe_validation_error

log = logging.getLogger(__name__)

RECONNECT_MAX_DELAY = 5.0
"""The longest wait between two attempts to reach etcd again."""


class _StreamEnded(Exception):
    """A watch stream that ended without delivering anything: back off before the next."""


def _transient(error: BaseException) -> bool:
    """A lost or refused connection: worth another attempt (a refusal or a compaction is not)."""
    if isinstance(error, PermissionDenied | Compacted | aetcd.exceptions.RevisionCompactedError):
        return False
    return isinstance(error, StoreError | aetcd.exceptions.ClientError | _StreamEnded)


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

    def _reconnecting(self, kind: str, what: str, initial_delay: float) -> AsyncRetrying:
        """Retries of one watch request while etcd is unreachable: exponential backoff from
        `initial_delay` with full jitter (watchers of a restarted etcd do not return in step),
        never giving up; refusals and compactions are not retried."""

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.info("watch of %s: %s failed (%s); retrying", kind, what, error)

        return AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_random_exponential(multiplier=initial_delay, max=RECONNECT_MAX_DELAY),
            before_sleep=log_retry,
            reraise=True,
        )

    async def _view_at(self, kind: str, revision: int, reconnect_delay: float) -> KindView:
        """The kind as it was at `revision` (empty before the first); retries connection loss."""
        if revision < 1:
            return KindView(kind)
        what = f"reading revision {revision}"
        async for attempt in self._reconnecting(kind, what, reconnect_delay):
            with attempt:
                return self._view(kind, await self._range_at(self.kind_prefix(kind), revision))
        raise AssertionError("unreachable: the retries never stop")

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
            # One series of reconnection attempts: it ends (and the next starts afresh) when a
            # stream that delivered events is lost; a stream lost before any event backs off.
            async for attempt in self._reconnecting(kind, "resuming", reconnect_delay):
                with attempt:
                    resumed_at = next_revision
                    try:
                        stream = await self.client.watch_prefix(prefix, start_revision=resumed_at)
                        async for event in stream:
                            next_revision = event.kv.mod_revision + 1
                            for change in self._changes(kind, view, event):
                                yield change
                    except aetcd.exceptions.RevisionCompactedError as error:
                        raise Compacted(error.compacted_revision) from None
                    except aetcd.exceptions.ClientError as error:
                        if next_revision == resumed_at:
                            raise
                        log.info(
                            "watch of %s lost (%s); resuming at %d", kind, error, next_revision
                        )
                    if next_revision == resumed_at:
                        raise _StreamEnded(f"the watch from revision {resumed_at} ended")

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
