"""Admission control (controller/ha/admission.py) against the engine's own recovery.

The property: when admission says a world tolerates N host failures, fencing any N of its
hosts and letting the real `Engine` recover leaves every started VM placed again.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.ha import admission, scenario, scenario_run
from controller.ha.engine import Engine
from controller.ha.environment import (
    Emit,
    FenceConfirmation,
    NodeView,
    Place,
    SetAdmissionHold,
    VmView,
    World,
)
from crds.clusternode import ClusterNodeSpec
from crds.clusterpolicy import AdmissionPolicy
from crds.virtualmachine import VirtualMachineSpec


def node(name: str, cpus: int | None = 8, memory: int | None = 8192, **spec: Any) -> NodeView:
    return NodeView(
        name=name,
        spec=ClusterNodeSpec.model_validate({"addresses": {"cluster": "10.0.0.1"}, **spec}),
        health="Online",
        fence=None,
        lease_alive=True,
        lease_lost_at=None,
        clean_since=None,
        fence_ack_at=None,
        domains=frozenset(),
        cpus=cpus,
        memory_mib=memory,
    )


def vm(name: str, placement: str | None = None, **spec: Any) -> VmView:
    spec.setdefault("memoryMiB", 1024)
    return VmView(name, VirtualMachineSpec.model_validate(spec), placement, "Running")


def tolerate(count: int, mode: str = "enforce") -> AdmissionPolicy:
    return AdmissionPolicy.model_validate({"hostFailuresTolerated": count, "mode": mode})


def placed_by_engine(nodes: dict[str, NodeView], vms: dict[str, VmView]) -> dict[str, VmView]:
    """The VMs as the engine places them on a healthy cluster (unplaceable ones dropped)."""
    actions = Engine().step(World(now=10.0, nodes=nodes, vms=vms))
    where = {a.vm: a.node for a in actions if isinstance(a, Place)}
    return {
        name: VmView(name, v.spec, where[name], "Running")
        for name, v in vms.items()
        if where.get(name) is not None
    }


def unrecovered(
    nodes: dict[str, NodeView], vms: dict[str, VmView], failed: tuple[str, ...]
) -> set[str]:
    """Fence `failed` and step the engine once: the VMs it leaves without a host."""
    fenced = FenceConfirmation("PowerOff", 5.0, "ipmi")
    world_nodes = {}
    for name, view in nodes.items():
        if name in failed:
            view = NodeView(
                name,
                view.spec,
                "Fenced",
                fenced,
                False,
                1.0,
                None,
                None,
                frozenset(),
                view.cpus,
                view.memory_mib,
            )
        else:
            here = frozenset(v.name for v in vms.values() if v.placement == name)
            view = NodeView(
                name,
                view.spec,
                "Online",
                None,
                True,
                None,
                None,
                None,
                here,
                view.cpus,
                view.memory_mib,
            )
        world_nodes[name] = view
    actions = Engine().step(World(now=10.0, nodes=world_nodes, vms=vms))
    where = {v.name: v.placement for v in vms.values()}
    where.update({a.vm: a.node for a in actions if isinstance(a, Place)})
    return {name for name, host in where.items() if host is None or host in failed}


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, NodeView], dict[str, VmView]]:
    names = [f"h{i}" for i in range(draw(st.integers(2, 6)))]
    nodes = {
        name: node(
            name,
            cpus=draw(st.sampled_from([None, 2, 4, 8])),
            memory=draw(st.sampled_from([None, 2048, 4096, 8192])),
            cordoned=draw(st.booleans()) and draw(st.booleans()),
        )
        for name in names
    }
    vms: dict[str, VmView] = {}
    count = draw(st.integers(0, 10))
    for index in range(count):
        spec: dict[str, Any] = {
            "vcpus": draw(st.integers(1, 3)),
            "memoryMiB": draw(st.sampled_from([512, 1024, 2048])),
            "priority": draw(st.integers(0, 2)),
        }
        if draw(st.booleans()) and draw(st.booleans()):
            members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
            spec["failoverDomain"] = {"nodes": [{"name": m} for m in members], "restricted": True}
        if index and draw(st.booleans()):
            spec["antiAffinity"] = [f"v{draw(st.integers(0, index - 1))}"]
        vms[f"v{index}"] = vm(f"v{index}", **spec)
    return nodes, placed_by_engine(nodes, vms)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.integers(1, 2), st.sampled_from([0, admission.EXACT_SUBSETS]))
def test_admitted_worlds_recover_from_any_n_failures(
    cluster: tuple[dict[str, NodeView], dict[str, VmView]], failures: int, exact_subsets: int
) -> None:
    """exact_subsets=0 checks the bound alone; the default lets the exact method decide."""
    nodes, vms = cluster
    verdict = admission.check(tolerate(failures), nodes, vms, exact_subsets)
    if not verdict.ok:
        return
    for size in range(1, failures + 1):
        for failed in combinations(sorted(nodes), size):
            assert not unrecovered(nodes, vms, failed), (verdict, failed)


@settings(max_examples=100, deadline=None)
@given(clusters(), st.integers(1, 2))
def test_the_bound_never_admits_what_the_exact_check_refuses(
    cluster: tuple[dict[str, NodeView], dict[str, VmView]], failures: int
) -> None:
    nodes, vms = cluster
    if admission.check(tolerate(failures), nodes, vms, exact_subsets=0).ok:
        assert admission.check(tolerate(failures), nodes, vms, exact_subsets=10**6).ok


# The engine: held at start, never at recovery --------------------------------------------------

SMALL: dict[str, Any] = {"vcpus": 1, "memoryMiB": 512}


def two_hosts() -> dict[str, NodeView]:
    return {name: node(name, cpus=1, memory=None) for name in ("a", "b")}


def step(
    nodes: dict[str, NodeView],
    vms: list[VmView],
    policy: AdmissionPolicy | None,
    engine: Engine | None = None,
) -> list[Any]:
    world = World(now=10.0, nodes=nodes, vms={v.name: v for v in vms}, admission=policy)
    return (engine or Engine()).step(world)


def test_a_start_that_breaks_the_policy_stays_pending_with_a_condition_and_one_warning() -> None:
    nodes = two_hosts()
    nodes["a"] = replace(nodes["a"], domains=frozenset({"v1"}))
    running = vm("v1", "a", **SMALL)
    engine = Engine()
    actions = step(nodes, [running, vm("v2", **SMALL)], tolerate(1), engine)
    (hold,) = [a for a in actions if isinstance(a, SetAdmissionHold)]
    assert hold.vm == "v2" and hold.message is not None
    assert hold.message.startswith(
        "starting it on b would break admission control (tolerate 1 host failure (enforce)): "
        "if host a fails, VirtualMachine 'v1' has no host: b has 0 free vcpus of 1 needed"
    )
    assert not [a for a in actions if isinstance(a, Place)]
    warnings = [a for a in actions if isinstance(a, Emit) and a.type == "Warning"]
    assert [(w.name, w.reason, w.message) for w in warnings] == [
        ("v2", "AdmissionHeld", hold.message)
    ]
    held = VmView("v2", running.spec, None, "Stopped", admission_hold=hold.message)
    again = step(nodes, [running, held], tolerate(1), engine)
    assert again == []  # the condition is recorded and the Warning was given: nothing new
    relaxed = step(nodes, [running, held], None, engine)
    assert Place("v2", "b") in relaxed and SetAdmissionHold("v2", None) in relaxed


def test_in_warn_mode_the_start_goes_ahead_with_a_warning() -> None:
    nodes = two_hosts()
    actions = step(nodes, [vm("v1", "a", **SMALL), vm("v2", **SMALL)], tolerate(1, "warn"))
    assert Place("v2", "b") in actions
    (warning,) = [a for a in actions if isinstance(a, Emit) and a.reason == "AdmissionWarning"]
    assert warning.type == "Warning" and "tolerate 1 host failure (warn)" in warning.message


def test_recovery_is_never_held_but_a_start_in_a_degraded_cluster_is() -> None:
    """c is fenced: v3 is recovered on a; v4 would leave no room should a or b fail too."""
    nodes = {name: node(name, cpus=2, memory=None) for name in ("a", "b", "c")}
    fenced = FenceConfirmation("PowerOff", 5.0, "ipmi")
    nodes["c"] = replace(nodes["c"], health="Fenced", fence=fenced, lease_alive=False)
    vms = [
        vm("v1", "a", **SMALL),
        vm("v2", "b", **SMALL),
        vm("v3", "c", **SMALL),
        vm("v4", **SMALL),
    ]
    actions = step(nodes, vms, tolerate(1))
    assert {a.vm: a.node for a in actions if isinstance(a, Place)} == {"v3": "a"}
    (hold,) = [a for a in actions if isinstance(a, SetAdmissionHold)]
    assert hold.vm == "v4" and hold.message is not None and "if host a fails" in hold.message


def test_a_start_never_takes_the_room_a_recovery_needs() -> None:
    """c is lost but not fenced yet: its VM v3 will need b's room, so v4 waits."""
    nodes = {name: node(name, cpus=1, memory=None) for name in ("a", "b", "c")}
    nodes["c"] = replace(nodes["c"], health="Fencing", lease_alive=False, lease_lost_at=1.0)
    vms = [vm("v1", "a", **SMALL), vm("v3", "c", **SMALL), vm("v4", **SMALL)]
    reason = "VirtualMachine 'v3' cannot be placed now: a has 0 free vcpus of 1 needed"
    actions = step(nodes, vms, tolerate(1))
    (hold,) = [a for a in actions if isinstance(a, SetAdmissionHold)]
    assert hold.vm == "v4" and hold.message is not None and reason in hold.message
    assert not [a for a in actions if isinstance(a, Place)]
    actions = step(nodes, vms, tolerate(1, "warn"))
    (warning,) = [a for a in actions if isinstance(a, Emit) and a.reason == "AdmissionWarning"]
    assert Place("v4", "b") in actions and reason in warning.message


