"""`kvmctl controller`: the HA loop, the migration controller and the rest in one Manager.

`HaController.run(token, guard)` is one term of the HA loop: the pure engine
(`controller/ha/engine.py`) over an `EtcdEnvironment`. The engine starts each term with no
memory of its own (fencing starts again from method 1), which docs/ha.md shows is safe; the
heartbeats, requests and reports it reads are the controller's `WorldKeys`, watched on every
controller so a standby's term starts with them warm (`controller/ha/world_keys.py`). If a
guarded write reveals that the term is over, the loop stops at once and waits for the elector,
which notices within its renew period, to cancel the term.

`build_manager` puts it together on one `Manager` sharing its caches: the HA loop and
guest-cluster fencing (`controller/ha/guest_fence.py`) as leader tasks (each a whole-cluster loop
over a term, not a per-object reconcile), the VirtualMachineMigration controller
(`controller/migrations.py`) and the fence-device checker (`controller/fencing.py`) as
leader-only Controllers, and the garbage collectors (`controller/garbage.py`) as Controllers
running on every controller process.
Given the ClusterNode it runs on (`node`) and `peers` settings, it also
listens to the direct heartbeats and sends its own (`controller/runtime/peers.py`), and runs the
standby watch (`controller/ha/takeover.py`) that takes over from a leader whose host went silent; a
term won that way first records the standby's power fence, so the engine recovers at once.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractContextManager

from controller.fencing import FenceChecker
from controller.garbage import garbage_collectors
from controller.migrations import Term, migration_controller
from controller.runtime import telemetry
from controller.runtime.events import EventRecorder
from controller.runtime.heartbeat import boot_id
from controller.runtime.informer import SharedInformers
from controller.runtime.leader_record import ElectionTiming
from controller.runtime.manager import Background, LeaderTask, Manager
from controller.runtime.peers import PeerSender, PeerSettings, PeerTable, listen
from controller.runtime.store import Compare, Store
from crds import ClusterNode
from reconcilers.drivers.fence import FenceRunner

from .engine import Engine
from .engine_loop import DEFAULT_PERIOD, run
from .environment import Emit, HaTimings, break_gap
from .guest_fence import GuestFenceController
from .production import EtcdEnvironment
from .production_core import KINDS
from .state_metrics import etcd_member_metrics, state_metrics
from .takeover import StandbyWatch
from .world_keys import WorldKeys

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
        peers: PeerTable | None = None,
    ) -> None:
        self.store = store
        self.informers = informers
        self.timings = timings or HaTimings()
        self.recorder = recorder or EventRecorder(store, COMPONENT)
        self.fence_runner = fence_runner or FenceRunner()
        self.period = period
        self.peers = peers
        self.standby: StandbyWatch | None = None
        """Set by `build_manager` when this controller knows its node and hears peers."""
        self.token: int | None = None
        """The term this controller leads (None while standby)."""
        self._changed = asyncio.Event()
        self.keys = WorldKeys(store, self._changed)
        """Heartbeats, requests and reports, warm on a standby too (`background`)."""
        for kind in KINDS:
            informers.informer(kind).add_handler(lambda _type, _obj: self._changed.set())

    def token_now(self) -> int | None:
        return self.token

    def leader_task(self) -> LeaderTask:
        return LeaderTask("ha", self.run)

    def background(self) -> Background:
        """The watches of `keys`, run whether this controller leads or not."""
        return Background("HA keys", self.keys.run)

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
            self.peers,
            self.keys if self.keys.running else None,
        )
        log.info("HA loop starts with token %d", token)
        self.token = token
        try:
            async with environment:
                await self._record_takeover(environment)
                await run(Engine(self.timings), environment, self.period, _traced_step)
        finally:
            self.token = None
        log.error("HA loop of token %d stopped: deposed; waiting for the term to end", token)
        await asyncio.Event().wait()  # the elector cancels this term within its renew period

    async def _record_takeover(self, environment: EtcdEnvironment) -> None:
        """A term won by the standby watch records its confirmed power fence first."""
        standby = self.standby
        if standby is None:
            return
        done = standby.take_pending(standby.elector.took_over)
        if done is None:
            return
        if done.session_revision is None:
            log.warning("the fence of %s is not recorded: the engine fences it again", done.node)
            return
        recorded = await environment.record_takeover_fence(
            done.node, done.method, done.confirmed_at, done.session_revision
        )
        if recorded:
            message = (
                f"method {done.method} confirmed power off (by the standby that took over from "
                f"term {done.replaced})"
            )
            await environment.apply(Emit("ClusterNode", done.node, "NodeFenced", message))


def build_manager(
    store: Store,
    *,
    identity: str | None = None,
    timings: HaTimings | None = None,
    election_timing: ElectionTiming | None = None,
    http_host: str = "127.0.0.1",
    http_port: int | None = None,
    fence_runner: FenceRunner | None = None,
    node: str | None = None,
    peers: PeerSettings | None = None,
    peer_table: PeerTable | None = None,
) -> Manager:
    """A Manager running the HA loop, the migration controller, the fence-device checker and
    guest-cluster fencing while it leads; `fence_runner` (default: the default allow-list) runs
    every fence agent. With `node` and `peers`, also the direct heartbeats (heard into
    `peer_table`, if given) and the standby watch."""
    informers = SharedInformers(store)
    recorder = EventRecorder(store, COMPONENT)
    nodes = informers.informer("ClusterNode")

    def address_of(name: str) -> str | None:
        obj = nodes.get(name)
        return str(obj.spec.addresses.cluster) if isinstance(obj, ClusterNode) else None

    gap = break_gap((timings or HaTimings()).suspect_after)
    table = peer_table or (PeerTable(address_of, gap) if peers is not None else None)
    ha = HaController(store, informers, timings, recorder, fence_runner, peers=table)
    guest_fencing = GuestFenceController(store, informers)

    background = [state_metrics(informers), etcd_member_metrics(store), ha.background()]
    if peers is not None and table is not None and node is not None:

        async def direct_heartbeats() -> None:
            address = await _own_address(informers, node)
            transport = await listen(table, address, peers)
            targets = lambda: [address_of(n.metadata.name) or "" for n in nodes.list()]  # noqa: E731
            sender = PeerSender(
                node, "controller", boot_id(), address, targets, peers, ha.token_now
            )
            try:
                await sender.run()
            finally:
                transport.close()

        background.append(Background("direct heartbeats", direct_heartbeats))
        background.append(Background("standby watch", lambda: _watch(ha)))
    manager = Manager(
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
            guest_fencing.leader_task(),
        ],
        background=background,
        node=node,
    )
    manager.add(migration_controller(store, informers, recorder, manager.term))
    manager.add(
        FenceChecker(store, informers, ha.fence_runner, recorder, manager.term).controller()
    )
    if node is not None and table is not None and manager.elector is not None:
        ha.standby = StandbyWatch(
            store, informers, manager.elector, table, node, ha.timings, ha.fence_runner
        )
    return manager


def _traced_step() -> AbstractContextManager[object]:
    """Each engine step is one reconcile of the cluster in the manager's spans and durations."""
    return telemetry.reconcile_span("Cluster", "cluster", "ha")


async def _watch(ha: HaController) -> None:
    assert ha.standby is not None, "build_manager creates the standby watch with the manager"
    await ha.standby.run()


async def _own_address(informers: SharedInformers, node: str) -> str:
    """This controller's node's cluster address, once its ClusterNode exists."""
    nodes = informers.informer("ClusterNode")
    while True:
        obj = nodes.get(node)
        if isinstance(obj, ClusterNode):
            return str(obj.spec.addresses.cluster)
        log.warning("waiting for ClusterNode %s to send and hear direct heartbeats", node)
        await asyncio.sleep(1.0)
