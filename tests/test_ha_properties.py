"""Property test: random failure sequences against the real engine and the simulator.

Invariants (the simulator checks the first two on every tick and every action):
- a VM never runs on two hosts at once;
- no VM is moved off a node, and no node is declared fenced, before fencing is confirmed
  (power off, self-fence deadline passed, or an honest operator ack);
- detection on silence (power-fenced nodes whose direct heartbeats stop), etcd elections that
  extend every lease, and, with the controllers on the hosts, a standby taking over from a
  leader whose host was cut (random power and network cuts hit the leader's host too) keep the
  first two;
- cutting a node's storage path (the shared VG some VMs use; every node's policy is
  `storageLoss: fence`) fences the node before its VMs move, onto nodes with the path;
- once the sequence settles (every host powered, connected, fence devices working, storage
  back), every VM that should run runs exactly once, since capacity exists for all of them.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from controller.ha import scenario, scenario_run
from controller.ha.engine import Engine
from controller.ha.scenario import Scenario
from controller.ha.simulator import Simulator

NODES = ("host1", "host2", "host3")
VMS = ("vm1", "vm2", "vm3", "vm4")
CHAOS_SECONDS = 60
SETTLE_SECONDS = 60
POLICIES = ("ipmi", "self-fence", "manual", "ipmi+self-fence")
SHARED_VG = "vg vg_cluster"


def cluster_yaml(
    policies: tuple[str, ...], vm_options: list[dict[str, object]], on_hosts: bool
) -> str:
    nodes = []
    for name, policy in zip(NODES, policies, strict=True):
        fencing: dict[str, object] = {"selfFence": "self-fence" in policy}
        fencing["storageLoss"] = {"action": "fence", "graceSeconds": 1}
        if "ipmi" in policy:
            device = {"agent": "fence_ipmilan", "parameters": {"ip": "192.0.2.1"}}
            fencing["methods"] = [{"name": "ipmi", "devices": [device]}]
        nodes.append({"name": name, "cpus": 8, "memoryMiB": 8192, "fencing": fencing})
    vms = []
    for name, options in zip(VMS, vm_options, strict=False):
        vm = {"name": name, "memoryMiB": 1024, **options}
        if vm.pop("sharedVg", False):
            vm["disks"] = [{"volume": f"vg_cluster/lv_{name}"}]
        vms.append(vm)
    document: dict[str, object] = {
        "duration": CHAOS_SECONDS + SETTLE_SECONDS,
        "simulation": {"bootSeconds": 5},
        "nodes": nodes,
        "vms": vms,
    }
    if on_hosts:
        document["controllers"] = list(NODES)
    return yaml.safe_dump(document)


@dataclass(frozen=True)
class Event:
    at: float
    verb: str
    target: str
    extra: str = ""


node_verbs = st.sampled_from(
    [
        "power-off",
        "power-on",
        "network-off",
        "network-on",
        "agent-kill",
        "agent-start",
        "fence-fail",
        "fence-ok",
        "honest-ack",
        "drain",
        "drain-force",
        "uncordon",
        "storage-cut",
        "storage-restore",
    ]
)
vm_verbs = st.sampled_from(["crash", "stop", "start", "migrate"])
times = st.integers(min_value=1, max_value=CHAOS_SECONDS * 10).map(lambda t: t / 10)
events = st.one_of(
    st.builds(Event, times, node_verbs, st.sampled_from(NODES)),
    st.builds(Event, times, vm_verbs, st.sampled_from(VMS), st.sampled_from(NODES)),
    st.builds(Event, times, st.just("controller-restart"), st.just("")),
    st.builds(Event, times, st.just("etcd-election"), st.sampled_from(["0.5", "1", "2"])),
    st.builds(
        Event,
        times,
        st.sampled_from(["power-off", "network-off"]),
        st.sampled_from([*NODES, "leader"]),
    ),
)
vm_option = st.fixed_dictionaries(
    {},
    optional={
        "node": st.sampled_from(NODES),
        "priority": st.integers(-5, 5),
        "failoverDomain": st.builds(
            lambda first, ordered, failback: {
                "ordered": ordered,
                "failback": failback,
                "nodes": [{"name": first, "priority": 1}],
            },
            st.sampled_from(NODES),
            st.booleans(),
            st.booleans(),
        ),
        "migration": st.builds(lambda allowed: {"allowed": allowed}, st.booleans()),
        "sharedVg": st.booleans(),
    },
)


def apply_event(sim: Simulator, loaded: Scenario, event: Event) -> Callable[[], None]:
    def run() -> None:
        if event.target == "leader":  # the host of the leading controller, whichever it is now
            if sim.leader in sim.hosts:
                scenario_run.command_action(sim, f"{event.verb} {sim.leader}")()
            return
        host = sim.hosts.get(event.target)
        if event.verb == "etcd-election":
            sim.etcd_election(float(event.target))
            return
        if host is None and event.target not in sim.vms and event.verb != "controller-restart":
            return
        if event.verb == "honest-ack":
            assert host is not None
            if not host.powered:
                sim.ack(event.target)
        elif event.verb in ("fence-fail", "fence-ok"):
            assert host is not None
            if "ipmi" in host.devices:
                sim.set_device(event.target, "ipmi", None, event.verb.removeprefix("fence-"))
        elif event.verb in ("storage-cut", "storage-restore"):
            sim.set_storage(event.target, SHARED_VG, lost=event.verb == "storage-cut")
        elif event.verb == "drain-force":
            sim.drain(event.target, force=True)
        elif event.verb == "migrate":
            vm = sim.vms[event.target]
            if vm.migration is None:
                sim.request_migration(event.target, event.extra)
        else:
            command = f"{event.verb} {event.target}".strip()
            scenario_run.command_action(sim, command)()

    return run


def settle(sim: Simulator) -> None:
    for name, host in sim.hosts.items():
        for method in host.devices:
            sim.set_device(name, method, None, "ok")
        sim.power_on(name)
        sim.set_network(name, up=True)
        sim.start_agent(name)
        sim.cordon(name, cordoned=False)
        sim.set_storage(name, SHARED_VG, lost=False)


def start_agents_after_boot(sim: Simulator) -> None:
    for name in sim.hosts:
        sim.start_agent(name)


@settings(
    max_examples=int(os.environ.get("KVMCTL_HA_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    policies=st.tuples(*(st.sampled_from(POLICIES) for _ in NODES)),
    vm_options=st.lists(vm_option, min_size=1, max_size=len(VMS)),
    chaos=st.lists(events, max_size=25),
    on_hosts=st.booleans(),
)
@example(  # found: self-fences counted as crashes, then a give-up outliving its relocation
    policies=("ipmi", "self-fence", "ipmi"),
    vm_options=[{}, {"node": "host1", "migration": {"allowed": False}}, {"node": "host1"}, {}],
    chaos=[
        *[Event(0.1, "etcd-election", "1")] * 3,
        Event(37.0, "etcd-election", "2"),
        Event(42.6, "power-off", "host3"),
        Event(42.4, "etcd-election", "1"),
        Event(16.1, "crash", "vm2", "host2"),
        Event(0.1, "crash", "vm2", "host2"),
        Event(34.4, "power-off", "host1"),
        Event(43.3, "etcd-election", "1"),
    ],
    on_hosts=False,
)
def test_random_failures_keep_the_invariants(
    policies: tuple[str, ...],
    vm_options: list[dict[str, object]],
    chaos: list[Event],
    on_hosts: bool,
) -> None:
    loaded = scenario.parse(cluster_yaml(policies, vm_options, on_hosts), "random.yaml")
    sim = scenario_run.build(loaded)
    for event in chaos:
        sim.at(event.at, apply_event(sim, loaded, event))
    sim.at(CHAOS_SECONDS, lambda: settle(sim))
    sim.at(CHAOS_SECONDS + 10, lambda: start_agents_after_boot(sim))
    asyncio.run(scenario_run.simulate(sim))

    log = "\n".join(sim.lines)
    assert sim.violations == [], log
    for vm in sim.vms.values():
        if vm.spec.run_state != "started" or vm.failed:
            continue
        assert len(sim.running_hosts(vm.name)) == 1, f"{vm.name} does not run once:\n{log}"


cuts = st.one_of(
    st.builds(
        Event,
        times,
        st.sampled_from(["power-off", "power-on", "network-off", "network-on"]),
        st.sampled_from([*NODES, "leader"]),
    ),
    st.builds(Event, times, st.just("etcd-election"), st.just("1")),
)


@settings(
    max_examples=int(os.environ.get("KVMCTL_HA_EXAMPLES", "150")) // 3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    policies=st.tuples(*(st.sampled_from(POLICIES[:2]) for _ in NODES)),
    vm_options=st.lists(vm_option, min_size=1, max_size=len(VMS)),
    chaos=st.lists(cuts, min_size=1, max_size=12),
)
def test_power_and_network_cuts_of_any_host_with_controllers_on_the_hosts(
    policies: tuple[str, ...], vm_options: list[dict[str, object]], chaos: list[Event]
) -> None:
    """Silence-based fencing and standby takeovers, hit often: every chaos event cuts or
    restores a host (the leader's included), or makes etcd elect."""
    loaded = scenario.parse(cluster_yaml(policies, vm_options, True), "cuts.yaml")
    sim = scenario_run.build(loaded)
    for event in chaos:
        sim.at(event.at, apply_event(sim, loaded, event))
    sim.at(CHAOS_SECONDS, lambda: settle(sim))
    sim.at(CHAOS_SECONDS + 10, lambda: start_agents_after_boot(sim))
    asyncio.run(scenario_run.simulate(sim))

    log = "\n".join(sim.lines)
    assert sim.violations == [], log
    for vm in sim.vms.values():
        if vm.spec.run_state == "started" and not vm.failed:
            assert len(sim.running_hosts(vm.name)) == 1, f"{vm.name} does not run once:\n{log}"


@settings(
    max_examples=int(os.environ.get("KVMCTL_HA_EXAMPLES", "150")) // 3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    policies=st.tuples(*(st.sampled_from(POLICIES) for _ in NODES)),
    vm_options=st.lists(vm_option, min_size=1, max_size=len(VMS)),
    chaos=st.lists(events, max_size=25),
    on_hosts=st.booleans(),
)
def test_waking_the_engine_on_news_decides_as_looking_every_tick(
    policies: tuple[str, ...],
    vm_options: list[dict[str, object]],
    chaos: list[Event],
    on_hosts: bool,
) -> None:
    """The simulator wakes the loop only when it has news or a timer fires; an engine that
    steps on every tick must decide exactly the same, and the
    incremental invariant checks must end where checking everything does."""
    text = cluster_yaml(policies, vm_options, on_hosts)
    logs = []
    for period in (math.inf, 0.0):
        loaded = scenario.parse(text, "random.yaml")
        sim = scenario_run.build(loaded)
        for event in chaos:
            sim.at(event.at, apply_event(sim, loaded, event))
        sim.at(CHAOS_SECONDS, lambda sim=sim: settle(sim))  # type: ignore[misc]
        sim.at(CHAOS_SECONDS + 10, lambda sim=sim: start_agents_after_boot(sim))  # type: ignore[misc]
        asyncio.run(scenario_run.simulate(sim, Engine, period))
        assert sim.invariants.full() == (sim.invariants.doubled, sim.invariants.sharing)
        logs.append("\n".join(sim.lines))
    assert logs[0] == logs[1]