# The simulator: held at start, every admitted VM recovered after a power loss ------------------


SCENARIO = Path(__file__).parent / "scenarios" / "35-admission-hold-then-host-loss.yaml"


async def test_in_the_simulator_the_start_that_breaks_it_waits_and_a_host_loss_is_survived() -> (
    None
):
    """Also a golden scenario; here what matters in it, and that it depends on the policy."""
    loaded = scenario.load(SCENARIO)
    assert loaded.admission == tolerate(1)
    sim = scenario_run.build(loaded)
    snapshot: dict[str, str | None] = {}
    sim.at(4.9, lambda: snapshot.update({v.name: v.placement for v in sim.vms.values()}))
    await scenario_run.simulate(sim)
    assert snapshot["vm5"] is None and None not in [snapshot[f"vm{i}"] for i in range(1, 5)]
    assert any("AdmissionHeld" in line and "vm5" in line for line in sim.lines)
    assert sim.vms["vm5"].admission_hold is None  # now Pending for room: no host can take it
    for name in ("vm1", "vm2", "vm3", "vm4"):
        assert sim.running_hosts(name) in (["host2"], ["host3"]), name
    assert sim.running_hosts("vm5") == [] and sim.violations == []

    without = scenario.load(SCENARIO)  # without the policy vm5 runs, and a VM of host1 cannot
    without.admission = None
    sim = scenario_run.build(without)
    await scenario_run.simulate(sim)
    assert sim.running_hosts("vm5") and sim.violations == []
    assert sum(1 for vm in sim.vms.values() if not sim.running_hosts(vm.name)) == 1


