"""The controller's view of the cluster as state gauges: `kvmctl_node_health{node,health}`,
`kvmctl_vm_state{vm,node,state,desired}` and `kvmctl_etcd_member_up{member,endpoint}`.

Like kube-state-metrics, each object gives one series per possible value, 1 for its current one
and 0 for the others, so an alert can ask `kvmctl_node_health{health="Fenced"} == 1` and a
dashboard can sum by value. They are read from the manager's caches at each scrape (every
controller instance, leader or standby, shows the same etcd: aggregate with `max by`).

A VM's `node` is its placement ("" while unplaced); its `state` is what the agent of that node
last reported, or `Unknown` while no report from there came since it was placed; `desired` is
`spec.runState`, so "should run but does not" is `{desired="started", state="Running"} == 0`.

etcd's members are probed every `ETCD_PROBE_INTERVAL` as `kvmctl status` does
(`controller/runtime/etcd_health.py`); a scrape shows the last probe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import get_args

from controller.runtime import telemetry
from controller.runtime.etcd_health import etcd_health
from controller.runtime.informer import SharedInformers
from controller.runtime.manager import Background
from controller.runtime.store import Store
from crds import ClusterNode, VirtualMachine
from crds.clusternode import NodeHealth
from crds.virtualmachine import VirtualMachineStatus

log = logging.getLogger(__name__)

NODE_HEALTHS: tuple[str, ...] = get_args(NodeHealth)
VM_STATES: tuple[str, ...] = get_args(VirtualMachineStatus.model_fields["state"].annotation)
ETCD_PROBE_INTERVAL = 10.0
"""Seconds between two probes of every etcd member."""


def node_health_samples(nodes: Iterable[object]) -> list[tuple[float, dict[str, str]]]:
    samples = []
    for node in nodes:
        if isinstance(node, ClusterNode):
            for health in NODE_HEALTHS:
                value = 1.0 if node.status.health == health else 0.0
                samples.append((value, {"node": node.metadata.name, "health": health}))
    return samples


def vm_state_samples(vms: Iterable[object]) -> list[tuple[float, dict[str, str]]]:
    samples = []
    for vm in vms:
        if not isinstance(vm, VirtualMachine):
            continue
        status = vm.status
        node = "" if status.placement is None else status.placement.node
        reported_there = not node or status.node == node
        current = status.state if reported_there else "Unknown"
        for state in VM_STATES:
            labels = {
                "vm": vm.metadata.name,
                "node": node,
                "state": state,
                "desired": vm.spec.run_state,
            }
            samples.append((1.0 if current == state else 0.0, labels))
    return samples


def state_metrics(informers: SharedInformers) -> Background:
    """A manager background task that reports both gauges from `informers` while it runs."""
    nodes = informers.informer("ClusterNode")
    vms = informers.informer("VirtualMachine")

    async def run() -> None:
        gauges: list[tuple[telemetry.StateGauge, telemetry.Samples]] = [
            ("node_health", lambda: node_health_samples(nodes.list())),
            ("vm_state", lambda: vm_state_samples(vms.list())),
        ]
        for gauge, samples in gauges:
            telemetry.watch_states(gauge, samples)
        try:
            await asyncio.Event().wait()
        finally:
            for gauge, samples in gauges:
                telemetry.forget_states(gauge, samples)

    return Background("state metrics", run)


def etcd_member_metrics(store: Store, interval: float = ETCD_PROBE_INTERVAL) -> Background:
    """A manager background task probing every etcd member for `kvmctl_etcd_member_up`."""
    last: list[tuple[float, dict[str, str]]] = []

    def samples() -> list[tuple[float, dict[str, str]]]:
        return list(last)

    async def run() -> None:
        telemetry.watch_states("etcd_member_up", samples)
        try:
            while True:
                try:
                    health = await etcd_health(store, store.tls)
                except Exception as error:  # a metric must never stop the controller
                    log.warning("etcd members not probed: %s", error)
                else:
                    last[:] = [
                        (1.0 if m.healthy else 0.0, {"member": m.name, "endpoint": m.endpoint})
                        for m in health.members
                    ]
                await asyncio.sleep(interval)
        finally:
            telemetry.forget_states("etcd_member_up", samples)

    return Background("etcd member metrics", run)
