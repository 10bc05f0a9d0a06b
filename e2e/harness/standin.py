"""The elected controller's part in agent tests: a real LeaderElector whose fencing token guards
the placements the test writes (as the HA controller writes them), the garbage collection, and
optionally the migration controller while it leads."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.garbage import collect_forever
from controller.migrations import Term, lead_migrations
from controller.runtime.events import EventRecorder
from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import guard_compare
from controller.runtime.store import Store
from crds import Event, VirtualMachine
from crds.meta import now
from crds.virtualmachine import Placement
from e2e.harness.polling import recorded_events

LEAD_DEADLINE = 30.0


class StandInController:
    """Leads under `identity`; `place` writes placements guarded by the term's token."""

    def __init__(self, store: Store, identity: str, migrations: bool = False) -> None:
        self.store = store
        self.elector = LeaderElector(store.client, store.prefix, "controller", identity)
        self.migrations = migrations
        self.token = 0
        self._leading: asyncio.Task[None] | None = None
        self._collecting: asyncio.Task[None] | None = None

    async def lead(self) -> None:
        """Win the election (within LEAD_DEADLINE) and start collecting garbage."""
        led = asyncio.Event()
        recorder = EventRecorder(self.store, "kvmctl-controller")

        async def leading(token: int) -> None:
            self.token = token
            led.set()
            if self.migrations:
                await lead_migrations(self.store, recorder, self.term)
            else:
                await asyncio.Event().wait()

        self._leading = asyncio.create_task(self.elector.run(leading))
        await asyncio.wait_for(led.wait(), LEAD_DEADLINE)
        self._collecting = asyncio.create_task(collect_forever(self.store))

    async def stop_leading(self) -> None:
        for task in (self._leading, self._collecting):
            if task is not None:
                task.cancel()
                await asyncio.wait({task})

    @property
    def term(self) -> Term:
        return Term.of(self.store, self.elector.key, self.token)

    async def place(self, vm: str, node: str | None, token: int | None = None) -> None:
        """Write the placement as the elected controller does: guarded by its token.

        `token` stamps another term's token on it (as a deposed leader's write left it).
        """
        stamp = self.token if token is None else token

        def mutate(obj: Any) -> bool:
            obj.status.placement = (
                None if node is None else Placement(node=node, token=stamp, since=now())
            )
            return True

        guard = [guard_compare(self.store.client, self.elector.key, self.token)]
        await self.store.patch_status("VirtualMachine", vm, mutate, guard=guard)

    async def vm(self, name: str) -> VirtualMachine:
        return await self.store.get(VirtualMachine, name)

    async def events(self, involved: str, reason: str) -> list[Event]:
        return await recorded_events(self.store, involved, reason)
