"""The Bond reconciler under Debian's kernel (bonding present): converge from scratch and from
drift, refuse to disrupt the cluster network, and follow a failover."""

from __future__ import annotations

import asyncio

import pytest

from crds import Bond, ObjectMeta
from crds.bond import BondSpec
from reconcilers.bond_converge import BondConverger, BondProblem
from reconcilers.bond_links import bond_keys_for_link
from reconcilers.drivers.netlink import Netlink

NODE = "host1"
CLUSTER_ADDRESS = "10.77.0.1"
DEADLINE = 120.0


def spec(**fields: object) -> BondSpec:
    values: dict[str, object] = {
        "node": NODE,
        "interface": "bond0",
        "slaves": ["eth0", "eth2"],
        "bridge": {"name": "br0", "addresses": [f"{CLUSTER_ADDRESS}/24"]},
    }
    values.update(fields)
    return BondSpec.model_validate(values)


@pytest.fixture
async def nics(nl: Netlink) -> Netlink:
    """eth0..eth2, each a veth whose peer (sw-ethN, the switch port) is up."""
    for nic in ("eth0", "eth1", "eth2"):
        await nl.create_veth(nic, f"sw-{nic}")
        await nl.set_up(f"sw-{nic}")
    return nl


async def converge(nl: Netlink, bond: BondSpec) -> list[str]:
    converger = BondConverger(nl, bond, CLUSTER_ADDRESS)
    await converger.run()
    return converger.actions


async def test_converges_from_scratch_to_the_reference_setup(nics: Netlink) -> None:
    nl = nics
    actions = await converge(nl, spec(primary="eth0"))
    assert "created bond bond0 (active-backup)" in actions
    info = await nl.bond_info("bond0")
    assert (info.mode, info.miimon, info.slaves, info.primary) == (
        "active-backup",
        100,
        ["eth0", "eth2"],
        "eth0",
    )
    assert (await nl.link("bond0")).master == "br0"
    assert f"{CLUSTER_ADDRESS}/24" in {a.cidr for a in await nl.addresses("br0")}
    assert await converge(nl, spec(primary="eth0")) == []


async def test_converges_from_drift_with_the_least_change(nics: Netlink) -> None:
    nl = nics
    await nl.create_bond("bond0", "active-backup", miimon=50)
    for slave in ("eth1", "eth2"):
        await nl.enslave(slave, "bond0")
    await nl.set_down("eth2")
    drifted = spec(bridge=None, addresses=["10.9.0.1/24"], mtu=1400)
    actions = await converge(nl, drifted)
    assert "released foreign slave eth1 from bond0" in actions
    assert "set miimon of bond0 to 100" in actions
    assert not any("mode" in action for action in actions)
    info = await nl.bond_info("bond0")
    assert (info.mode, info.miimon, info.slaves) == ("active-backup", 100, ["eth0", "eth2"])
    links = {link.name: link for link in await nl.links()}
    assert links["eth1"].master is None
    assert links["eth2"].up and links["bond0"].up
    assert links["bond0"].mtu == 1400
    assert "10.9.0.1/24" in {a.cidr for a in await nl.addresses("bond0")}

    # Not carrying the cluster network: a mode change needs no permission.
    actions = await converge(nl, spec(bridge=None, mode="balance-rr", slaves=["eth0", "eth2"]))
    assert "changed mode of bond0 to balance-rr" in actions
    info = await nl.bond_info("bond0")
    assert (info.mode, info.slaves) == ("balance-rr", ["eth0", "eth2"])


async def test_a_mode_change_on_the_cluster_bond_needs_permission(nics: Netlink) -> None:
    nl = nics
    await converge(nl, spec())
    with pytest.raises(BondProblem, match="changing the mode of bond0") as refused:
        await converge(nl, spec(mode="balance-rr"))
    assert refused.value.reason == "DisruptionNotAllowed"
    assert (await nl.bond_info("bond0")).mode == "active-backup"
    await converge(nl, spec(mode="balance-rr", allowDisruption=True))
    info = await nl.bond_info("bond0")
    assert (info.mode, info.slaves) == ("balance-rr", ["eth0", "eth2"])
    assert (await nl.link("bond0")).master == "br0"


async def test_a_failover_is_seen_as_link_events_and_in_the_observed_status(
    nics: Netlink,
) -> None:
    """What the reconciler writes to status (`observe`) follows a failover, and the link
    events that trigger the pass map to the bond. (etcd does not fit in the lab's memory
    next to pytest, so the status write itself is tested on the host.)"""
    nl = nics
    bond_spec = spec(primary="eth0")
    bond = Bond(metadata=ObjectMeta(name="bond0"), spec=bond_spec)
    converger = BondConverger(nl, bond_spec, CLUSTER_ADDRESS)
    await converger.run()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    observed = await converger.observe()
    while observed.active_slave != "eth0" or not all(s.carrier for s in observed.slaves):
        assert loop.time() < deadline, f"bond never became healthy: {observed}"
        await asyncio.sleep(0.1)
        observed = await converger.observe()

    enqueued: set[str] = set()

    async def until_eth0_loses_carrier() -> None:
        async for event in nl.watch_links():
            if event.action == "existing":
                if event.link.name == "sw-eth0":
                    await nl.set_down("sw-eth0")
                continue
            enqueued.update(bond_keys_for_link([bond], NODE, event.link.name))
            if event.link.name == "eth0" and not event.link.carrier:
                return

    await asyncio.wait_for(until_eth0_loses_carrier(), DEADLINE)
    assert enqueued == {"bond0"}
    observed = await converger.observe()
    while observed.active_slave != "eth2":
        assert loop.time() < deadline, f"status never showed the failover: {observed}"
        await asyncio.sleep(0.1)
        observed = await converger.observe()
    assert {s.name: s.carrier for s in observed.slaves} == {"eth0": False, "eth2": True}
