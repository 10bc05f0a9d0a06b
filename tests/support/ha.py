"""The HA controller on real parts for the tests: short engine timings, heartbeat leases held
and dropped as an agent would, controllers started and stopped, and the objects and reports the
HA tests write and read (tests/test_ha_production.py, test_ha_detection.py and others)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controller.ha.controller import build_manager
from controller.ha.environment import HaTimings
from controller.runtime import layout_keys
from controller.runtime.leader_record import ElectionTiming, current_leader
from controller.runtime.manager import Manager
from controller.runtime.store import Store
from crds import ClusterNode, Event, ObjectMeta, Secret, VirtualMachine
from crds.clusternode import ClusterNodeSpec
from crds.secret import SecretSpec
from crds.virtualmachine import VirtualMachineSpec
from reconcilers.drivers.fence import FenceRunner
from reconcilers.drivers.fence_policy import DEFAULT_AGENTS, FencePolicy

T = TypeVar("T")

TIMINGS = HaTimings(fence_retry_initial=0.5, fence_retry_max=2.0)
"""kvmctl's defaults, but a failed fence is retried within seconds, not half a minute."""
ELECTION = ElectionTiming.for_ttl(10)
"""No test here needs a leader's lease to expire (handovers are resigns, which take effect at
once), so the term is long: a stall of the loaded test machine must not move leadership."""
DEADLINE = 40.0
TEST_POLICY = FencePolicy(
    agents=DEFAULT_AGENTS | {"fence_dummy"},
    allowed_parameters=frozenset({("fence_dummy", "status_file")}),
)
"""The test controllers may run fence_dummy, and give it its status file."""


class Leases:
    """Heartbeat keys on real etcd leases, renewed as an agent does; `drop` revokes one."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._leases: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def hold(self, node: str) -> None:
        client = self.store.client
        lease = await client.lease(int(TIMINGS.lease_ttl))
        key = self.store.raw_key(layout_keys.heartbeat(node))
        await client.put(key, b"{}", lease=lease.id)
        self._leases[node] = lease.id
        self._tasks[node] = asyncio.create_task(self._renew(lease.id))

    async def _renew(self, lease_id: int) -> None:
        while True:
            await asyncio.sleep(TIMINGS.renew_interval)
            await self.store.client.refresh_lease(lease_id)

    async def drop(self, node: str) -> None:
        task = self._tasks.pop(node)
        task.cancel()
        await asyncio.wait({task})
        await self.store.client.revoke_lease(self._leases.pop(node))

    async def close(self) -> None:
        for node in list(self._tasks):
            with contextlib.suppress(Exception):
                await self.drop(node)


@pytest.fixture
async def leases(store: Store) -> AsyncIterator[Leases]:
    held = Leases(store)
    yield held
    await held.close()


async def start_controller(
    etcd_endpoints: list[str], key_prefix: str, identity: str, timings: HaTimings = TIMINGS
) -> tuple[Manager, asyncio.Task[None]]:
    store = Store(etcd_endpoints, key_prefix)
    await store.connect()
    manager = build_manager(
        store,
        identity=identity,
        timings=timings,
        election_timing=ELECTION,
        http_port=None,
        fence_runner=FenceRunner(policy=TEST_POLICY),
    )
    task = asyncio.create_task(manager.run(handle_signals=False))
    return manager, task


async def stop_controller(manager: Manager, task: asyncio.Task[None]) -> None:
    manager.stop()
    async with asyncio.timeout(30):
        await task  # re-raises a failure of the manager


@pytest.fixture
async def controller(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Manager]:
    manager, task = await start_controller(etcd_endpoints, key_prefix, "ctl-1")
    try:
        yield manager
    finally:
        await stop_controller(manager, task)


def node_object(name: str, fencing: dict[str, Any] | None = None) -> ClusterNode:
    spec: dict[str, Any] = {"addresses": {"cluster": "127.0.0.1"}}
    if fencing is not None:
        spec["fencing"] = fencing
    return ClusterNode(metadata=ObjectMeta(name=name), spec=ClusterNodeSpec.model_validate(spec))


def vm_object(name: str, **spec: Any) -> VirtualMachine:
    document = {
        "memoryMiB": 64,
        "failoverDomain": {"ordered": True, "nodes": [{"name": "a"}, {"name": "b", "priority": 2}]},
        **spec,
    }
    return VirtualMachine(
        metadata=ObjectMeta(name=name), spec=VirtualMachineSpec.model_validate(document)
    )


def dummy_fencing(**parameters: Any) -> dict[str, Any]:
    device: dict[str, Any] = {"agent": "fence_dummy", "timeoutSeconds": 20}
    device.update(parameters)
    return {"methods": [{"name": "dummy", "devices": [device]}]}


async def power_fenced_node(
    store: Store,
    tmp_path: Path,
    node: str,
    secret_of: str,
    storage_loss: dict[str, Any] | None = None,
) -> Path:
    """ClusterNode `node` fenced by fence_dummy through a power file ("on" now), the file named
    by a Secret labelled for node `secret_of` (`node` itself, or another to test the refusal);
    `storage_loss`: its `spec.fencing.storageLoss`."""
    power = tmp_path / f"{node}.power"
    power.write_text("on")
    secret = Secret(
        metadata=ObjectMeta(name=f"fence-{secret_of}", labels={"kvmctl.io/node": secret_of}),
        spec=SecretSpec(data={"file": str(power)}),
    )
    await store.create(secret)
    reference = {"name": f"fence-{secret_of}", "key": "file"}
    fencing = dummy_fencing(secretParameters={"status_file": reference})
    if storage_loss is not None:
        fencing["storageLoss"] = storage_loss
    await store.create(node_object(node, fencing))
    return power


async def get_vm(store: Store, name: str) -> VirtualMachine:
    return await store.get(VirtualMachine, name)


async def get_node(store: Store, name: str) -> ClusterNode:
    return await store.get(ClusterNode, name)


async def placed_on(store: Store, vm: str, node: str) -> VirtualMachine | None:
    current = await get_vm(store, vm)
    placement = current.status.placement
    return current if placement is not None and placement.node == node else None


async def report_running(store: Store, vm: str, node: str) -> None:
    """What the agent of `node` writes once the VM's domain runs there."""

    def running(current: Any) -> bool:
        current.status.node = node
        current.status.state = "Running"
        return True

    await store.patch_status("VirtualMachine", vm, running)


async def events_of(store: Store, kind: str, name: str) -> list[Event]:
    events, _ = await store.list_objects("Event")
    return [
        e
        for e in events
        if isinstance(e, Event)
        and e.spec.involved_object.kind == kind
        and e.spec.involved_object.name == name
    ]


async def reasons(store: Store, kind: str, name: str) -> set[str]:
    return {e.spec.reason for e in await events_of(store, kind, name)}


async def recorded(store: Store, kind: str, name: str, expected: set[str]) -> bool:
    """Whether events with every reason in `expected` were recorded about `kind` `name`."""
    return expected <= await reasons(store, kind, name)


async def leader_token(store: Store) -> int:
    leader = await current_leader(store.client, f"{store.prefix}/leader/controller")
    assert leader is not None
    return leader.token
