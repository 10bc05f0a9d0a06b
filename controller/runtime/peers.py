"""Direct heartbeats on the cluster network (what corosync does): the fast failure detector.

Every agent, and every controller, sends a small UDP datagram every `interval` (0.2 s) to the
cluster address of every ClusterNode, on `port` (7480); every controller listens and records,
on its monotonic clock, when it last heard each node (`PeerTable`). The payload is JSON, at
most `MAX_DATAGRAM` bytes: `{"v": 1, "node": NAME, "role": "agent" | "controller",
"term": TOKEN | null, "bootId": ID, "seq": N}` (a controller sends the term it leads, or null).

A datagram can only make a node look alive, never make anything happen: malformed or
oversized datagrams, unknown nodes and datagrams whose source address is not the named node's
cluster address are dropped (and counted). A forged datagram can therefore only delay the
suspicion of a dead node, which then falls back to the lease path (docs/ha.md). Nothing here
needs etcd, so detection keeps working while etcd elects a leader.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from crds.meta import _check_name

log = logging.getLogger(__name__)

RETRY_BIND = 5.0
"""Seconds between attempts to bind a socket that could not be bound (address not up yet)."""
PEER_PORT = 7480
PEER_INTERVAL = 0.2
MAX_DATAGRAM = 512
Role = Literal["agent", "controller"]


class PeerFormatError(ValueError):
    """A datagram that is not a direct heartbeat."""


@dataclass(frozen=True)
class PeerSettings:
    """The UDP port of direct heartbeats and how often they are sent. Each process sends from,
    and a controller listens on, its own node's cluster address."""

    port: int = PEER_PORT
    interval: float = PEER_INTERVAL

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"peer port must be 1-65535, got {self.port}")
        if not 0 < self.interval <= 5:
            raise ValueError(f"peer interval must be in (0, 5] s, got {self.interval}")


@dataclass(frozen=True)
class Beat:
    node: str
    role: Role
    term: int | None
    boot_id: str
    seq: int

    def encode(self) -> bytes:
        record = {
            "v": 1,
            "node": self.node,
            "role": self.role,
            "term": self.term,
            "bootId": self.boot_id,
            "seq": self.seq,
        }
        return json.dumps(record, separators=(",", ":")).encode()


def decode(data: bytes) -> Beat:
    """Parse one datagram; PeerFormatError says what is wrong with it."""
    if len(data) > MAX_DATAGRAM:
        raise PeerFormatError(f"{len(data)} bytes, more than {MAX_DATAGRAM}")
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise PeerFormatError("not JSON") from None
    if not isinstance(record, dict) or record.get("v") != 1:
        raise PeerFormatError("not a version 1 heartbeat")
    node, role, term = record.get("node"), record.get("role"), record.get("term")
    boot_id, seq = record.get("bootId"), record.get("seq")
    try:
        _check_name(node if isinstance(node, str) else "")
    except ValueError:
        raise PeerFormatError(f"bad node name {node!r}") from None
    if role not in ("agent", "controller"):
        raise PeerFormatError(f"bad role {role!r}")
    if term is not None and (isinstance(term, bool) or not isinstance(term, int)):
        raise PeerFormatError(f"bad term {term!r}")
    if not isinstance(boot_id, str) or isinstance(seq, bool) or not isinstance(seq, int):
        raise PeerFormatError("bad bootId or seq")
    assert isinstance(node, str)
    return Beat(node, role, term, boot_id, seq)


def _same_address(a: str, b: str) -> bool:
    try:
        first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if isinstance(first, ipaddress.IPv6Address) and first.ipv4_mapped is not None:
        first = first.ipv4_mapped
    return first == second


