"""Golden logs: every tests/scenarios/*.yaml runs through the real engine and simulator and must
print exactly its .log file. Regenerate with KVMCTL_UPDATE_GOLDEN=1 after an intended change
(and read the diff)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from controller.cli import simulate as simulate_cli
from controller.ha import scenario, scenario_run
from controller.ha.engine import Engine

SCENARIOS = Path(__file__).parent / "scenarios"
UPDATE = os.environ.get("KVMCTL_UPDATE_GOLDEN") == "1"


def scenario_files() -> list[Path]:
    return sorted(SCENARIOS.glob("*.yaml"))


def test_there_are_enough_scenarios() -> None:
    assert len(scenario_files()) >= 20


@pytest.mark.parametrize("path", scenario_files(), ids=lambda p: p.stem)
async def test_scenario_matches_golden_log(path: Path) -> None:
    sim = await scenario_run.run_scenario(scenario.load(path))
    produced = "\n".join(sim.lines + scenario_run.summary(sim)) + "\n"
    golden = path.with_suffix(".log")
    if UPDATE or not golden.exists():
        golden.write_text(produced, encoding="utf-8")
    assert sim.violations == []
    assert produced == golden.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", scenario_files(), ids=lambda p: p.stem)
async def test_an_engine_looking_every_tick_decides_the_same(path: Path) -> None:
    """The simulator wakes the loop only when it has news (or a timer fires): an engine that
    steps on every tick must print the same log."""
    sim = scenario_run.build(scenario.load(path))
    loaded = scenario.load(path)
    if loaded.description:
        sim.log("#", loaded.description)
    await scenario_run.simulate(sim, Engine, period=0.0)
    produced = "\n".join(sim.lines + scenario_run.summary(sim)) + "\n"
    assert produced == path.with_suffix(".log").read_text(encoding="utf-8")


async def test_cli_prints_the_log_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    simulate_cli.register(parser.add_subparsers())
    args = parser.parse_args(["simulate", str(SCENARIOS / "01-power-off-ipmi.yaml")])
    assert await args.func(args) == 0
    out = capsys.readouterr().out
    assert "NodeFenced: method ipmi confirmed power off" in out
    assert "invariant violations: 0" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: []", "nodes: at least one node is needed"),
        ("nodes: [{name: Host1}]", "nodes[0].name: expected a DNS-1123 name"),
        ("nodes: [{name: h1, colour: red}]", "nodes[0]: unknown field 'colour'"),
        (
            "nodes: [{name: h1}]\nvms: [{name: v1, memoryMiB: 64, node: h9}]",
            "vms[0].node: no node named 'h9'",
        ),
        ("nodes: [{name: h1}]\nvms: [{name: v1}]", "vms[0]: memoryMiB: Field required"),
        (
            "nodes: [{name: h1}]\ncommands: [{at: 1, do: explode h1}]",
            "commands[0]: unknown command 'explode'",
        ),
        (
            "nodes: [{name: h1}]\ncommands: [{at: 1, do: power-off h2}]",
            "commands[0]: no node named 'h2'",
        ),
        (
            "nodes: [{name: h1}]\ncommands: [{at: 1, do: fence-device h1 ipmi ok}]",
            "commands[0]: h1 has no fence method 'ipmi'",
        ),
        ("nodes: [{name: h1}]\ntimings: {leaseTtl: 1}", "timings: renew_interval"),
        ("nodes: [{name: h1}]\ntimings: {leaseTTL: 1}", "timings: unknown field 'leaseTTL'"),
        (
            "nodes:\n - name: h1\n   fencing: {methods: [{name: m, devices: [{agent: ipmi}]}]}",
            "nodes[0].fencing: methods[0].devices[0].agent",
        ),
        ("nodes: [", "not valid YAML"),
        ("nodes: [{name: h1}]\ncontrollers: [h2]", "controllers[0]: no node named 'h2'"),
        (
            "nodes: [{name: h1}]\ncommands: [{at: 1, do: etcd-election soon}]",
            "commands[0]: etcd-election takes seconds in (0, 60], got 'soon'",
        ),
        ("nodes: [{name: h1}]\ntimings: {suspectAfter: 0}", "timings: suspect_after must be > 0"),
    ],
)
def test_bad_scenarios_get_one_readable_error(text: str, message: str) -> None:
    with pytest.raises(scenario.ScenarioError) as error:
        scenario.parse(text, "bad.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("bad.yaml")
