"""The standby's watch: take over from a leader whose host went silent, without its key's TTL.

A controller that does not lead watches the leader record (`LeaderInfo.node`: the host the
leader runs on) and the direct heartbeats (`controller/runtime/peers.py`). When that host has been
silent for `suspect_after` (neither its agent nor the leading controller heard, while this
controller hears a majority of the nodes as witnesses, `silent_nodes`) and its policy is power
fencing, the standby:

1. has etcd's quorum confirm that the silent term still leads (a linearizable read of the leader
   record, tried while etcd elects): a standby cut off from the majority fences nothing;
2. notes the mod_revision of the host's agent-session trace (`sessions/<node>`, rewritten by
   every new agent session; 0: none), read serializably so etcd's own election cannot stall it;
3. runs the host's fence methods in order, as the engine would (`fencing.run_method`);
4. once one confirmed power off, ends the silent leader's term with
   `LeaderElector.take_over(T)` (compare on T: among racing standbys exactly one wins; the
   others' fencing was harmless, off is idempotent);
5. keeps a `Takeover` that the new term records first (`HaController.run`), guarded by the new
   token and by the session trace's mod_revision from step 2, so the engine recovers the
   host's VMs at once instead of fencing again. If an agent session started on the host since
   step 2 (it was powered on again), nothing is recorded and the engine decides as usual; the
   heartbeat key expiring meanwhile (the host is off) does not matter.

A host without power fencing (self-fencing or manual) is not fenced: the standby ends the silent
term at once (`take_over(T)`) and records nothing, so the engine of the new term waits for that
host's own confirmation (its lease's server-side expiry plus grace, or an operator's ack) as any
leader would. Each term is tried once: if every power method fails, the standby waits for the key
to expire like everybody else.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from controller.fencing import run_method
from controller.runtime import layout_keys
from controller.runtime.informer import SharedInformers
from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import ELECTION_ERRORS, LeaderInfo, LeaderRecordError
from controller.runtime.peers import PeerTable
from controller.runtime.store import Store, StoreError
from crds import ClusterNode
from reconcilers.drivers.fence import FenceRunner
from reconcilers.drivers.fence_policy import FenceConfigError

from .environment import HaTimings, Heard, power_fenced, silent_nodes

log = logging.getLogger(__name__)

CHECK_PERIOD = 0.1
LEADER_REFRESH = 0.5
ETCD_READ_TIMEOUT = 1.0
QUORUM_WAIT = 3.0
"""How long a standby tries to have etcd's quorum confirm the silent term before fencing."""


@dataclass(frozen=True)
class Takeover:
    """A won takeover, to be recorded by the next term."""

    node: str
    method: str
    confirmed_at: float
    """When power off was confirmed, on the event loop's clock."""
    replaced: int
    """The token of the term that ended."""
    session_revision: int | None
    """mod_revision of the node's session trace before fencing (None: could not read it)."""


