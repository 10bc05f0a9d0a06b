"""The HA simulator at scale: wall time of a big simulated cluster losing a host, and the
engine's step time at that size.

Run: `python -m bench.sim_bench [--nodes 100] [--vms 5000] [--seconds 60] [--runs 5]`. Method:
`--nodes` hosts (256 vcpus, 256 GiB, one IPMI fence method each, 0.5 s to confirm off), `--vms`
VMs (1 vcpu, 1 GiB, one logical volume each) spread evenly and running at time 0, one external
controller; host `n001` loses power at 10 s and its VMs are recovered on the others. Each run
builds the simulator from the parsed scenario (not timed) and times `scenario_run.simulate` to the
end of `--seconds` of virtual time (the real engine and agent rules, invariants checked every
tick). Prints the best and median wall time over `--runs`, the number of engine steps and their
p50 / max (`time.perf_counter` around `Engine.step`), and checks the outcome: no invariant
violation and every VM running exactly once. Nothing is asserted about speed (figures live in
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from controller.ha import scenario, scenario_run
from controller.ha.engine import Engine
from controller.ha.environment import Action, World

VICTIM = "n001"
CUT_AT = 10


def cluster(nodes: int, vms: int, seconds: float) -> dict[str, Any]:
    """The scenario document of the benchmark."""
    hosts = []
    for index in range(nodes):
        device = {
            "agent": "fence_ipmilan",
            "parameters": {"ip": f"192.0.2.{index % 250 + 1}"},
            "simulate": {"result": "ok", "seconds": 0.5},
        }
        hosts.append(
            {
                "name": f"n{index:03d}",
                "cpus": 256,
                "memoryMiB": 262144,
                "fencing": {"methods": [{"name": "ipmi", "devices": [device]}]},
            }
        )
    guests = [
        {
            "name": f"vm{index:05d}",
            "node": f"n{index % nodes:03d}",
            "memoryMiB": 1024,
            "disks": [{"volume": f"vg/lv{index}"}],
        }
        for index in range(vms)
    ]
    commands = [{"at": CUT_AT, "do": f"power-off {VICTIM}"}]
    return {"duration": seconds, "nodes": hosts, "vms": guests, "commands": commands}


class TimedEngine(Engine):
    """The engine as the simulator runs it, with the wall time of every step recorded."""

    steps: list[float] = []

    def step(self, world: World) -> list[Action]:
        started = time.perf_counter()
        actions = super().step(world)
        TimedEngine.steps.append(time.perf_counter() - started)
        return actions


def one_run(document: dict[str, Any]) -> tuple[float, list[float]]:
    sim = scenario_run.build(scenario.from_document(document, "sim_bench"))
    TimedEngine.steps = []
    started = time.perf_counter()
    asyncio.run(scenario_run.simulate(sim, TimedEngine))
    wall = time.perf_counter() - started
    if sim.violations:
        raise RuntimeError(f"invariant violations: {sim.violations[:3]}")
    wrong = [vm.name for vm in sim.vms.values() if len(sim.running_hosts(vm.name)) != 1]
    if wrong:
        raise RuntimeError(f"{len(wrong)} VMs do not run exactly once, e.g. {wrong[:3]}")
    return wall, TimedEngine.steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--vms", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    document = cluster(args.nodes, args.vms, args.seconds)
    print(
        f"method: {args.nodes} nodes x {args.vms} VMs, {args.seconds:g} s virtual, power cut of "
        f"{VICTIM} at {CUT_AT} s (IPMI fence); wall time of scenario_run.simulate, {args.runs} runs"
    )
    walls, steps = [], []
    for run in range(args.runs):
        wall, run_steps = one_run(document)
        walls.append(wall)
        steps.extend(run_steps)
        print(f"run {run + 1}: {wall:.2f} s wall, {len(run_steps)} engine steps", flush=True)
    steps.sort()
    print(f"wall: best {min(walls):.2f} s, median {statistics.median(walls):.2f} s")
    print(
        f"engine step: p50 {statistics.median(steps) * 1000:.1f} ms, "
        f"max {steps[-1] * 1000:.1f} ms (n={len(steps)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
