"""Scenario files for the simulator: nodes, VMs and timed commands (run by `scenario_run.py`).

    description: host1 loses power; its VM comes back on host2
    duration: 30
    nodes:
      - name: host1
        cpus: 8
        memoryMiB: 16384
        fencing:                    # ClusterNode spec.fencing, plus `simulate` per device
          methods:
            - name: ipmi
              devices:
                - agent: fence_ipmilan
                  parameters: {ip: 10.0.0.101}
                  simulate: {result: ok, seconds: 0.5}    # ok | fail | timeout
      - name: host2
    vms:
      - name: vm1
        node: host1                 # running there at time 0 (omit: the engine places it)
        memoryMiB: 1024             # any VirtualMachine spec field
    controllers: [host1, host2]     # optional: controllers on these hosts, the first leads
    admission: {hostFailuresTolerated: 1}   # optional: ClusterPolicy spec.admission
    commands:
      - {at: 5, do: power-off host1}

Optional top-level `timings` (HaTimings fields in camelCase: leaseTtl, renewInterval,
selfFenceMargin, recoveryGrace, watchdogTimeout, fenceRetryInitial, fenceRetryMax,
maxParallelMigrations, suspectAfter) and `simulation` (bootSeconds, startSeconds,
migrateSeconds, electionTtl). Without `controllers`, one controller runs outside the hosts.

Commands: power-off|power-on|network-off|network-on|agent-kill|agent-start|ack|cordon|
uncordon NODE; drain NODE [force]; fence-device NODE METHOD[/INDEX] ok|fail|timeout;
migrate VM NODE; crash|hang|start|stop|disable VM (hang: the guest stops answering its
`spec.health` checks); controller-restart; etcd-election SECONDS
(etcd has no leader that long, then extends every lease by its TTL); storage-cut|storage-restore
NODE vg|iscsi|file NAME (a storage path of the node breaks or comes back: `vg vg_cluster`,
`iscsi t1`, `file /var/lib/kvmctl/vm1.img`, as the VMs' disks name them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from crds import describe_validation_error
from crds.clusternode import ClusterNodeSpec, Fencing
from crds.clusterpolicy import AdmissionPolicy
from crds.virtualmachine import VirtualMachineSpec

from .environment import HaTimings
from .simulator import Host, SimDevice, SimSettings, SimVm

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file and the place."""


@dataclass
class Scenario:
    path: str
    description: str
    duration: float
    timings: HaTimings
    settings: SimSettings
    hosts: list[Host]
    vms: list[SimVm]
    commands: list[tuple[float, str]] = field(default_factory=list)
    controllers: list[str] = field(default_factory=list)
    admission: AdmissionPolicy | None = None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _dataclass_from(cls: Any, document: Any, where: str) -> Any:
    if document is None:
        return cls()
    if not isinstance(document, dict):
        raise ScenarioError(f"{where}: expected a mapping")
    names = {_camel(f.name): f.name for f in fields(cls)}
    unknown = sorted(set(document) - set(names))
    if unknown:
        raise ScenarioError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(names)})")
    values = {}
    for key, value in document.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{where}.{key}: expected a number, got {value!r}")
        values[names[key]] = value
    try:
        return cls(**values)
    except ValueError as error:
        raise ScenarioError(f"{where}: {error}") from None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a mapping")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ScenarioError(f"{where}: expected a list")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or len(value) > 63:
        raise ScenarioError(f"{where}.name: expected a DNS-1123 name, got {value!r}")
    return value


