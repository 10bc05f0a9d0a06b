"""The failover bench's runs and what it prints and writes of them: per series p50, p99 (nearest
rank), min, max and every step's median."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Any

from bench.stats import nearest_rank

VICTIM_STEPS = ("lease expired", "Unknown", "FencingStarted", "Fenced")
STEPS = (*VICTIM_STEPS[:1], "leader moved", *VICTIM_STEPS[1:], "placed", "qemu running")
"""Step names in about the order they happen; each run reports the time of each from the kill
("leader moved": the leader key taken by another controller, leader series only)."""


@dataclass
class Run:
    series: str
    victim: str
    target: str
    total: float
    steps: dict[str, float | None]


def summarise(runs: list[Run]) -> dict[str, Any]:
    totals = [run.total for run in runs]
    summary: dict[str, Any] = {
        "runs": len(runs),
        "p50": statistics.median(totals),
        "p99": nearest_rank(totals, 0.99),
        "min": min(totals),
        "max": max(totals),
        "step_medians": {},
    }
    for step in STEPS:
        values = [value for run in runs if (value := run.steps[step]) is not None]
        summary["step_medians"][step] = statistics.median(values) if values else None
    return summary


def report(
    runs: list[Run], args: argparse.Namespace, violations: int, stopped: str, incidents: list[str]
) -> dict[str, Any]:
    return {
        "stopped_early": stopped,
        "incidents": incidents,
        "topology": args.topology,
        "profile": args.profile,
        "path": args.path,
        "power_wait": args.power_wait,
        "two_copies_samples": violations,
        "series": {
            name: summarise([run for run in runs if run.series == name])
            for name in dict.fromkeys(run.series for run in runs)
        },
    }


def print_summary(summary: dict[str, Any]) -> None:
    print()
    for name, result in summary["series"].items():
        medians = ", ".join(
            f"{step} {value:.2f}s" for step, value in result["step_medians"].items() if value
        )
        print(
            f"{name}: kill -> qemu on another host p50 {result['p50']:.2f} s, "
            f"p99 {result['p99']:.2f} s, min {result['min']:.2f} s, max {result['max']:.2f} s "
            f"over {result['runs']} runs; step medians: {medians}"
        )
    print(f"two-copies samples (all series): {summary['two_copies_samples']}")
    for incident in summary["incidents"]:
        print(f"incident: {incident}")
