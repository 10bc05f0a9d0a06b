"""Direct heartbeats on real UDP sockets (loopback): what is heard, what is dropped."""

from __future__ import annotations

import asyncio
import socket

import pytest

from controller.runtime.peers import MAX_DATAGRAM, Beat, PeerSender, PeerSettings, PeerTable, listen

DEADLINE = 20.0


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def table_for(addresses: dict[str, str]) -> PeerTable:
    return PeerTable(addresses.get, break_gap=0.5)


def test_a_beat_round_trips_and_bad_datagrams_are_dropped() -> None:
    table = table_for({"host1": "10.0.0.1"})
    beat = Beat("host1", "controller", 7, "boot", 3)
    assert table.receive(beat.encode(), "10.0.0.1", 5.0) == beat
    assert table.heard_at("host1") == 5.0
    refused = [
        (b"\xff\xfe", "10.0.0.1"),
        (b"[]", "10.0.0.1"),
        (b'{"v": 1, "node": "Host1", "role": "agent", "term": null, "bootId": "", "seq": 1}',
         "10.0.0.1"),
        (b'{"v": 1, "node": "host1", "role": "boss", "term": null, "bootId": "", "seq": 1}',
         "10.0.0.1"),
        (b'{"v": 1, "node": "host1", "role": "agent", "term": true, "bootId": "", "seq": 1}',
         "10.0.0.1"),
        (b" " * (MAX_DATAGRAM + 1), "10.0.0.1"),
        (Beat("host9", "agent", None, "b", 1).encode(), "10.0.0.1"),  # unknown node
        (Beat("host1", "agent", None, "b", 1).encode(), "10.0.0.2"),  # forged source
    ]  # fmt: skip
    for data, source in refused:
        assert table.receive(data, source, 9.0) is None
    assert table.dropped == len(refused)
    assert table.heard_at("host1") == 5.0  # nothing refused made host1 look heard later


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="peer port"):
        PeerSettings(port=0)
    with pytest.raises(ValueError, match="peer interval"):
        PeerSettings(interval=0)


async def test_beats_sent_on_loopback_are_heard_until_the_sender_stops() -> None:
    settings = PeerSettings(port=free_udp_port(), interval=0.05)
    table = table_for({"host1": "127.0.0.1", "host2": "127.0.0.2"})
    transport = await listen(table, "127.0.0.1", settings)
    senders = {
        name: asyncio.create_task(
            PeerSender(name, "agent", "boot", source, lambda: ["127.0.0.1"], settings).run()
        )
        for name, source in (("host1", "127.0.0.1"), ("host2", "127.0.0.2"))
    }
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(DEADLINE):
            while table.heard_at("host1") is None or table.heard_at("host2") is None:
                await asyncio.sleep(0.05)
            senders["host2"].cancel()
            await asyncio.wait({senders["host2"]})
            stopped = loop.time()
            # host1 keeps being heard after host2 fell silent.
            while (table.heard_at("host1") or 0.0) < stopped + 0.2:
                await asyncio.sleep(0.05)
        last = table.heard_at("host2")
        assert last is not None and last <= stopped
        assert table.dropped == 0
    finally:
        for task in senders.values():
            task.cancel()
        await asyncio.wait(senders.values())
        transport.close()


def test_a_gap_over_the_break_starts_a_new_run() -> None:
    table = table_for({"host1": "10.0.0.1"})
    beat = Beat("host1", "agent", None, "boot", 1).encode()
    for at in (1.0, 1.2, 1.7, 2.0):  # gaps up to 0.5 s: one run
        table.receive(beat, "10.0.0.1", at)
    assert (table.heard_since("host1"), table.heard_at("host1")) == (1.0, 2.0)
    table.receive(beat, "10.0.0.1", 2.6)  # a gap of 0.6 s
    assert (table.heard_since("host1"), table.heard_at("host1")) == (2.6, 2.6)
    assert table.heard_since("host2") is None