def _host(document: Any, index: int, where: str) -> Host:
    node = dict(_mapping(document, where))
    name = _name(node.pop("name", None), where)
    cpus = node.pop("cpus", None)
    memory = node.pop("memoryMiB", None)
    powered = node.pop("powered", True)
    cordoned = node.pop("cordoned", False)
    fencing = _mapping(node.pop("fencing", None) or {}, f"{where}.fencing")
    if node:
        raise ScenarioError(f"{where}: unknown field {sorted(node)[0]!r}")
    for key, value in (("cpus", cpus), ("memoryMiB", memory)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ScenarioError(f"{where}.{key}: expected a positive integer, got {value!r}")
    if not isinstance(powered, bool) or not isinstance(cordoned, bool):
        raise ScenarioError(f"{where}: powered and cordoned must be true or false")
    devices: dict[str, list[SimDevice]] = {}
    clean_methods = []
    for m_index, method in enumerate(_list(fencing.get("methods"), f"{where}.fencing.methods")):
        method_where = f"{where}.fencing.methods[{m_index}]"
        method = dict(_mapping(method, method_where))
        clean_devices = []
        sims = []
        for d_index, device in enumerate(_list(method.get("devices"), f"{method_where}.devices")):
            device_where = f"{method_where}.devices[{d_index}]"
            device = dict(_mapping(device, device_where))
            simulate = _mapping(device.pop("simulate", None) or {}, f"{device_where}.simulate")
            sims.append(_device(device, simulate, f"{device_where}.simulate"))
            clean_devices.append(device)
        method["devices"] = clean_devices
        clean_methods.append(method)
        if isinstance(method.get("name"), str):
            devices[method["name"]] = sims
    fencing = {**fencing, "methods": clean_methods}
    try:
        spec = ClusterNodeSpec.model_validate(
            {
                "addresses": {"cluster": f"10.0.{index // 250}.{index % 250 + 1}"},
                "cordoned": cordoned,
                "fencing": Fencing.model_validate(fencing),
            }
        )
    except ValidationError as error:
        raise ScenarioError(f"{where}.fencing: {describe_validation_error(error)}") from None
    for method_name, sims in devices.items():
        for sim, device in zip(
            sims,
            next(m for m in spec.fencing.methods if m.name == method_name).devices,
            strict=True,
        ):
            sim.timeout = float(device.timeout_seconds)
    host = Host(name=name, spec=spec, cpus=cpus, memory_mib=memory, devices=devices)
    if not powered:
        host.powered = host.agent = False
        host.last_renewal = None
        host.health = "Unknown"
    return host


def _device(device: dict[str, Any], simulate: dict[str, Any], where: str) -> SimDevice:
    result = simulate.pop("result", "ok")
    seconds = simulate.pop("seconds", 0.5)
    if simulate:
        raise ScenarioError(f"{where}: unknown field {sorted(simulate)[0]!r}")
    if result not in ("ok", "fail", "timeout"):
        raise ScenarioError(f"{where}.result: expected ok, fail or timeout, got {result!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ScenarioError(f"{where}.seconds: expected a number >= 0, got {seconds!r}")
    return SimDevice(agent=str(device.get("agent")), behaviour=result, seconds=float(seconds))


def _vm(document: Any, hosts: dict[str, Host], where: str) -> SimVm:
    vm = dict(_mapping(document, where))
    name = _name(vm.pop("name", None), where)
    node = vm.pop("node", None)
    if node is not None and node not in hosts:
        raise ScenarioError(f"{where}.node: no node named {node!r}")
    try:
        spec = VirtualMachineSpec.model_validate(vm)
    except ValidationError as error:
        raise ScenarioError(f"{where}: {describe_validation_error(error)}") from None
    if node is not None and not hosts[node].powered:
        raise ScenarioError(f"{where}.node: {node} is powered off at time 0")
    return SimVm(name=name, spec=spec, placement=node)


_NODE_VERBS = {
    "power-off",
    "power-on",
    "network-off",
    "network-on",
    "agent-kill",
    "agent-start",
    "ack",
    "cordon",
    "uncordon",
    "drain",
    "fence-device",
    "storage-cut",
    "storage-restore",
}
_VM_VERBS = {"migrate", "crash", "hang", "start", "stop", "disable"}
VERBS = sorted(_NODE_VERBS | _VM_VERBS | {"controller-restart", "etcd-election"})


def _check_command(text: str, scenario: Scenario, where: str) -> None:
    words = text.split()
    if not words or words[0] not in VERBS:
        verb = words[0] if words else ""
        raise ScenarioError(f"{where}: unknown command {verb!r} (known: {', '.join(VERBS)})")
    verb, args = words[0], words[1:]
    hosts = {h.name: h for h in scenario.hosts}
    vms = {v.name for v in scenario.vms}
    usage = {
        "drain": (1, 2),
        "fence-device": (3, 3),
        "storage-cut": (3, 3),
        "storage-restore": (3, 3),
        "migrate": (2, 2),
        "controller-restart": (0, 0),
    }.get(verb, (1, 1))
    if not usage[0] <= len(args) <= usage[1]:
        raise ScenarioError(f"{where}: {verb!r} takes {usage[0]} to {usage[1]} arguments")
    if verb == "etcd-election":
        try:
            seconds = float(args[0])
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 60:
            raise ScenarioError(f"{where}: etcd-election takes seconds in (0, 60], got {args[0]!r}")
    if verb in _NODE_VERBS and args[0] not in hosts:
        raise ScenarioError(f"{where}: no node named {args[0]!r}")
    if verb in _VM_VERBS and args[0] not in vms:
        raise ScenarioError(f"{where}: no VM named {args[0]!r}")
    if verb == "migrate" and args[1] not in hosts:
        raise ScenarioError(f"{where}: no node named {args[1]!r}")
    if verb.startswith("storage-") and args[1] not in ("vg", "iscsi", "file"):
        raise ScenarioError(f"{where}: {verb} takes NODE vg|iscsi|file NAME, got {args[1]!r}")
    if verb == "drain" and len(args) == 2 and args[1] != "force":
        raise ScenarioError(f"{where}: drain takes NODE [force], got {args[1]!r}")
    if verb == "fence-device":
        method, _, index = args[1].partition("/")
        devices = hosts[args[0]].devices.get(method)
        if devices is None:
            raise ScenarioError(f"{where}: {args[0]} has no fence method {method!r}")
        if index and (not index.isdigit() or int(index) >= len(devices)):
            raise ScenarioError(f"{where}: method {method!r} has no device {index!r}")
        if args[2] not in ("ok", "fail", "timeout"):
            raise ScenarioError(f"{where}: device behaviour must be ok, fail or timeout")


def parse(text: str, path: str = "<scenario>") -> Scenario:
    """Validate a scenario document; raises ScenarioError naming the file and field."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ScenarioError(f"{path}: not valid YAML: {error}") from None
    return from_document(document, path)


def from_document(document: Any, path: str = "<scenario>") -> Scenario:
    """`parse` for an already loaded document (a program building a big scenario)."""
    document = dict(_mapping(document, path))
    description = str(document.pop("description", ""))
    duration = document.pop("duration", 60)
    if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
        raise ScenarioError(f"{path}: duration: expected a positive number of seconds")
    timings = _dataclass_from(HaTimings, document.pop("timings", None), f"{path}: timings")
    settings = _dataclass_from(SimSettings, document.pop("simulation", None), f"{path}: simulation")
    hosts = [
        _host(node, index, f"{path}: nodes[{index}]")
        for index, node in enumerate(_list(document.pop("nodes", None), f"{path}: nodes"))
    ]
    if not hosts:
        raise ScenarioError(f"{path}: nodes: at least one node is needed")
    by_name = {h.name: h for h in hosts}
    if len(by_name) != len(hosts):
        raise ScenarioError(f"{path}: nodes: names must be distinct")
    vms = [
        _vm(vm, by_name, f"{path}: vms[{index}]")
        for index, vm in enumerate(_list(document.pop("vms", None), f"{path}: vms"))
    ]
    if len({v.name for v in vms}) != len(vms):
        raise ScenarioError(f"{path}: vms: names must be distinct")
    raw_commands = _list(document.pop("commands", None), f"{path}: commands")
    controllers = _list(document.pop("controllers", None), f"{path}: controllers")
    admission = document.pop("admission", None)
    if document:
        raise ScenarioError(f"{path}: unknown field {sorted(document)[0]!r}")
    for index, name in enumerate(controllers):
        if name not in by_name:
            raise ScenarioError(f"{path}: controllers[{index}]: no node named {name!r}")
        if not by_name[name].powered:
            raise ScenarioError(f"{path}: controllers[{index}]: {name} is powered off at time 0")
    if len(set(controllers)) != len(controllers):
        raise ScenarioError(f"{path}: controllers: names must be distinct")
    scenario = Scenario(path, description, float(duration), timings, settings, hosts, vms)
    scenario.controllers = list(controllers)
    if admission is not None:
        try:
            scenario.admission = AdmissionPolicy.model_validate(admission)
        except ValidationError as error:
            raise ScenarioError(f"{path}: admission: {describe_validation_error(error)}") from None
    for index, entry in enumerate(raw_commands):
        where = f"{path}: commands[{index}]"
        entry = _mapping(entry, where)
        at, command = entry.get("at"), entry.get("do")
        if set(entry) != {"at", "do"} or not isinstance(command, str):
            raise ScenarioError(f"{where}: expected {{at: SECONDS, do: COMMAND}}")
        if isinstance(at, bool) or not isinstance(at, int | float) or not 0 <= at <= duration:
            raise ScenarioError(f"{where}.at: expected seconds between 0 and {duration}")
        _check_command(command, scenario, where)
        scenario.commands.append((float(at), command))
    return scenario


def load(path: str | Path) -> Scenario:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioError(f"{path}: cannot read: {error}") from None
    return parse(text, str(path))
