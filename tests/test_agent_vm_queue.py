"""An agent's VirtualMachine queue takes only the VMs that concern its node
(`controller/agent_vms.py`): its resyncs reconcile its own VMs, not the cluster's, and a VM newly
placed on it, or a domain of another node's VM found on its host, is still handled. A real etcd
and the agent on libvirt's test driver; which VMs were reconciled is read from the reconcile
spans (one agent in the process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.agent_vms import NodeVms
from controller.apply import apply_one
from controller.runtime import telemetry
from controller.runtime.informer import SharedInformers
from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, VirtualMachineMigration
from crds.meta import now
from crds.migration import VirtualMachineMigrationSpec
from crds.virtualmachine import Placement
from e2e.harness.polling import eventually
from reconcilers.drivers.domain_xml import build_domain_xml
from reconcilers.drivers.libvirt import LifecycleEvent, LifecycleEventKind
from tests.support.agents import Cluster, domain_state, running_vm, vm_object

RESYNC = 0.5
DEADLINE = 30.0


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Reconcile spans of this test (telemetry set back to none after it)."""
    exporter = InMemorySpanExporter()
    setup = telemetry.setup_telemetry("kvmctl-test", "prometheus")
    assert isinstance(setup.tracer_provider, TracerProvider)
    setup.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    telemetry.setup_telemetry("kvmctl-test")


def reconciled(spans: InMemorySpanExporter, name: str) -> int:
    return sum(
        1
        for span in spans.get_finished_spans()
        if span.attributes
        and span.attributes.get("controller") == "virtualmachine"
        and span.attributes.get("name") == name
    )


async def test_resyncs_reconcile_only_the_nodes_vms_and_new_ones_are_still_handled(
    cluster: Cluster, spans: InMemorySpanExporter
) -> None:
    await cluster.add_node("host1")
    await cluster.add_node("host2")  # no agent: its VMs stay placed there
    agent = await cluster.start_agent("host1", resync_period=RESYNC)
    await running_vm(cluster, "mine", "host1")
    await cluster.store.create(vm_object("theirs"))
    await cluster.place("theirs", "host2")
    await cluster.store.create(vm_object("later"))

    # "mine" has no health checks: once it runs, only resyncs reconcile it again.
    await eventually(lambda: reconciled(spans, "mine") >= 4, "resyncs of mine", timeout=DEADLINE)
    assert reconciled(spans, "theirs") == 0
    assert reconciled(spans, "later") == 0

    await cluster.place("later", "host1")  # newly placed here: started

    async def later_runs() -> bool:
        vm = await cluster.vm("later")
        return vm.status.state == "Running" and vm.status.node == "host1"

    await eventually(later_runs, "later running on host1", timeout=DEADLINE)

    # A domain of a VM placed elsewhere appears on host1: it is destroyed.
    theirs = await cluster.vm("theirs")
    assert agent.host is not None
    await agent.host.define(build_domain_xml(agent.vm_reconciler.domain_spec(theirs)))
    await agent.host.start("theirs")

    async def gone() -> bool:
        return await domain_state(agent, "theirs") is None

    await eventually(gone, "the domain of theirs destroyed on host1", timeout=DEADLINE)
    assert await cluster.events("theirs", "DomainStoppedNotPlacedHere")


async def test_only_a_change_of_what_they_decide_on_reconciles_the_nodes_vms(
    cluster: Cluster, spans: InMemorySpanExporter
) -> None:
    """The agent's own status reports (every `status_interval`) reconcile none of its VMs; a
    spec change of its node does, once (`controller/agent_node.py`). Resyncs are an hour apart."""
    await cluster.add_node("host1")
    agent = await cluster.start_agent("host1", resync_period=3600, status_interval=0.2)
    await running_vm(cluster, "mine", "host1")
    last_version: str | None = None
    last_count, quiet = -1, 0

    async def five_reports_reconcile_nothing() -> bool:
        """A report the agent has cached (its handlers ran), with no reconcile since the last."""
        nonlocal last_version, last_count, quiet
        version = (await cluster.store.get("ClusterNode", "host1")).metadata.resource_version
        cached = agent.nodes.get("host1")
        if cached is None or cached.metadata.resource_version != version or version == last_version:
            return False
        count = reconciled(spans, "mine")
        quiet = quiet + 1 if count == last_count else 0
        last_version, last_count = version, count
        return quiet >= 5

    await eventually(five_reports_reconcile_nothing, "five quiet reports", timeout=DEADLINE)
    before = last_count
    node = await cluster.store.get("ClusterNode", "host1")
    assert isinstance(node, ClusterNode)
    node.spec.cordoned = True
    await apply_one(cluster.store, node)
    await eventually(
        lambda: reconciled(spans, "mine") > before, "mine reconciled", timeout=DEADLINE
    )
    assert reconciled(spans, "mine") == before + 1, "only the cordon reconciled mine"


async def test_the_filter_follows_placement_domains_and_migrations(store: Store) -> None:
    informers = SharedInformers(store, None)
    migrations = informers.informer("VirtualMachineMigration")
    informers.start()
    await informers.wait_for_sync()
    try:
        vms = NodeVms("host1", migrations)
        vm = await store.create(vm_object("vm1"))
        assert not vms.concerns(vm)

        vms.listed(["vm1"])  # a domain of it on the host
        assert vms.concerns(vm)
        vms.domain_event(LifecycleEvent("vm1", "uuid", LifecycleEventKind.UNDEFINED, "removed"))
        assert vms.concerns(vm), "one last look after it stops concerning the node"
        assert not vms.concerns(vm)

        vms.domain_event(LifecycleEvent("vm1", "uuid", LifecycleEventKind.STARTED, "booted"))
        assert vms.concerns(vm)
        vms.listed([])
        assert vms.concerns(vm) and not vms.concerns(vm)

        migration = VirtualMachineMigration(
            metadata=ObjectMeta(name="vm1-in"),
            spec=VirtualMachineMigrationSpec(vm="vm1", target_node="host1"),
        )
        await store.create(migration)
        await eventually(lambda: migrations.get("vm1-in") is not None, "the migration cached")
        assert vms.concerns(vm)
        await store.delete("VirtualMachineMigration", "vm1-in")
        await eventually(lambda: migrations.get("vm1-in") is None, "the migration gone")
        assert vms.concerns(vm) and not vms.concerns(vm)

        vm.status.placement = Placement(node="host1", token=1, since=now())
        assert vms.concerns(vm)
    finally:
        await informers.stop()
