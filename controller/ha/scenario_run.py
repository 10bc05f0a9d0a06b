"""Running a scenario (`scenario.py`) in the simulator: its commands as simulator calls, the
engine restarted with every new leader, the end state."""

from __future__ import annotations

import math
from collections.abc import Callable

from .engine import Engine
from .engine_loop import run
from .environment import HaTimings
from .scenario import Scenario
from .simulator import Simulator


def command_action(sim: Simulator, command: str) -> Callable[[], None]:
    """The simulator call a (validated) command stands for, logging it when it runs."""
    verb, *args = command.split()
    actions: dict[str, Callable[[], None]] = {
        "power-off": lambda: sim.power_off(args[0]),
        "power-on": lambda: sim.power_on(args[0]),
        "network-off": lambda: sim.set_network(args[0], up=False),
        "network-on": lambda: sim.set_network(args[0], up=True),
        "agent-kill": lambda: sim.kill_agent(args[0]),
        "agent-start": lambda: sim.start_agent(args[0]),
        "ack": lambda: sim.ack(args[0]),
        "cordon": lambda: sim.cordon(args[0], cordoned=True),
        "uncordon": lambda: sim.cordon(args[0], cordoned=False),
        "drain": lambda: sim.drain(args[0], force=args[1:] == ["force"]),
        "migrate": lambda: sim.request_migration(args[0], args[1]),
        "crash": lambda: sim.crash(args[0]),
        "hang": lambda: sim.hang(args[0]),
        "start": lambda: sim.set_run_state(args[0], "started"),
        "stop": lambda: sim.set_run_state(args[0], "stopped"),
        "disable": lambda: sim.set_run_state(args[0], "disabled"),
        "controller-restart": sim.restart_controller,
        "etcd-election": lambda: sim.etcd_election(float(args[0])),
        "storage-cut": lambda: sim.set_storage(args[0], " ".join(args[1:]), lost=True),
        "storage-restore": lambda: sim.set_storage(args[0], " ".join(args[1:]), lost=False),
    }
    if verb == "fence-device":
        method, _, index = args[1].partition("/")
        actions[verb] = lambda: sim.set_device(
            args[0], method, int(index) if index else None, args[2]
        )

    def run_command() -> None:
        sim.log(">", command)
        actions[verb]()

    return run_command


async def simulate(
    sim: Simulator,
    new_engine: Callable[[HaTimings], Engine] = Engine,
    period: float = math.inf,
) -> None:
    """Run the engine against the simulator until its end, with a fresh engine (`new_engine`)
    after every controller restart (as a new leader would start). No periodic step by
    default: the simulator wakes the loop whenever something the engine sees changed; with
    `period` 0 the engine steps on every tick."""
    while True:
        await run(new_engine(sim.timings), sim, period=period, idle_period=period)
        await sim.until_leading()
        if sim.finished:
            return
        sim.log("controller", "new leader: engine restarted with no memory")


def build(scenario: Scenario, echo: Callable[[str], None] | None = None) -> Simulator:
    sim = Simulator(
        scenario.hosts,
        scenario.vms,
        scenario.timings,
        scenario.settings,
        scenario.duration,
        echo,
        scenario.controllers,
    )
    sim.admission = scenario.admission
    for at, command in scenario.commands:
        sim.at(at, command_action(sim, command))
    return sim


def summary(sim: Simulator) -> list[str]:
    """The end state: node health, where each VM runs, invariant violations."""
    lines = [f"--- end at {sim.now():.1f}"]
    for host in sim.hosts.values():
        how = f" ({host.fence.how})" if host.fence is not None else ""
        power = "on" if host.powered else "off"
        lines.append(f"node {host.name}: {host.health}{how}, power {power}")
    for vm in sim.vms.values():
        running = ", ".join(sim.running_hosts(vm.name)) or "nowhere"
        failed = " Failed" if vm.failed else ""
        lines.append(f"vm {vm.name}: placed {vm.placement or '-'}, running on {running}{failed}")
    lines.append(f"invariant violations: {len(sim.violations)}")
    return lines


async def run_scenario(
    scenario: Scenario,
    echo: Callable[[str], None] | None = None,
    new_engine: Callable[[HaTimings], Engine] = Engine,
) -> Simulator:
    """Run a scenario to its end; the log is in `.lines` (plus `summary(sim)`)."""
    sim = build(scenario, echo)
    if scenario.description:
        sim.log("#", scenario.description)
    await simulate(sim, new_engine)
    return sim
