"""Admission control: is there room to recover every started VM after the worst N host failures?

Pure functions over the engine's views, using the placement rules of `placement.py` (capacity,
restricted failover domains, anti-affinity). `check` answers for one hypothetical world: the
started VMs where they are placed (a VM not placed yet is placed first, as the engine would),
on the hosts that are Online now.

Host-failure policy (`hostFailuresTolerated: N`). Two methods, both about the engine's own
recovery (`choose_node`, highest priority first):

- exact: every set of 1..N failing hosts is simulated (their VMs re-placed on the others in the
  engine's order). Used when there are at most `EXACT_SUBSETS` such sets (small clusters).
- bound: a sufficient condition, linear in VMs x hosts, tried first. A displaced VM finds a
  host unless every candidate host (schedulable, in its restricted domain) is excluded: at most
  N candidates failed, at most k run one of its k anti-affine partners (a partner is on one host
  at a time), and the rest are full. Filling a host with f vcpus free against the VM's c costs
  more than f - c vcpus of displaced load landing there (likewise memory); the displaced load is
  at most the load of the N fullest hosts, so the number of hosts it can fill is at most the
  number of cheapest costs that fit in it (vcpus and memory counted separately). If candidates
  - N - k - filled >= 1 for every VM, every VM is placed, whatever the failing hosts and in
  whatever order they fail. When the bound says no and the exact method is too costly, the
  answer is no: sound, conservative for big clusters.

Reserve policy (`reservePercent: P`): the started VMs use at most (100 - P)% of the vcpus and of
the memory of the schedulable hosts (unknown capacity: not limited). Domains and anti-affinity
are not considered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from itertools import combinations
from math import comb
from typing import Literal

from crds import AnyResource, ClusterNode, ClusterPolicy, VirtualMachine
from crds.clusterpolicy import AdmissionPolicy

from .environment import NodeView, VmView
from .placement import OUTSIDE_DOMAIN, Usage, choose_node, domain_rank

EXACT_SUBSETS = 64
"""At most this many failure sets are simulated one by one; beyond, the bound decides."""

TOLERATED_MAX = 8
"""`kvmctl status` counts the tolerated host failures up to this many."""
Method = Literal["exact", "bound", "reserve", "placement", "off"]
UNLIMITED = 1 << 62
FAILED_CONDITION = "Failed"
"""The VM condition the HA controller sets when the restart policy gave up (production.py)."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    """One line saying why not (empty when ok)."""
    method: Method


def _hosting(node: NodeView) -> bool:
    return node.health == "Online" and node.lease_alive


def _schedulable(node: NodeView) -> bool:
    return _hosting(node) and not node.spec.cordoned


def _order(vms: Iterable[VmView]) -> list[VmView]:
    """The engine's order: higher priority first, then name."""
    return sorted(vms, key=lambda v: (-v.spec.priority, v.name))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass
class _World:
    """Online hosts (no stale domains: anti-affinity is judged on placements) and every started
    VM with a placement on them."""

    nodes: dict[str, NodeView]
    vms: dict[str, VmView]
    placement: dict[str, str]

    def usage(self, failed: Iterable[str] = ()) -> Usage:
        gone = set(failed)
        usage = Usage(())
        for name, node in self.placement.items():
            if node not in gone:
                usage.add(name, self.vms[name].spec, node)
        return usage


def _baseline(nodes: Mapping[str, NodeView], vms: Mapping[str, VmView]) -> _World | Verdict:
    """Place the started VMs that are not placed on an Online host yet, or say which cannot."""
    live = {n.name: replace(n, domains=frozenset()) for n in nodes.values() if _hosting(n)}
    started = {v.name: v for v in vms.values() if v.spec.run_state == "started" and not v.failed}
    world = _World(live, started, {})
    pending: list[VmView] = []
    for vm in started.values():
        if vm.placement in live:
            world.placement[vm.name] = vm.placement
        else:
            pending.append(vm)
    usage = world.usage()
    for vm in _order(pending):
        target, why = choose_node(vm, live, started, usage)
        if target is None:
            why = f"VirtualMachine {vm.name!r} cannot be placed now: {why}"
            return Verdict(False, why, "placement")
        usage.add(vm.name, vm.spec, target)
        world.placement[vm.name] = target
    return world


def _recovers(world: _World, failed: tuple[str, ...]) -> str | None:
    """Why the VMs of the `failed` hosts would not all be placed again (None: they would)."""
    usage = world.usage(failed)
    gone = set(failed)
    displaced = [world.vms[name] for name, node in world.placement.items() if node in gone]
    for vm in _order(displaced):
        target, why = choose_node(vm, world.nodes, world.vms, usage, gone)
        if target is None:
            hosts = (
                f"host {failed[0]} fails" if len(failed) == 1 else f"hosts {', '.join(failed)} fail"
            )
            return f"if {hosts}, VirtualMachine {vm.name!r} has no host: {why}"
        usage.add(vm.name, vm.spec, target)
    return None