# The check on hand-built worlds ----------------------------------------------------------------


def check(
    policy: AdmissionPolicy | None, nodes: list[NodeView], vms: list[VmView]
) -> admission.Verdict:
    return admission.check(policy, {n.name: n for n in nodes}, {v.name: v for v in vms})


def test_without_a_policy_everything_is_admitted() -> None:
    assert check(None, [], [vm("v1")]) == admission.Verdict(True, "", "off")


def test_a_restricted_domain_counts_only_its_members() -> None:
    hosts = [node("a", cpus=1), node("b", cpus=1), node("c", cpus=4)]
    domain = {"nodes": [{"name": "a"}, {"name": "b"}], "restricted": True}
    vms = [vm("v1", "a", failoverDomain=domain), vm("v2", "b", failoverDomain=domain)]
    verdict = check(tolerate(1), hosts, vms)
    assert not verdict.ok and verdict.method == "exact"
    assert "c is outside the restricted failover domain" in verdict.reason
    assert check(tolerate(1), hosts, [vm("v1", "a"), vm("v2", "b")]).ok


def test_anti_affine_vms_need_one_host_each_after_the_failure() -> None:
    hosts = [node("a"), node("b")]
    vms = [vm("v1", "a", antiAffinity=["v2"]), vm("v2", "b")]
    verdict = check(tolerate(1), hosts, vms)
    assert not verdict.ok and "(anti-affinity)" in verdict.reason
    assert check(tolerate(1), [*hosts, node("c")], vms).ok


