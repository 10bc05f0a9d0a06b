"""`kvmctl controller`: the HA loop and the migration controller, leader-only, in one Manager.

`HaController.run(token, guard)` is one term of the HA loop: the pure engine
(`controller/ha/engine.py`) over an `EtcdEnvironment`. The engine starts each term with no
memory (fencing starts again from method 1; a lease missing at the start counts as lost since
then), which docs/ha.md shows is safe. If a guarded write reveals that the term is over, the
loop stops at once and waits for the elector, which notices within its renew period, to cancel
the term.

`build_manager` puts it together with the VirtualMachineMigration controller
(`controller/migrations.py`), the fence-device checker (`controller/fencing.py`) and
guest-cluster fencing (`controller/ha/guest_fence.py`), all leader-only tasks of a `Manager`
sharing its caches.
"""

from __future__ import annotations

import asyncio
import logging

from controller.events import EventRecorder
from controller.fencing import FenceChecker
from controller.garbage import garbage_collectors
from controller.informer import SharedInformers
from controller.leader import ElectionTiming
from controller.manager import LeaderTask, Manager
from controller.migrations import Term, lead_migrations
from controller.store import Compare, Store
from reconcilers.drivers.fence import FenceRunner

from .engine import DEFAULT_PERIOD, Engine, run
from .environment import HaTimings
from .guest_fence import GuestFenceController
from .production import KINDS, EtcdEnvironment

log = logging.getLogger(__name__)

COMPONENT = "kvmctl-controller"


class HaController:
    """The leader-only HA loop over the manager's caches; see the module docstring."""

    def __init__(
        self,
        store: Store,
        informers: SharedInformers,
        timings: HaTimings | None = None,
        recorder: EventRecorder | None = None,
        fence_runner: FenceRunner | None = None,
        period: float = DEFAULT_PERIOD,
    ) -> None:
        self.store = store
        self.informers = informers
        self.timings = timings or HaTimings()
        self.recorder = recorder or EventRecorder(store, COMPONENT)
        self.fence_runner = fence_runner or FenceRunner()
        self.period = period
        self._changed = asyncio.Event()
        for kind in KINDS:
            informers.informer(kind).add_handler(lambda _type, _obj: self._changed.set())

    def leader_task(self) -> LeaderTask:
        return LeaderTask("ha", self.run)

    async def run(self, token: int, guard: list[Compare]) -> None:
        """One term of the HA loop, until cancelled."""
        await self.informers.wait_for_sync()
        environment = EtcdEnvironment(
            self.store,
            self.informers,
            self.recorder,
            Term(token, guard),
            self._changed,
            self.timings,
            self.fence_runner,
        )
        log.info("HA loop starts with token %d", token)
        async with environment:
            await run(Engine(self.timings), environment, self.period)
        log.error("HA loop of token %d stopped: deposed; waiting for the term to end", token)
        await asyncio.Event().wait()  # the elector cancels this term within its renew period


def build_manager(
    store: Store,
    *,
    identity: str | None = None,
    timings: HaTimings | None = None,
    election_timing: ElectionTiming | None = None,
    http_host: str = "127.0.0.1",
    http_port: int | None = None,
    fence_runner: FenceRunner | None = None,
) -> Manager:
    """A Manager running the HA loop, the migration controller and the fence-device checker
    while it leads; `fence_runner` (default: the default allow-list) runs every fence agent."""
    informers = SharedInformers(store)
    recorder = EventRecorder(store, COMPONENT)
    ha = HaController(store, informers, timings, recorder, fence_runner)
    checker = FenceChecker(store, informers, ha.fence_runner, recorder)
    guest_fencing = GuestFenceController(store, informers)

    async def migrations(token: int, guard: list[Compare]) -> None:
        await lead_migrations(store, recorder, Term(token, guard))

    return Manager(
        store,
        garbage_collectors(store, informers),
        identity=identity,
        election_timing=election_timing,
        http_host=http_host,
        http_port=http_port,
        component=COMPONENT,
        informers=informers,
        leader_tasks=[
            ha.leader_task(),
            LeaderTask("migrations", migrations),
            LeaderTask("fence-check", checker.run),
            guest_fencing.leader_task(),
        ],
    )