def _exact(world: _World, failures: int) -> str | None:
    hosts = sorted(world.nodes)
    for size in range(1, min(failures, len(hosts)) + 1):
        for failed in combinations(hosts, size):
            why = _recovers(world, failed)
            if why is not None:
                return why
    return None


def _subsets(hosts: int, failures: int) -> int:
    return sum(comb(hosts, size) for size in range(1, min(failures, hosts) + 1))


def _fillable(costs: list[int], budget: int) -> int:
    """How many of `costs` (cheapest first) fit together in `budget`."""
    count = 0
    for cost in sorted(costs):
        if cost > budget:
            break
        budget -= cost
        count += 1
    return count


def _bound(world: _World, failures: int) -> str | None:
    """The sufficient condition of the module docstring; None when it holds for every VM."""
    usage = world.usage()
    loads = [usage.of(name) for name in world.nodes]
    cpu_budget = sum(sorted((u.cpus for u in loads), reverse=True)[:failures])
    mem_budget = sum(sorted((u.memory_mib for u in loads), reverse=True)[:failures])
    targets = [n for n in world.nodes.values() if not n.spec.cordoned]
    filled: dict[tuple[int, int, bool], tuple[int, int]] = {}
    placed = set(world.placement)
    named_by: dict[str, set[str]] = {}  # anti-affinity named by the other side
    for vm in world.vms.values():
        for other in vm.spec.anti_affinity:
            named_by.setdefault(other, set()).add(vm.name)
    for vm in _order(world.vms.values()):
        spec = vm.spec
        restricted = spec.failover_domain.restricted
        key = (spec.vcpus, spec.memory_mib, restricted)
        if restricted or key not in filled:
            candidates = [
                n for n in targets if not restricted or domain_rank(spec, n.name) != OUTSIDE_DOMAIN
            ]
            cpu_costs = [
                UNLIMITED
                if n.cpus is None
                else max(0, n.cpus - usage.of(n.name).cpus - spec.vcpus + 1)
                for n in candidates
            ]
            mem_costs = [
                UNLIMITED
                if n.memory_mib is None
                else max(0, n.memory_mib - usage.of(n.name).memory_mib - spec.memory_mib + 1)
                for n in candidates
            ]
            full = _fillable(cpu_costs, cpu_budget) + _fillable(mem_costs, mem_budget)
            filled[key] = (len(candidates), full)
        count, full = filled[key]
        partners = len(
            (named_by.get(vm.name, set()) | (set(spec.anti_affinity) & placed)) - {vm.name}
        )
        if count - failures - partners - full < 1:
            after = _plural(failures, "host failure")
            return (
                f"VirtualMachine {vm.name!r} may find no host after {after}: of "
                f"{_plural(count, 'candidate host')}, {failures} may fail, {partners} may run "
                f"an anti-affine VM and {full} may fill up (bound over "
                f"{_plural(len(world.nodes), 'host')})"
            )
    return None


def _reserve(world: _World, percent: int) -> str | None:
    targets = [n for n in world.nodes.values() if not n.spec.cordoned]
    specs = [world.vms[name].spec for name in world.placement]
    for unit, used, sizes in (
        ("vcpus", sum(s.vcpus for s in specs), [n.cpus for n in targets]),
        ("MiB of memory", sum(s.memory_mib for s in specs), [n.memory_mib for n in targets]),
    ):
        if any(size is None for size in sizes):
            continue
        total = sum(size or 0 for size in sizes)
        if used * 100 > total * (100 - percent):
            return (
                f"started VMs would use {used} of {total} {unit} on the schedulable hosts: "
                f"more than the {100 - percent}% that reservePercent {percent} leaves"
            )
    return None


def check(
    policy: AdmissionPolicy | None,
    nodes: Mapping[str, NodeView],
    vms: Mapping[str, VmView],
    exact_subsets: int = EXACT_SUBSETS,
) -> Verdict:
    """Whether the started VMs of `vms` on `nodes` meet `policy` (None: always)."""
    if policy is None:
        return Verdict(True, "", "off")
    world = _baseline(nodes, vms)
    if isinstance(world, Verdict):
        return world
    if policy.reserve_percent is not None:
        why = _reserve(world, policy.reserve_percent)
        return Verdict(why is None, why or "", "reserve")
    failures = policy.host_failures_tolerated or 0
    if failures == 0:
        return Verdict(True, "", "exact")
    why = _bound(world, failures)
    if why is None:
        return Verdict(True, "", "bound")
    if _subsets(len(world.nodes), failures) > exact_subsets:
        return Verdict(False, why, "bound")
    why = _exact(world, failures)
    return Verdict(why is None, why or "", "exact")


