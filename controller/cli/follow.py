"""What `drain --wait` and `migrate --wait` print while they wait: the Events about the objects
they follow, as they happen, and each change of a kind's objects (a migration's progress)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from controller.runtime.store import Compacted, Store
from crds import Event


async def follow_changes(
    store: Store, kind: str, revision: int, handle: Callable[[Any], None]
) -> None:
    """`handle(object)` for every object of `kind` written after `revision` (deletions are
    skipped), until cancelled; a compacted history is skipped over."""
    while True:
        try:
            async for change in store.watch(kind, revision + 1):
                revision = change.revision
                if change.type != "DELETED":
                    handle(change.object)
        except Compacted:
            _, revision = await store.list_objects(kind)


def event_line(event: Event) -> str:
    involved = event.spec.involved_object
    return f"{involved.kind.lower()}/{involved.name}: {event.spec.reason}: {event.spec.message}"


async def stream_events(
    store: Store, revision: int, names: Collection[str], saw: Callable[[Event], None]
) -> None:
    """Print each Event written after `revision` about an object named in `names`, then
    `saw(event)`, until cancelled."""

    def handle(event: Any) -> None:
        if isinstance(event, Event) and event.spec.involved_object.name in names:
            print(event_line(event), flush=True)
            saw(event)

    await follow_changes(store, "Event", revision, handle)