def test_cordoned_hosts_take_no_vm_but_may_fail() -> None:
    hosts = [node("a", cpus=1), node("b", cpus=1), node("c", cpus=1, cordoned=True)]
    verdict = check(tolerate(1), hosts, [vm("v1", "c")])
    assert verdict.ok
    verdict = check(tolerate(1), hosts, [vm("v1", "c"), vm("v2", "a"), vm("v3", "b")])
    assert not verdict.ok and "c is cordoned" in verdict.reason


def test_a_big_cluster_is_judged_by_the_bound() -> None:
    hosts = [node(f"h{i:02}", cpus=16, memory=None) for i in range(40)]
    light = [vm(f"v{i:03}", f"h{i % 40:02}", vcpus=2) for i in range(200)]
    assert check(tolerate(3), hosts, light) == admission.Verdict(True, "", "bound")
    full = [vm(f"v{i:03}", f"h{i % 40:02}", vcpus=4) for i in range(160)]
    verdict = check(tolerate(3), hosts, full)
    assert not verdict.ok and verdict.method == "bound"
    assert verdict.reason.startswith("VirtualMachine 'v000' may find no host after 3 host failures")


def test_reserve_percent_counts_vcpus_and_memory_of_schedulable_hosts() -> None:
    reserve = AdmissionPolicy.model_validate({"reservePercent": 25})
    hosts = [node("a", cpus=4, memory=4096), node("b", cpus=4, memory=4096)]
    assert check(reserve, hosts, [vm("v1", vcpus=3, memoryMiB=3072), vm("v2", vcpus=3)]).ok
    verdict = check(reserve, hosts, [vm("v1", "a", vcpus=3), vm("v2", vcpus=4)])
    assert not verdict.ok and verdict.method == "reserve"
    assert verdict.reason == (
        "started VMs would use 7 of 8 vcpus on the schedulable hosts: more than the 75% that "
        "reservePercent 25 leaves"
    )
    verdict = check(reserve, hosts, [vm("v1", memoryMiB=4096), vm("v2", memoryMiB=3072)])
    assert "would use 7168 of 8192 MiB of memory" in verdict.reason
    unknown = [node("a", cpus=None, memory=None), node("b", cpus=None, memory=None)]
    assert check(reserve, unknown, [vm("v1", vcpus=64)]).ok


def test_a_scenario_with_a_bad_admission_policy_is_refused_with_the_place() -> None:
    text = "nodes: [{name: h1}]\nadmission: {hostFailuresTolerated: 1, reservePercent: 10}"
    with pytest.raises(scenario.ScenarioError) as refused:
        scenario.parse(text, "s.yaml")
    assert str(refused.value) == (
        "s.yaml: admission: (document): admission needs exactly one of hostFailuresTolerated, "
        "reservePercent"
    )
