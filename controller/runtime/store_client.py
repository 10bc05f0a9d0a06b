"""The store's connection to etcd, its keys, and the decoding of stored values.

The base of `Store` (controller/runtime/store.py): the reads, writes and watch build on it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Self

import aetcd
import aetcd.exceptions
import pydantic

from controller.runtime.etcd_transport import (
    StoreError,
    TlsFiles,
    Unavailable,
    is_permission_denied,
    make_client,
    unavailable,
)
from controller.runtime.layout import KindView, Snapshot, Stored
from controller.runtime.store_errors import PermissionDenied, UndecodableObject
from crds import KINDS, AnyResource, describe_validation_error

from . import layout, layout_keys

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/kvmctl"
DEFAULT_TIMEOUT = 5.0
Compare = Any  # an aetcd transaction compare (aetcd has no type hints)
Range = tuple[bytes, bytes | None]  # a key, or [key, range_end)
_KIND_OF_MODEL = {info.model: kind for kind, info in KINDS.items()}


def kind_of(kind: str | type[AnyResource]) -> str:
    """The kind's name, given it or its model (`VirtualMachine` -> "VirtualMachine")."""
    if isinstance(kind, str):
        return kind
    try:
        return _KIND_OF_MODEL[kind]
    except KeyError:
        raise StoreError(f"{kind.__name__} is not a kind's model") from None


class StoreClient:
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
        self.tls = tls
        self.writer = layout.check_writer(writer)
        self.client = make_client(self.endpoints, timeout, tls)
        self.user = tls.user() if tls else None
        """The etcd user of this client (its certificate's CN), for error messages."""

    def as_writer(self, writer: str) -> Self:
        """This store (same connection) writing as `writer`."""
        view = copy.copy(self)
        view.writer = layout.check_writer(writer)
        return view

    async def __aenter__(self) -> Self:
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

    async def connect_when_reachable(self, retry: float = 2.0) -> None:
        """`connect()`, waiting while etcd is unreachable (each try's reason is logged).

        For the daemons: a host that boots, or is powered on again, may start its agent and
        controller before its etcd member has joined or before etcd has quorum; they wait for
        etcd instead of exiting. Any other error (permission, layout) still fails at once.
        """
        while True:
            try:
                await self.connect()
                return
            except Unavailable as error:
                log.warning("%s; trying again in %.0f s", error, retry)
            await asyncio.sleep(retry)

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
        probe = self.raw_key(layout_keys.REVISION_PROBE)
        reply = await self.call(self.client.get_prefix(probe), probe, "read")
        revision: int = reply.header.revision
        return revision

    async def etcd_version(self) -> str:
        """The version of the etcd member that answers."""
        status = await self.call(self.client.status())
        return str(status.version)

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


def to_json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
