"""Garbage collection: delete objects whose deletion waited on finalizers, once none is left.

An agent holds its finalizer in its own status part (controller/runtime/layout.py) and may not
delete the object's keys; after it drops its last finalizer, the controller deletes every key of the
object in one compare-and-swap transaction. Any running controller may do it: a racing one gets a
conflict, and re-reading finds the object gone.
"""

from __future__ import annotations

from controller.runtime.controller import Controller
from controller.runtime.informer import Informer, SharedInformers
from controller.runtime.layout import NODE_FINALIZERS
from controller.runtime.manager import Manager
from controller.runtime.reconcile import Result, RetryableError
from controller.runtime.store import Conflict, Store, StoreError

FINALIZED_KINDS = tuple(NODE_FINALIZERS)
"""The kinds agents put finalizers on."""


class GarbageCollector:
    """Reconciles one kind: deletes its objects that are being deleted with no finalizer left."""

    def __init__(self, store: Store, informer: Informer) -> None:
        self.store = store
        self.informer = informer

    async def reconcile(self, key: str) -> Result:
        cached = self.informer.get(key)
        if cached is None or cached.metadata.deletion_timestamp is None:
            return Result()
        if cached.metadata.finalizers:
            return Result()
        try:
            await self.store.collect_garbage(self.informer.kind, key)
        except Conflict:
            raise RetryableError(f"{self.informer.kind} {key!r} changed; looking again") from None
        except StoreError as error:
            raise RetryableError(f"garbage collection of {key!r}: {error}") from None
        return Result()


def garbage_collectors(store: Store, informers: SharedInformers) -> list[Controller]:
    """One garbage-collecting controller per finalized kind (they run on every controller)."""
    return [
        Controller(
            f"garbage-{kind.lower()}",
            kind,
            GarbageCollector(store, informers.informer(kind)),
        )
        for kind in FINALIZED_KINDS
    ]


async def collect_forever(store: Store) -> None:
    """Run the garbage collectors on their own until cancelled (`store` stays open).

    For a stand-in of the controller (the agent test harnesses) that must still delete what
    agents finalized.
    """
    informers = SharedInformers(store)
    collectors = garbage_collectors(store, informers)
    manager = Manager(store, collectors, informers=informers, http_port=None, close_store=False)
    await manager.run(handle_signals=False)