def plan(
    policy: AdmissionPolicy, nodes: Mapping[str, NodeView], vms: Mapping[str, VmView]
) -> dict[str, str] | None:
    """Where every started VM would be placed, if that world meets `policy` by the bound (or
    the reserve rule); None otherwise.

    Both rules are monotone: a world that has only some of these VMs, each where the plan puts
    it, meets the policy too. So the engine admits a start that follows the plan without
    checking again (one check per step instead of one per start)."""
    world = _baseline(nodes, vms)
    if isinstance(world, Verdict):
        return None
    if policy.reserve_percent is not None:
        why = _reserve(world, policy.reserve_percent)
    else:
        why = _bound(world, policy.host_failures_tolerated or 0)
    return dict(world.placement) if why is None else None


def headroom(
    policy: AdmissionPolicy | None, nodes: Mapping[str, NodeView], vms: Mapping[str, VmView]
) -> str:
    """One line for `kvmctl status`: the policy, whether it is met, and the spare capacity."""
    if policy is None:
        return "admission: off (no ClusterPolicy 'default' with an admission section)"
    verdict = check(policy, nodes, vms)
    state = "met" if verdict.ok else f"NOT MET: {verdict.reason}"
    if policy.host_failures_tolerated is not None:
        state += f" (tolerates {_plural(tolerated(nodes, vms), 'host failure')})"
    world = _baseline(nodes, {n: v for n, v in vms.items() if v.placement is not None})
    if isinstance(world, Verdict):
        return f"admission: {policy.describe()}: {state}"
    usage = world.usage()
    targets = [n for n in world.nodes.values() if not n.spec.cordoned]
    cpus = _total(n.cpus for n in targets)
    memory = _total(n.memory_mib for n in targets)
    used_cpus = sum(usage.of(n.name).cpus for n in targets)
    used_memory = sum(usage.of(n.name).memory_mib for n in targets)
    spare_cpus = "vcpus unknown" if cpus is None else f"{cpus - used_cpus} vcpus"
    spare_memory = "memory unknown" if memory is None else f"{memory - used_memory} MiB"
    return (
        f"admission: {policy.describe()}: {state}; free {spare_cpus}, {spare_memory} on "
        f"{_plural(len(targets), 'schedulable host')} ({verdict.method})"
    )


def tolerated(
    nodes: Mapping[str, NodeView], vms: Mapping[str, VmView], most: int = TOLERATED_MAX
) -> int:
    """How many host failures the cluster tolerates now (at most `most`)."""
    count = 0
    while count < most:
        rule = AdmissionPolicy.model_validate({"hostFailuresTolerated": count + 1})
        if not check(rule, nodes, vms).ok:
            break
        count += 1
    return count


def _total(sizes: Iterable[int | None]) -> int | None:
    values = list(sizes)
    return None if None in values else sum(v for v in values if v is not None)


def views(
    nodes: Iterable[ClusterNode], vms: Iterable[VirtualMachine]
) -> tuple[dict[str, NodeView], dict[str, VmView]]:
    """Stored objects as the views `check` takes, outside the engine (apply, status).

    A node counts as up when its recorded health is Online (no lease is read); capacity is the
    spec's override, else the agent's report, as the engine sees it.
    """
    node_views: dict[str, NodeView] = {}
    for node in nodes:
        capacity = node.spec.capacity or node.status.capacity
        node_views[node.metadata.name] = NodeView(
            name=node.metadata.name,
            spec=node.spec,
            health=node.status.health,
            fence=None,
            lease_alive=node.status.health == "Online",
            lease_lost_at=None,
            clean_since=None,
            fence_ack_at=None,
            domains=frozenset(),
            cpus=capacity.cpus if capacity else None,
            memory_mib=capacity.memory_mib if capacity else None,
        )
    vm_views: dict[str, VmView] = {}
    for vm in vms:
        if vm.metadata.deletion_timestamp is not None:
            continue
        placement = vm.status.placement
        failed = vm.status.condition(FAILED_CONDITION)
        vm_views[vm.metadata.name] = VmView(
            name=vm.metadata.name,
            spec=vm.spec,
            placement=None if placement is None else placement.node,
            state="Stopped",
            failed=failed is not None and failed.status == "True",
        )
    return node_views, vm_views


def status_line(policy: AnyResource | None, objects: Iterable[AnyResource]) -> str:
    """`headroom` of stored objects: the ClusterPolicy (or None) and the nodes and VMs."""
    listed = list(objects)
    nodes = [o for o in listed if isinstance(o, ClusterNode)]
    vms = [o for o in listed if isinstance(o, VirtualMachine)]
    admission = policy.spec.admission if isinstance(policy, ClusterPolicy) else None
    return headroom(admission, *views(nodes, vms))
