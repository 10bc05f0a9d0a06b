"""Recording Events: what happened to an object, aggregated when it repeats, expiring by lease.

An Event is named `<involved-name>-<hash>`, the hash covering the involved kind and name, the
reason, the type, the message *template* (before `%` arguments are filled in) and, for a
node's events, the writer. Recording the
same thing again therefore lands on the same key: count + 1, lastTimestamp and message updated
with compare-and-swap. Object names are DNS-1123 labels (no dots), hence `-` as the separator,
and the involved name is shortened so the whole name fits in 63 characters.

Every write attaches an etcd lease, so an Event disappears about `ttl` seconds after it was last
recorded. One lease serves every event recorded during a window of `ttl / 10` seconds; it is
granted with `ttl` plus that window, so each event lives at least `ttl` after its last record.

Recording never raises into the caller (a reconcile must not fail because its event could not
be written): store errors are logged and swallowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from typing import Literal

from controller.runtime.layout import CONTROLLER
from controller.runtime.store import AlreadyExists, Conflict, NotFound, Store, StoreError
from crds import AnyResource, Event, ObjectMeta
from crds.event import EventSource, EventSpec, ObjectReference
from crds.meta import now

log = logging.getLogger(__name__)

EventType = Literal["Normal", "Warning"]
DEFAULT_TTL = 3600
MAX_NAME = 63
HASH_LENGTH = 10
MAX_MESSAGE = 4096
WRITE_ATTEMPTS = 10
_CAMEL_CASE = re.compile(r"[A-Z][A-Za-z0-9]*")


class EventRecorder:
    """Writes Events for `component` (running on `node`, if any); see the module docstring."""

    def __init__(
        self,
        store: Store,
        component: str,
        node: str | None = None,
        ttl: int = DEFAULT_TTL,
    ) -> None:
        if ttl < 2:
            raise ValueError(f"event ttl must be at least 2 s (etcd's minimum lease), got {ttl}")
        self.store = store
        self.source = EventSource(component=component, node=node)
        self.ttl = ttl
        self.lease_window = max(1.0, ttl / 10)
        self._lease_id: int | None = None
        self._lease_until = 0.0
        self._lease_lock = asyncio.Lock()

    async def record(
        self,
        involved: AnyResource | ObjectReference,
        type: EventType,
        reason: str,
        message: str,
        *args: object,
    ) -> None:
        """Record that `reason` happened to `involved`; `message % args` if args are given.

        Events with the same involved object, type, reason and message template aggregate.
        """
        if not _CAMEL_CASE.fullmatch(reason):
            raise ValueError(f"event reason must be one CamelCase word, got {reason!r}")
        if type not in ("Normal", "Warning"):
            raise ValueError(f"event type must be Normal or Warning, got {type!r}")
        reference = _reference(involved)
        text = (message % args if args else message)[:MAX_MESSAGE]
        name = event_name(reference, type, reason, message, self.store.writer)
        try:
            await self._write(name, reference, type, reason, text)
        except (StoreError, OSError) as error:
            log.warning(
                "could not record event %s on %s %s: %s",
                reason,
                reference.kind,
                reference.name,
                error,
            )

    async def _write(
        self, name: str, reference: ObjectReference, type: EventType, reason: str, text: str
    ) -> None:
        for _ in range(WRITE_ATTEMPTS):
            lease = await self._lease()
            try:
                existing = await self.store.try_get("Event", name)
                if existing is None:
                    event = Event(
                        metadata=ObjectMeta(name=name),
                        spec=EventSpec(
                            involved_object=reference,
                            reason=reason,
                            type=type,
                            message=text,
                            source=self.source,
                        ),
                    )
                    await self.store.create(event, lease=lease)
                else:
                    existing.spec.count += 1
                    existing.spec.last_timestamp = now()
                    existing.spec.message = text
                    existing.spec.source = self.source
                    await self.store.update(existing, lease=lease)
                return
            except (AlreadyExists, Conflict, NotFound):
                continue  # raced with another recorder or an expiry: read again
            except StoreError as error:
                if "lease" not in str(error):
                    raise
                log.info("event lease %x is gone (%s); granting another", lease, error)
                self._lease_id = None
        raise Conflict(f"event {name} kept conflicting")

    async def _lease(self) -> int:
        """The lease events are attached to now, granted anew every `lease_window` seconds."""
        async with self._lease_lock:
            loop = asyncio.get_running_loop()
            if self._lease_id is None or loop.time() >= self._lease_until:
                lease = await self.store.call(
                    self.store.client.lease(self.ttl + int(self.lease_window))
                )
                self._lease_id = int(lease.id)
                self._lease_until = loop.time() + self.lease_window
            return self._lease_id


def _reference(involved: AnyResource | ObjectReference) -> ObjectReference:
    if isinstance(involved, ObjectReference):
        return involved
    return ObjectReference(
        kind=involved.kind, name=involved.metadata.name, uid=involved.metadata.uid
    )


def event_name(
    reference: ObjectReference,
    type: EventType,
    reason: str,
    template: str,
    writer: str = CONTROLLER,
) -> str:
    """The Event's name: the involved name (shortened) and a hash of what makes it the same.

    A node's events hash its writer identity too: each writer keeps its Events in its own
    subtree (controller/runtime/layout.py), and names must not collide across them.
    """
    fields = (reference.kind, reference.name, reason, type, template)
    identity = "\x00".join(fields if writer == CONTROLLER else (writer, *fields))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:HASH_LENGTH]
    prefix = reference.name[: MAX_NAME - HASH_LENGTH - 1].rstrip("-")
    return f"{prefix}-{digest}"
