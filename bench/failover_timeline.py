"""What the failover bench sees through etcd watches, time-stamped on arrival (monotonic).

Steps: the agent's heartbeat key deleted ("lease expired"), the controllers' leader key taken by
another controller ("leader", marked with the new leader's identity), every ClusterNode health
change (Unknown, Fencing, Fenced...), every Event reason (FencingStarted...), and the VM's
placement ("placed"). Every watch resumes after a lost connection (etcd's member on a killed
host), from the revision after the last event seen, so no step is missed; a step is then seen
late by at most the client's failover to another member.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aetcd

from controller.runtime import layout_keys
from controller.runtime.store import Store
from crds import ClusterNode, Event, VirtualMachine
from e2e.harness.chaos import ELECTION_NAME

log = logging.getLogger(__name__)
RESUME_DELAY = 0.05


@dataclass
class Timeline:
    marks: list[tuple[float, str, str]] = field(default_factory=list)
    """(time, step, node)"""

    def first(self, step: str, node: str, since: float) -> float | None:
        for at, name, where in self.marks:
            if at >= since and name == step and where == node:
                return at
        return None

    def first_other(self, step: str, node: str, since: float) -> float | None:
        """The first `step` at or after `since` marked on a node other than `node`."""
        for at, name, where in self.marks:
            if at >= since and name == step and where != node:
                return at
        return None

    def mark(self, step: str, node: str) -> None:
        self.marks.append((time.monotonic(), step, node))

    async def follow(self, store: Store) -> None:
        revision = await store.revision() + 1
        async with asyncio.TaskGroup() as group:
            heartbeats = layout_keys.absolute(store.prefix, layout_keys.HEARTBEATS)
            group.create_task(_raw_watch(store, heartbeats, revision, self._heartbeat))
            leader = layout_keys.absolute(store.prefix, layout_keys.leader(ELECTION_NAME))
            group.create_task(_raw_watch(store, leader, revision, self._leader()))
            group.create_task(self._nodes(store, revision))
            group.create_task(self._vms(store, revision))
            group.create_task(self._events(store, revision))

    def _heartbeat(self, event: aetcd.rtypes.Event) -> None:
        if event.kind == aetcd.rtypes.EventKind.DELETE:
            self.mark("lease expired", event.kv.key.decode().rsplit("/", 1)[-1])

    def _leader(self) -> Callable[[aetcd.rtypes.Event], None]:
        current: list[str] = []

        def seen(event: aetcd.rtypes.Event) -> None:
            if event.kind == aetcd.rtypes.EventKind.DELETE:
                return
            with contextlib.suppress(ValueError, KeyError, TypeError):
                identity = str(json.loads(event.kv.value)["identity"])
                if current[-1:] != [identity]:
                    current.append(identity)
                    self.mark("leader", identity)

        return seen

    async def _nodes(self, store: Store, revision: int) -> None:
        health: dict[str, str] = {}
        async for change in store.watch("ClusterNode", revision, RESUME_DELAY):
            node = change.object
            if isinstance(node, ClusterNode) and health.get(node.metadata.name) != (
                node.status.health
            ):
                health[node.metadata.name] = node.status.health
                self.mark(node.status.health, node.metadata.name)

    async def _vms(self, store: Store, revision: int) -> None:
        placed: str | None = None
        async for change in store.watch("VirtualMachine", revision, RESUME_DELAY):
            vm = change.object
            if not isinstance(vm, VirtualMachine) or vm.status.placement is None:
                continue
            if vm.status.placement.node != placed:
                placed = vm.status.placement.node
                self.mark("placed", placed)

    async def _events(self, store: Store, revision: int) -> None:
        async for change in store.watch("Event", revision, RESUME_DELAY):
            event = change.object
            if isinstance(event, Event) and change.type != "DELETED":
                self.mark(event.spec.reason, event.spec.involved_object.name)


async def _raw_watch(
    store: Store, prefix: str, revision: int, seen: Callable[[aetcd.rtypes.Event], None]
) -> None:
    """Watch the keys under `prefix` from `revision`, resuming after lost connections."""
    while True:
        try:
            stream = await store.client.watch_prefix(prefix.encode(), start_revision=revision)
            async for event in stream:
                revision = event.kv.mod_revision + 1
                seen(event)
        except aetcd.exceptions.ClientError as error:
            log.info("watch of %s lost (%s); resuming at %d", prefix, error, revision)
        await asyncio.sleep(RESUME_DELAY)
