"""Mass failover on real parts: a host of ten holding 25 VMs loses power; the real controller
fences it with fence_dummy, then every one of its VMs runs on another host, never on two at once
(tests/support/rack.py). Behaviour only: the figures at scale are bench/rack_bench.py's."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.runtime.store import Store
from e2e.harness.polling import eventually
from tests.support.ha import get_node, recorded, start_controller, stop_controller
from tests.support.rack import RACK_TIMINGS, FailoverChecker, Rack

HOSTS = 10
ON_VICTIM = 25
ELSEWHERE = 18
DEADLINE = 120.0


async def test_a_host_losing_power_has_each_of_its_vms_run_once_elsewhere_after_its_fence(
    store: Store, etcd_endpoints: list[str], key_prefix: str, tmp_path: Path
) -> None:
    rack = Rack(store, tmp_path, HOSTS)
    manager, task = await start_controller(etcd_endpoints, key_prefix, "ctl-1", RACK_TIMINGS)
    checker = FailoverChecker(rack)
    checking: asyncio.Task[None] | None = None
    try:
        await rack.start_hosts()
        await rack.create_vms(ON_VICTIM, ELSEWHERE)
        before = await eventually(rack.all_running, "every VM running", timeout=DEADLINE)
        on_victim = {vm.metadata.name for vm in before if vm.status.node == rack.victim}
        assert on_victim == set(rack.victim_vms)

        checking = asyncio.create_task(checker.run())
        await rack.cut_power()
        after = await eventually(rack.victims_moved, "the victim's VMs elsewhere", timeout=DEADLINE)
        await checker.sample()  # one last look, with every VM running

        assert checker.violations == []
        assert checker.samples > 1
        assert {vm.metadata.name for vm in after} == set(rack.victim_vms)
        node = await get_node(store, rack.victim)
        assert node.status.health == "Fenced"
        assert node.status.fence is not None and node.status.fence.method == "dummy"
        assert rack.power.read_text().strip() == "off"
        fenced = {"NodeLost", "FencingStarted", "NodeFenced"}
        await eventually(
            lambda: recorded(store, "ClusterNode", rack.victim, fenced), "fencing events"
        )
    finally:
        if checking is not None:
            checking.cancel()
        await rack.close()
        await stop_controller(manager, task)
