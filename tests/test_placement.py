"""Placement rules and engine decisions on hand-built worlds (no simulator)."""

from __future__ import annotations

import pytest

from controller.ha.engine import Engine
from controller.ha.environment import (
    Emit,
    FenceConfirmation,
    FenceResult,
    HaTimings,
    Place,
    SetNodeHealth,
    StartFence,
    VmView,
    World,
)
from controller.ha.placement import Usage, choose_node, domain_rank
from tests.support.views import node, vm, world


def choose(target: VmView, w: World, exclude: tuple[str, ...] = ()) -> tuple[str | None, str]:
    return choose_node(target, w.nodes, w.vms, Usage(w.vms.values()), exclude)


def test_least_loaded_node_wins_then_name() -> None:
    w = world([node("a"), node("b"), node("c")], [vm("x", "a"), vm("y", "b")])
    assert choose(vm("new"), w) == ("c", "")
    w = world([node("a"), node("b")], [])
    assert choose(vm("new"), w) == ("a", "")


def test_ordered_domain_priority_beats_load() -> None:
    domain = {
        "ordered": True,
        "nodes": [{"name": "b", "priority": 1}, {"name": "a", "priority": 2}],
    }
    w = world([node("a"), node("b")], [vm("x", "b", memoryMiB=6000)])
    assert choose(vm("new", failoverDomain=domain), w)[0] == "b"
    assert domain_rank(vm("new", failoverDomain=domain).spec, "c") > 2


def test_unordered_domain_members_are_equal_and_preferred() -> None:
    domain = {"nodes": [{"name": "a", "priority": 1}, {"name": "b", "priority": 9}]}
    w = world([node("a"), node("b"), node("c")], [vm("x", "a")])
    assert choose(vm("new", failoverDomain=domain), w)[0] == "b"


def test_restricted_domain_refuses_other_nodes_with_reasons() -> None:
    domain = {"restricted": True, "nodes": [{"name": "a"}]}
    w = world([node("a", health="Fenced", lease=False), node("b")], [])
    target, why = choose(vm("new", failoverDomain=domain), w)
    assert target is None
    assert why == "a is Fenced; b is outside the restricted failover domain"


def test_capacity_counts_placed_vms_and_migration_targets() -> None:
    w = world([node("a", memory=2048), node("b", memory=2048)], [vm("x", "a", memoryMiB=1536)])
    assert choose(vm("new", memoryMiB=1024), w)[0] == "b"
    target, why = choose(vm("new", memoryMiB=4096), w)
    assert target is None
    assert "a has 512 MiB free of 4096 MiB needed" in why


def test_anti_affinity_works_from_either_side() -> None:
    w = world([node("a"), node("b")], [vm("db1", "a", antiAffinity=["db2"])])
    assert choose(vm("db2"), w)[0] == "b"
    w = world([node("a"), node("b")], [vm("db1", "a")])
    assert choose(vm("db2", antiAffinity=["db1"]), w)[0] == "b"


def test_anti_affinity_is_judged_on_the_vms_given_even_with_one_usage() -> None:
    """One Usage serves a whole step; admission asks it about other VM tables too. The VMs that
    name a VM as anti-affine are those of the table given, not of the last one asked about."""
    nodes = world([node("a"), node("b")], []).nodes
    usage = Usage(())
    usage.add("db1", vm("db1").spec, "a")
    alone = {"db1": vm("db1", "a")}
    naming = {"db1": vm("db1", "a", antiAffinity=["db2"])}
    prefers_a = vm("db2", failoverDomain={"ordered": True, "nodes": [{"name": "a"}]})
    assert choose_node(prefers_a, nodes, alone, usage)[0] == "a"
    assert choose_node(prefers_a, nodes, naming, usage)[0] == "b"
    assert choose_node(prefers_a, nodes, alone, usage)[0] == "a"


def test_cordoned_and_lost_nodes_are_not_eligible() -> None:
    w = world([node("a", cordoned=True), node("b", lease=False), node("c")], [])
    assert choose(vm("new"), w)[0] == "c"


# Engine decisions ------------------------------------------------------------------------------

IPMI = {"methods": [{"name": "ipmi", "devices": [{"agent": "fence_ipmilan"}]}]}


def test_a_lost_node_is_fenced_before_its_vm_moves() -> None:
    engine = Engine()
    lost = node("a", lease=False, fencing=IPMI, lost_at=9.0)
    actions = engine.step(world([lost, node("b")], [vm("x", "a")]))
    assert SetNodeHealth("a", "Fencing", None) in actions
    assert StartFence("a", "ipmi", 1) in actions
    assert not [a for a in actions if isinstance(a, Place)]

    fencing = node("a", health="Fencing", lease=False, fencing=IPMI, lost_at=9.0)
    result = FenceResult(1, "a", "ipmi", ok=True, message="off")
    actions = engine.step(
        world([fencing, node("b")], [vm("x", "a")], now=11.0, fence_results=(result,))
    )
    assert SetNodeHealth("a", "Fenced", FenceConfirmation("PowerOff", 11.0, "ipmi")) in actions
    assert Place("x", "b") in actions


def test_self_fence_waits_for_the_grace_after_expiry() -> None:
    engine = Engine(HaTimings(recovery_grace=1.0))
    lost = node("a", health="Fencing", lease=False, fencing={"selfFence": True}, lost_at=10.0)
    assert not [
        a
        for a in engine.step(world([lost, node("b")], [vm("x", "a")], now=10.9))
        if isinstance(a, Place)
    ]
    actions = engine.step(world([lost, node("b")], [vm("x", "a")], now=11.0))
    assert Place("x", "b") in actions


def test_no_recovery_while_the_vm_may_run_on_an_unfenced_node() -> None:
    engine = Engine()
    fenced = node("a", health="Fenced", lease=False)
    stale = node("c", health="Fencing", lease=False, domains=frozenset({"x"}))
    actions = engine.step(world([fenced, node("b"), stale], [vm("x", "a")]))
    assert not [a for a in actions if isinstance(a, Place)]
    assert Emit("VirtualMachine", "x", "VMPending", "may still run on c", "Warning") in actions


def test_an_ack_given_while_online_is_discarded() -> None:
    engine = Engine()
    actions = engine.step(world([node("a", ack_at=5.0)], []))
    reasons = [a.reason for a in actions if isinstance(a, Emit)]
    assert reasons == ["FenceAckIgnored"]


@pytest.mark.parametrize("run_state", ["stopped", "disabled"])
def test_a_vm_that_should_not_run_is_unplaced(run_state: str) -> None:
    actions = Engine().step(world([node("a")], [vm("x", "a", runState=run_state)]))
    assert Place("x", None) in actions


def test_timings_refuse_a_watchdog_slower_than_the_self_fence_deadline() -> None:
    with pytest.raises(ValueError, match="watchdog_timeout"):
        HaTimings(lease_ttl=2.0, self_fence_margin=0.5, watchdog_timeout=2.0)
