"""The netlink driver against the host kernel, each test in a fresh network namespace.

Bonds themselves need the kernel lab (e2e/lab_tests): this kernel has no bonding, which is
checked here as the driver's error message.
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from collections.abc import AsyncIterator

import pytest

from reconcilers.drivers.netlink import Link, LinkEvent, Netlink, NetlinkDriverError

DEADLINE = 30.0


@pytest.fixture
async def nl(netns: str) -> AsyncIterator[Netlink]:
    async with Netlink(netns) as driver:
        await driver.set_up("lo")
        yield driver


async def _wait_for_link(nl: Netlink, name: str, condition: str) -> Link:
    """Poll until `link(name)` satisfies `condition` ("carrier", "no-carrier")."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        link = await nl.link(name)
        if link.carrier == (condition == "carrier"):
            return link
        assert loop.time() < deadline, f"{name} never reached {condition}: {link}"
        await asyncio.sleep(0.05)


async def test_missing_namespace_is_an_error_and_is_not_created() -> None:
    name = f"kvmctl-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NetlinkDriverError, match=f"network namespace '{name}' does not exist"):
        async with Netlink(name):
            pass
    process = await asyncio.create_subprocess_exec(
        "ip", "netns", "list", stdout=asyncio.subprocess.PIPE
    )
    listing, _ = await process.communicate()
    assert name not in listing.decode()


async def test_veth_bridge_enslave_up_down_mtu(nl: Netlink) -> None:
    await nl.create_veth("eth0", "peer0")
    await nl.create_bridge("br0")
    await nl.enslave("eth0", "br0")
    await nl.set_mtu("eth0", 1400)
    for name in ("eth0", "peer0", "br0"):
        await nl.set_up(name)

    links = {link.name: link for link in await nl.links()}
    assert links["br0"].kind == "bridge"
    assert links["eth0"].kind == "veth"
    assert links["eth0"].master == "br0"
    assert links["eth0"].mtu == 1400
    assert links["eth0"].up
    assert len(links["eth0"].mac.split(":")) == 6
    assert links["peer0"].master is None
    await _wait_for_link(nl, "eth0", "carrier")
    assert (await nl.link("eth0")).operstate == "UP"

    await nl.set_down("peer0")
    down = await _wait_for_link(nl, "eth0", "no-carrier")
    assert down.operstate == "LOWERLAYERDOWN"
    assert not (await nl.link("peer0")).up

    await nl.release("eth0")
    assert (await nl.link("eth0")).master is None
    await nl.delete_link("eth0")
    assert not await nl.exists("eth0")
    assert not await nl.exists("peer0")
    with pytest.raises(NetlinkDriverError, match="get link eth0: no such link") as caught:
        await nl.link("eth0")
    assert caught.value.code == errno.ENODEV


async def test_addresses(nl: Netlink) -> None:
    await nl.create_bridge("br0")
    await nl.set_up("br0")
    await nl.add_address("br0", "192.0.2.10/24")
    await nl.add_address("br0", "2001:db8::10/64")
    cidrs = {address.cidr for address in await nl.addresses("br0")}
    assert {"192.0.2.10/24", "2001:db8::10/64"} <= cidrs

    await nl.del_address("br0", "192.0.2.10/24")
    assert "192.0.2.10/24" not in {address.cidr for address in await nl.addresses("br0")}
    with pytest.raises(NetlinkDriverError, match="add address 2001:db8::10/64 to br0: already"):
        await nl.add_address("br0", "2001:db8::10/64")


async def test_enslaving_a_missing_link_names_it(nl: Netlink) -> None:
    await nl.create_bridge("br0")
    with pytest.raises(NetlinkDriverError, match="enslave eth9 to br0: no such link"):
        await nl.enslave("eth9", "br0")
    with pytest.raises(NetlinkDriverError, match="enslave br0 to br9: no such link"):
        await nl.enslave("br0", "br9")


async def test_bad_address_input_is_a_readable_error(nl: Netlink) -> None:
    with pytest.raises(NetlinkDriverError, match="needs a prefix length"):
        await nl.add_address("lo", "192.0.2.1")
    with pytest.raises(NetlinkDriverError, match="not a valid IP address"):
        await nl.add_address("lo", "192.0.2.300/24")


async def test_link_events_when_a_veth_goes_down(nl: Netlink) -> None:
    await nl.create_veth("eth0", "peer0")
    await nl.create_bridge("br0")
    await nl.enslave("eth0", "br0")
    for name in ("eth0", "peer0", "br0"):
        await nl.set_up(name)
    await _wait_for_link(nl, "eth0", "carrier")

    seen: list[LinkEvent] = []

    async def until_eth0_loses_carrier() -> None:
        async for event in nl.watch_links():
            seen.append(event)
            if event.action == "existing" and event.link.name == "peer0":
                await nl.set_down("peer0")
            if event.action == "new" and event.link.name == "eth0" and not event.link.carrier:
                return

    await asyncio.wait_for(until_eth0_loses_carrier(), DEADLINE)
    existing = {event.link.name for event in seen if event.action == "existing"}
    assert existing == {"lo", "eth0", "peer0", "br0"}
    last = seen[-1]
    assert last.link.master == "br0"
    assert last.link.operstate == "LOWERLAYERDOWN"


async def test_bond_without_kernel_support_gives_a_clear_error(nl: Netlink) -> None:
    try:
        await nl.create_bond("bond0", "active-backup", miimon=100)
    except NetlinkDriverError as error:
        assert str(error) == "create bond bond0: kernel has no bonding support (errno 95)"
        assert error.code == errno.EOPNOTSUPP
    else:
        pytest.skip("this kernel has bonding: the bond itself is tested in the kernel lab")


async def test_unknown_bond_mode_names_the_known_ones(nl: Netlink) -> None:
    with pytest.raises(NetlinkDriverError, match=r"unknown bond mode 'active' \(known: balance"):
        await nl.create_bond("bond0", "active")