class PeerTable:
    """When each node was last heard, on the event loop's clock.

    `address_of(node)` gives the node's cluster address (None: not a known node). A node's
    *run* is its datagrams since the last gap of over `break_gap` seconds between two of them.
    """

    def __init__(self, address_of: Callable[[str], str | None], break_gap: float) -> None:
        self._address_of = address_of
        self._break_gap = break_gap
        self._heard: dict[str, float] = {}
        self._since: dict[str, float] = {}
        self.dropped = 0
        """Datagrams refused (malformed, oversized, unknown node, wrong source address)."""

    def heard_at(self, node: str) -> float | None:
        """When the last datagram from `node` came."""
        return self._heard.get(node)

    def heard_since(self, node: str) -> float | None:
        """When the current run of datagrams from `node` began."""
        return self._since.get(node)

    def receive(self, data: bytes, source: str, at: float) -> Beat | None:
        """Record a datagram from `source`; None (and counted) if it is refused."""
        try:
            beat = decode(data)
        except PeerFormatError as error:
            self._drop(f"from {source}: {error}")
            return None
        address = self._address_of(beat.node)
        if address is None or not _same_address(source, address):
            self._drop(f"from {source} claiming {beat.node} (cluster address {address})")
            return None
        last = self._heard.get(beat.node)
        if last is None or at - last > self._break_gap:
            self._since[beat.node] = at
        self._heard[beat.node] = max(at, self._heard.get(beat.node, at))
        return beat

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.debug("direct heartbeat dropped: %s", why)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, table: PeerTable) -> None:
        self._table = table
        self._loop = asyncio.get_running_loop()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._table.receive(data, str(addr[0]), self._loop.time())

    def error_received(self, exc: Exception) -> None:
        log.debug("direct heartbeat socket: %s", exc)


async def _bind(
    factory: Callable[[], asyncio.DatagramProtocol], address: str, port: int, what: str
) -> asyncio.DatagramTransport:
    """A datagram socket bound to (address, port), retried while that fails (never raises:
    without it, detection falls back to the leases)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            transport, _ = await loop.create_datagram_endpoint(factory, local_addr=(address, port))
            return transport
        except OSError as error:
            log.error("%s: cannot bind %s port %d (%s); retrying", what, address, port, error)
            await asyncio.sleep(RETRY_BIND)


async def listen(
    table: PeerTable, address: str, settings: PeerSettings
) -> asyncio.DatagramTransport:
    """Start receiving into `table` on `address`; close the returned transport to stop."""
    return await _bind(lambda: _Receiver(table), address, settings.port, "direct heartbeats")


class PeerSender:
    """Sends this process's heartbeat from `source` (its node's cluster address, so receivers
    can check it) to every target address, every `interval`, until cancelled.

    `targets()` is read each round (the ClusterNodes' cluster addresses); `term()` is the term
    a controller leads, or None. Send errors (network down) are logged once per outage.
    """

    def __init__(
        self,
        node: str,
        role: Role,
        boot_id: str,
        source: str,
        targets: Callable[[], Iterable[str]],
        settings: PeerSettings,
        term: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._node, self._role, self._boot_id = node, role, boot_id
        self._source = source
        self._targets = targets
        self._settings = settings
        self._term = term
        self._seq = 0
        self._failing = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        transport = await _bind(asyncio.DatagramProtocol, self._source, 0, "sending heartbeats")
        try:
            while True:
                started = loop.time()
                self._send_round(transport)
                await asyncio.sleep(max(0.0, started + self._settings.interval - loop.time()))
        finally:
            transport.close()

    def _send_round(self, transport: asyncio.DatagramTransport) -> None:
        self._seq += 1
        data = Beat(self._node, self._role, self._term(), self._boot_id, self._seq).encode()
        errors = []
        for address in self._targets():
            try:
                transport.sendto(data, (address, self._settings.port))
            except (OSError, ValueError) as error:  # another address family, a bad address
                errors.append(f"{address}: {error}")
        if errors and not self._failing:
            log.warning("direct heartbeats not sent: %s", "; ".join(errors))
        self._failing = bool(errors)
