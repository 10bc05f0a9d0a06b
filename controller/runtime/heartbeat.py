"""The agent's heartbeat: a lease-bound key in etcd, the self-fence deadline and the watchdog.

The key `{prefix}/heartbeats/{node}` holds `{node, bootId, agentVersion, startedAt}` and is bound
to an etcd lease of `ttl` seconds, refreshed every `renew_interval`. The HA controller watches
these keys: a key that disappears means the node is lost.

Every new lease (an agent start, or a key written anew after its lease expired) is one agent
*session*: the same transaction that writes the heartbeat key rewrites `{prefix}/sessions/{node}`
(no lease: it outlives the agent). Its mod_revision changes exactly when a session starts, so a
write guarded by "mod_revision(session key) == M" proves no agent session began on the node
since M was read, even after the heartbeat key expired (the standby takeover's fence record).

Self-fencing: the time a successful renewal was *sent* is kept on the local monotonic clock
(etcd counts the TTL from when it received it, which is later). The self-fence deadline is
`last_success + ttl - margin` (the rules are pure, in `controller/runtime/self_fence.py`, shared
with the HA simulator): if it passes without a renewal and the node's policy relies on
self-fencing, `on_self_fence` runs at once (it destroys the node's VMs through libvirt, without
waiting for etcd), so the VMs are gone before the lease can expire on the server.

Watchdog: with a device path, one byte is written every `renew_interval` while `healthy()` holds
(the caller's loops are progressing and any required self-fence succeeded). A hung agent stops
feeding it and the watchdog resets the host. A clean stop writes 'V' (magic close) first,
except on a self-fencing node, where guests outlive the agent and only the watchdog stops them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aetcd

from controller.runtime import layout_keys, telemetry
from controller.runtime.self_fence import lease_valid, may_feed_watchdog, self_fence_deadline

log = logging.getLogger(__name__)

MAGIC_CLOSE = b"V"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class HeartbeatTiming:
    """Lease TTL (whole seconds, etcd's unit), renewal period and self-fence margin (s)."""

    ttl: int = 3
    renew_interval: float = 1.0
    self_fence_margin: float = 1.0

    def __post_init__(self) -> None:
        if self.ttl < 1:
            raise ValueError(f"heartbeat lease TTL must be at least 1 s, got {self.ttl}")
        if not 0 < self.renew_interval < self.ttl:
            raise ValueError(
                f"renew interval must be > 0 and below the TTL ({self.ttl} s), "
                f"got {self.renew_interval}"
            )
        if not 0 <= self.self_fence_margin < self.ttl:
            raise ValueError(
                f"self-fence margin must be >= 0 and below the TTL ({self.ttl} s), "
                f"got {self.self_fence_margin}"
            )


def boot_id() -> str:
    """This kernel's boot id (changes at every reboot)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


class Watchdog:
    """A watchdog device (or the test harness's FIFO): open, feed, magic close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    async def open(self, timeout: float = 10.0) -> None:
        """Open the device; a FIFO waits for its reader, so this is bounded by `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                self._fd = await asyncio.to_thread(os.open, self.path, os.O_WRONLY)
        except TimeoutError:
            raise OSError(f"watchdog {self.path}: nobody opened it for reading") from None

    def feed(self) -> None:
        if self._fd is not None:
            os.write(self._fd, b"\0")

    def close(self, magic: bool) -> None:
        """Close; with `magic`, disarm first (clean shutdown). Without, it stays armed."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if magic:
                os.write(fd, MAGIC_CLOSE)
        finally:
            os.close(fd)


class Heartbeat:
    """Keeps the heartbeat key alive; runs the self-fence deadline and feeds the watchdog.

    `self_fence_enabled()` is read when the deadline passes (the node's spec may change).
    `on_self_fence()` must not need etcd. `healthy()` gates feeding the watchdog.
    """

    def __init__(
        self,
        client: aetcd.Client,
        prefix: str,
        node: str,
        agent_version: str,
        timing: HeartbeatTiming,
        self_fence_enabled: Callable[[], bool],
        on_self_fence: Callable[[], Awaitable[None]],
        healthy: Callable[[], bool] = lambda: True,
        watchdog: Watchdog | None = None,
    ) -> None:
        self._client = client
        self.key = layout_keys.absolute(prefix, layout_keys.heartbeat(node))
        self._session_key = layout_keys.absolute(prefix, layout_keys.session(node)).encode()
        self.timing = timing
        self._record = json.dumps(
            {
                "node": node,
                "bootId": boot_id(),
                "agentVersion": agent_version,
                "startedAt": datetime.now(UTC).isoformat(),
            }
        ).encode()
        self._self_fence_enabled = self_fence_enabled
        self._on_self_fence = on_self_fence
        self._healthy = healthy
        self._watchdog = watchdog
        self._lease_id: int | None = None
        self._writing = asyncio.Lock()
        """Held while a renewal writes the key anew (renewals overlap; one new lease at a time)."""
        self._last_success: float | None = None
        self.established = asyncio.Event()
        """Set while the key is held; cleared when renewal fails past the deadline."""
        self.lease_count = 0
        """How many leases were granted: grows when the key had to be written anew."""
        self.self_fence_failed = False
        self.self_fenced = False
        """True once VMs were destroyed for a missed deadline (until `acknowledge_fence`)."""
        self.last_self_fence: tuple[float, float] | None = None
        """(last renewal sent, VMs destroyed) of the latest self-fence, on the loop's clock:
        it was in time if the second is before the first plus the TTL (when etcd may expire)."""

    def lease_valid(self) -> bool:
        """True while the last renewal is recent enough that etcd surely holds the lease."""
        now = asyncio.get_running_loop().time()
        timing = self.timing
        return lease_valid(now, self._last_success, timing.ttl, timing.self_fence_margin)

    def acknowledge_fence(self) -> None:
        """The agent has re-synchronised after a self-fence: VMs may start again."""
        self.self_fenced = False

    async def run(self) -> None:
        """Renew, watch the deadline and feed the watchdog until cancelled.

        The lease is not revoked on the way out: the guests keep running when the agent stops,
        and an agent restarted within the TTL takes the key over without the node ever
        looking lost.
        """
        async with asyncio.TaskGroup() as group:
            group.create_task(self._renew_forever(), name="heartbeat renew")
            group.create_task(self._deadline_forever(), name="self-fence deadline")
            if self._watchdog is not None:
                group.create_task(self._feed_forever(self._watchdog), name="watchdog")

    async def _renew_forever(self) -> None:
        """Send a renewal every `renew_interval`, each given up to two intervals to succeed.

        A renewal does not wait for the one before: while etcd elects a leader, a renewal sent
        before the election hangs until its timeout, and the next one, sent after, gets through
        (the self-fence deadline counts from the last renewal that succeeded, by when it was sent).
        """
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as renewals:
            while True:
                sent_at = loop.time()
                renewals.create_task(self._renew(sent_at), name="heartbeat renewal")
                await asyncio.sleep(max(0.0, sent_at + self.timing.renew_interval - loop.time()))

    async def _renew(self, sent_at: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timing.renew_interval * 2):
                await self._renew_once()
        except (TimeoutError, aetcd.ClientError) as error:
            log.warning("heartbeat %s: renewal failed: %s", self.key, error or type(error).__name__)
            return
        if self._last_success is None or sent_at > self._last_success:
            self._last_success = sent_at
        self.established.set()
        telemetry.record_heartbeat_renewal(loop.time() - sent_at)

    async def _renew_once(self) -> None:
        lease_id = self._lease_id
        if lease_id is not None:
            reply = await self._client.refresh_lease(lease_id)
            if reply is not None and reply.TTL > 0:
                return
        async with self._writing:
            if self._lease_id != lease_id:
                return  # another renewal wrote the key anew since this one began: held
            if lease_id is not None:
                log.warning(
                    "heartbeat %s: lease %x expired; writing the key anew", self.key, lease_id
                )
                self._lease_id = None
            await self._write_anew()

    async def _write_anew(self) -> None:
        """A new lease and, in one transaction, the heartbeat key on it and the session trace."""
        lease = await self._client.lease(self.timing.ttl)
        txn = self._client.transactions
        session = json.dumps({**json.loads(self._record), "lease": f"{lease.id:x}"}).encode()
        await self._client.transaction(
            compare=[],
            success=[
                txn.put(self.key.encode(), self._record, lease=lease.id),
                txn.put(self._session_key, session),
            ],
            failure=[],
        )
        self._lease_id = lease.id
        self.lease_count += 1
        log.info("heartbeat %s held with lease %x (TTL %d s)", self.key, lease.id, self.timing.ttl)

    async def _deadline_forever(self) -> None:
        """Wait for the deadline; when it passes unrenewed, self-fence (once per outage)."""
        loop = asyncio.get_running_loop()
        await self.established.wait()
        fenced_for: float | None = None  # the renewal time whose deadline we already acted on
        while True:
            assert self._last_success is not None
            timing = self.timing
            deadline = self_fence_deadline(self._last_success, timing.ttl, timing.self_fence_margin)
            if loop.time() < deadline:
                await asyncio.sleep(min(deadline - loop.time(), self.timing.renew_interval))
                continue
            if fenced_for == self._last_success:
                await asyncio.sleep(self.timing.renew_interval / 4)
                continue
            fenced_for = self._last_success
            self.established.clear()
            if not self._self_fence_enabled():
                log.warning(
                    "heartbeat %s: lease not renewed in time; this node does not self-fence, "
                    "its VMs keep running",
                    self.key,
                )
                continue
            log.error("heartbeat %s: self-fence deadline passed: destroying VMs", self.key)
            self.self_fenced = True
            self.last_self_fence = None
            try:
                await self._on_self_fence()
                self.last_self_fence = (fenced_for, loop.time())
            except Exception:
                log.exception("self-fence failed: the watchdog is no longer fed")
                self.self_fence_failed = True

    def _may_feed(self) -> bool:
        """The watchdog feed rule of `controller/runtime/self_fence.py` (docs/ha.md)."""
        return may_feed_watchdog(
            working=self._healthy(),
            self_fence_enabled=self._self_fence_enabled(),
            lease_valid=self.lease_valid(),
            self_fenced=self.self_fenced,
            self_fence_failed=self.self_fence_failed,
        )

    async def _feed_forever(self, watchdog: Watchdog) -> None:
        # Open (and so arm) the watchdog only once the lease is held: an agent restarted while
        # etcd is unreachable must not feed a watchdog its predecessor left armed over guests
        # that no lease covers.
        await self.established.wait()
        await watchdog.open()
        try:
            while True:
                if self._may_feed():
                    watchdog.feed()
                await asyncio.sleep(self.timing.renew_interval)
        except asyncio.CancelledError:
            # On a self-fencing node the watchdog is what makes recovery elsewhere safe: the
            # guests keep running when the agent stops, so it must stay armed (sbd's contract).
            # Drain the node before stopping its agent, or restart it within the timeout.
            armed = self._self_fence_enabled()
            if armed:
                log.warning(
                    "agent stopping on a self-fencing node: the watchdog stays armed and resets "
                    "this host unless the agent is back in time (drain the node first)"
                )
            watchdog.close(magic=not armed)
            raise
        except BaseException:
            watchdog.close(magic=False)
            raise
