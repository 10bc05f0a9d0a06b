"""`kvmctl simulate SCENARIO.yaml`: run the HA engine against simulated hosts, print the log."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="run the HA decision engine on a scenario with a virtual clock",
        description=(
            "Run the HA engine against simulated nodes, fence devices and a virtual clock, "
            "and print a time-stamped log. Exit 1 if an invariant was violated."
        ),
    )
    simulate.add_argument("scenario", metavar="SCENARIO.yaml")
    simulate.add_argument(
        "--no-summary", action="store_true", help="omit the end state after the log"
    )
    simulate.set_defaults(func=run_simulate)


async def run_simulate(args: argparse.Namespace) -> int:
    # Imported here, like the daemons' code: other commands start faster without it.
    from controller.ha import scenario, scenario_run

    loaded = scenario.load(args.scenario)
    sim = await scenario_run.run_scenario(loaded, echo=lambda line: print(line, flush=True))
    if not args.no_summary:
        for line in scenario_run.summary(sim):
            print(line)
    return 1 if sim.violations else 0
