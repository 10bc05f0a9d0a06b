"""The netlink driver's bonds under Debian's stock kernel (run in the kernel lab).

The reference setup: bond0 = eth0 + eth2, active-backup, miimon 100, enslaved to br0 which
carries the host's address. Each "NIC" is a veth whose peer stands for the switch port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from reconcilers.drivers.netlink import (
    BOND_MODES,
    BondInfo,
    LinkEvent,
    Netlink,
    NetlinkDriverError,
)

DEADLINE = 60.0
SLAVES = ("eth0", "eth2")


async def _poll(describe: str, check: Callable[[], Awaitable[bool]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {describe}"
        await asyncio.sleep(0.05)


async def _reference_bond(nl: Netlink) -> BondInfo:
    """bond0 (active-backup, miimon 100) over eth0 and eth2, under br0 with an address,
    everything up; returns the bond's state once it has picked an active slave."""
    for slave in SLAVES:
        await nl.create_veth(slave, f"sw-{slave}")
        await nl.set_up(f"sw-{slave}")
    await nl.create_bond("bond0", "active-backup", miimon=100)
    for slave in SLAVES:
        await nl.enslave(slave, "bond0")
    await nl.set_up("bond0")
    await nl.create_bridge("br0")
    await nl.enslave("bond0", "br0")
    await nl.set_up("br0")
    await nl.add_address("br0", "10.0.0.1/24")

    async def active_slave_chosen() -> bool:
        return (await nl.bond_info("bond0")).active_slave is not None

    await _poll("bond0 to choose an active slave", active_slave_chosen)
    return await nl.bond_info("bond0")


async def test_reference_bond_under_bridge(nl: Netlink) -> None:
    info = await _reference_bond(nl)
    assert info.mode == "active-backup"
    assert info.miimon == 100
    assert info.slaves == sorted(SLAVES)
    assert info.active_slave in SLAVES

    links = {link.name: link for link in await nl.links()}
    assert links["bond0"].kind == "bond"
    assert links["bond0"].master == "br0"
    assert links["eth0"].master == "bond0"
    assert links["eth2"].master == "bond0"
    assert "10.0.0.1/24" in {address.cidr for address in await nl.addresses("br0")}


async def test_active_slave_fails_over_when_its_peer_goes_down(nl: Netlink) -> None:
    info = await _reference_bond(nl)
    failing = info.active_slave
    assert failing is not None
    survivor = next(slave for slave in SLAVES if slave != failing)
    seen: list[LinkEvent] = []

    async def until_failing_slave_loses_carrier() -> None:
        async for event in nl.watch_links():
            seen.append(event)
            if event.action == "existing" and len(seen) == 1:
                await nl.set_down(f"sw-{failing}")
            if event.action == "new" and event.link.name == failing and not event.link.carrier:
                return

    await asyncio.wait_for(until_failing_slave_loses_carrier(), DEADLINE)
    assert seen[-1].link.master == "bond0"

    async def survivor_active() -> bool:
        return (await nl.bond_info("bond0")).active_slave == survivor

    await _poll(f"{survivor} to become the active slave", survivor_active)
    assert (await nl.link("bond0")).carrier


async def test_primary_and_options_and_release(nl: Netlink) -> None:
    await _reference_bond(nl)
    await nl.set_bond_options("bond0", miimon=200, primary="eth2")

    async def primary_active() -> bool:
        info = await nl.bond_info("bond0")
        return info.primary == "eth2" and info.active_slave == "eth2"

    await _poll("the primary eth2 to become active", primary_active)
    assert (await nl.bond_info("bond0")).miimon == 200

    with pytest.raises(NetlinkDriverError, match="bond0: only possible while the bond has no"):
        await nl.set_bond_options("bond0", mode="balance-rr")
    with pytest.raises(NetlinkDriverError, match="enslave eth9 to bond0: no such link"):
        await nl.enslave("eth9", "bond0")
    with pytest.raises(NetlinkDriverError, match="set primary of bond bond0 to eth9: no such"):
        await nl.set_bond_options("bond0", primary="eth9")

    await nl.release("eth0")
    assert (await nl.bond_info("bond0")).slaves == ["eth2"]
    assert (await nl.link("eth0")).master is None


async def test_every_mode_name_round_trips(nl: Netlink) -> None:
    for number, mode in enumerate(BOND_MODES):
        name = f"bond{number}"
        await nl.create_bond(name, mode, miimon=100)
        assert (await nl.bond_info(name)).mode == mode
        await nl.delete_link(name)
    assert not await nl.exists("bond0")