class StandbyWatch:
    """Run `run()` for the life of the controller; `pending` holds a won takeover."""

    def __init__(
        self,
        store: Store,
        informers: SharedInformers,
        elector: LeaderElector,
        peers: PeerTable,
        node: str,
        timings: HaTimings,
        fence_runner: FenceRunner,
    ) -> None:
        self.store = store
        self.elector = elector
        self.peers = peers
        self.node = node
        self.timings = timings
        self.fence_runner = fence_runner
        self._nodes = informers.informer("ClusterNode")
        self._leader: LeaderInfo | None = None
        self._tried: int | None = None
        self.pending: Takeover | None = None

    def take_pending(self, replaced: int | None) -> Takeover | None:
        """The takeover that ended term `replaced` (this elector's `took_over`), once."""
        pending, self.pending = self.pending, None
        if pending is None or pending.replaced != replaced:
            return None
        return pending

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_leader(), name="follow the leader record")
            group.create_task(self._watch(), name="standby watch")

    async def _follow_leader(self) -> None:
        """Keep the leader record fresh; a dead etcd member must not stall the watch."""
        while True:
            try:
                async with asyncio.timeout(ETCD_READ_TIMEOUT):
                    leader = await self.elector.current_leader()
            except (*ELECTION_ERRORS, LeaderRecordError) as error:
                log.debug("leader record not read: %s", error)
            else:
                known = self._leader
                if leader is not None and (known is None or known.token != leader.token):
                    log.info("watching the leader on %s (term %d)", leader.node, leader.token)
                self._leader = leader
            await asyncio.sleep(LEADER_REFRESH)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECK_PERIOD)
            info = self._leader
            if self.elector.is_leader or info is None or info.node in (None, self.node):
                continue
            if info.token == self._tried:
                continue
            victim = self._nodes.get(info.node or "")
            if not isinstance(victim, ClusterNode):
                continue
            heard = {n.metadata.name: self._heard(n.metadata.name) for n in self._nodes.list()}
            if info.node not in silent_nodes(heard, loop.time(), self.timings.suspect_after):
                continue
            self._tried = info.token
            if power_fenced(victim.spec):
                if not await self._quorum_names(info):
                    self._tried = None  # look again: fenced nothing
                    continue
                await self._fence_and_take_over(info, victim)
            else:
                await self._take_over_unfenced(info, victim.metadata.name)

    def _heard(self, node: str) -> Heard | None:
        last, since = self.peers.heard_at(node), self.peers.heard_since(node)
        return None if last is None or since is None else Heard(last=last, since=since)

    async def _quorum_names(self, info: LeaderInfo) -> bool:
        """etcd's quorum still names term `info.token` as the leader: a linearizable read (etcd's
        leader answers it only with a majority behind it), tried for up to QUORUM_WAIT while
        etcd elects. A standby that reaches no majority is on the losing side of a cut: fencing
        would only power a healthy host off, and `take_over` would fail anyway."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + QUORUM_WAIT
        while True:
            try:
                async with asyncio.timeout(ETCD_READ_TIMEOUT):
                    current = await self.elector.current_leader()
                return current is not None and current.token == info.token
            except (*ELECTION_ERRORS, LeaderRecordError) as error:
                if loop.time() >= deadline:
                    log.warning(
                        "the leader's host %s is silent, but etcd's quorum is not reachable "
                        "from here (%s): not fencing it",
                        info.node,
                        error or type(error).__name__,
                    )
                    return False
            await asyncio.sleep(CHECK_PERIOD)

    async def _take_over_unfenced(self, info: LeaderInfo, name: str) -> None:
        """End the silent term without fencing: the token guard refuses the old leader's
        writes from then on, and the host's VMs wait for its policy's own confirmation."""
        log.warning(
            "the leader's host %s (term %d) is silent on the cluster network and has no power "
            "fencing: taking over without fencing it",
            name,
            info.token,
        )
        try:
            await self.elector.take_over(info.token)
        except ELECTION_ERRORS as error:
            log.error("taking over from term %d failed: %s", info.token, error)

    async def _fence_and_take_over(self, info: LeaderInfo, victim: ClusterNode) -> None:
        name = victim.metadata.name
        log.warning(
            "the leader's host %s (term %d) is silent on the cluster network: fencing it",
            name,
            info.token,
        )
        revision = await self._session_revision(name)
        for method in victim.spec.fencing.methods:
            try:
                ok, message = await run_method(self.store, self.fence_runner, victim, method.name)
            except (FenceConfigError, StoreError, OSError) as error:
                ok, message = False, str(error)
            log.info("standby fence of %s, method %s: %s", name, method.name, message)
            if ok:
                confirmed_at = asyncio.get_running_loop().time()
                break
        else:
            log.error("every fence method of %s failed: waiting for the leader key", name)
            return
        try:
            won = await self.elector.take_over(info.token)
        except ELECTION_ERRORS as error:
            log.error("taking over from term %d failed: %s", info.token, error)
            return
        if won:
            self.pending = Takeover(name, method.name, confirmed_at, info.token, revision)

    async def _session_revision(self, node: str) -> int | None:
        """The session trace's mod_revision. A serializable read: any member answers, even
        while etcd elects a leader; a stale answer only makes the guarded record fail."""
        key = self.store.raw_key(layout_keys.session(node))
        try:
            async with asyncio.timeout(ETCD_READ_TIMEOUT):
                kv = await self.store.keys.get(key, serializable=True)
        except (TimeoutError, StoreError) as error:
            log.warning(
                "session trace of %s not read (%s): the takeover will fence again", node, error
            )
            return None
        return 0 if kv is None else kv.mod_revision
