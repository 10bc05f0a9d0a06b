"""How `kvmctl get` shows objects: borderless columns per kind, or YAML, JSON, names."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from controller import jsonpath
from crds import KINDS, AnyResource
from crds.meta import Status


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Any], object]
    wide_only: bool = False


def age(moment: datetime | None) -> str:
    """kubectl-style age: 45s, 12m, 5h, 3d."""
    if moment is None:
        return "<unknown>"
    seconds = int((datetime.now(UTC) - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def size(value: float) -> str:
    """Bytes in binary units: 512B, 3.2Ki, 45.0Mi, 1.5Gi."""
    for unit, scale in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}B"


def ready(status: Status) -> str:
    condition = status.condition("Ready")
    return condition.status if condition else "Unknown"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value}Mi"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 30):.1f}Gi"


def _or_dash(value: object) -> object:
    return "-" if value in (None, "", []) else value


_AGE = Column("AGE", lambda o: age(o.metadata.creation_timestamp))
_READY = Column("READY", lambda o: ready(o.status))

COLUMNS: dict[str, list[Column]] = {
    "ClusterNode": [
        Column("HEALTH", lambda o: o.status.health),
        Column("CORDONED", lambda o: "yes" if o.spec.cordoned else "no"),
        Column("ADDRESS", lambda o: o.spec.addresses.cluster),
        Column("CPUS", lambda o: _or_dash(o.status.capacity and o.status.capacity.cpus)),
        Column("MEMORY", lambda o: _mib(o.status.capacity and o.status.capacity.memory_mib)),
        _AGE,
        Column("FENCING", lambda o: ",".join(m.name for m in o.spec.fencing.methods) or "-", True),
        Column("SELF-FENCE", lambda o: "yes" if o.spec.fencing.self_fence else "no", True),
        Column("VERSION", lambda o: _or_dash(o.status.agent_version), True),
    ],
    "VirtualMachine": [
        Column("STATE", lambda o: o.status.state),
        Column("NODE", lambda o: _or_dash(o.status.node)),
        Column("RUN", lambda o: o.spec.run_state),
        Column("VCPUS", lambda o: o.spec.vcpus),
        Column("MEMORY", lambda o: _mib(o.spec.memory_mib)),
        _READY,
        _AGE,
        Column("PLACED", lambda o: o.status.placement.node if o.status.placement else "-", True),
        Column("PRIORITY", lambda o: o.spec.priority, True),
        Column("RESTARTS", lambda o: len(o.status.restarts), True),
        Column("RELOCATIONS", lambda o: o.status.relocations, True),
    ],
    "Bond": [
        Column("NODE", lambda o: o.spec.node),
        Column("INTERFACE", lambda o: o.spec.interface),
        Column("MODE", lambda o: o.spec.mode),
        Column("ACTIVE", lambda o: _or_dash(o.status.active_slave)),
        _READY,
        _AGE,
        Column("SLAVES", lambda o: ",".join(o.spec.slaves), True),
        Column("BRIDGE", lambda o: o.spec.bridge.name if o.spec.bridge else "-", True),
    ],
    "IscsiTarget": [
        Column("NODE", lambda o: o.spec.node),
        Column("IQN", lambda o: o.spec.iqn),
        Column("LUNS", lambda o: len(o.spec.luns)),
        Column("SESSIONS", lambda o: len(o.status.sessions)),
        _READY,
        _AGE,
        Column("PORTAL", lambda o: o.spec.portal, True),
    ],
    "VolumeGroup": [
        Column("VG", lambda o: o.spec.vg_name),
        Column("LVS", lambda o: len(o.spec.logical_volumes)),
        Column("SIZE", lambda o: _gib(o.status.size_bytes)),
        Column("FREE", lambda o: _gib(o.status.free_bytes)),
        _READY,
        _AGE,
    ],
    "VirtualMachineMigration": [
        Column("VM", lambda o: o.spec.vm),
        Column("SOURCE", lambda o: _or_dash(o.status.source_node)),
        Column("TARGET", lambda o: o.spec.target_node),
        Column("PHASE", lambda o: o.status.phase),
        Column("PROGRESS", lambda o: f"{o.status.progress_percent}%"),
        _AGE,
    ],
    "GitSync": [
        Column("REPO", lambda o: o.spec.repo),
        Column("REF", lambda o: o.spec.ref),
        Column("COMMIT", lambda o: (o.status.last_synced_commit or "-")[:12]),
        Column("APPLIED", lambda o: o.status.applied),
        Column("PRUNED", lambda o: o.status.pruned),
        Column("FAILED", lambda o: o.status.failed),
        _READY,
        _AGE,
        Column("PATH", lambda o: o.spec.path, True),
    ],
    "ClusterPolicy": [
        Column("ADMISSION", lambda o: o.spec.admission.describe() if o.spec.admission else "-"),
        _AGE,
    ],
    "Secret": [
        Column("KEYS", lambda o: len(o.spec.data)),
        _AGE,
    ],
    "Event": [
        Column("LAST SEEN", lambda o: age(o.spec.last_timestamp)),
        Column("TYPE", lambda o: o.spec.type),
        Column("REASON", lambda o: o.spec.reason),
        Column(
            "OBJECT",
            lambda o: f"{o.spec.involved_object.kind.lower()}/{o.spec.involved_object.name}",
        ),
        Column("COUNT", lambda o: o.spec.count),
        Column("MESSAGE", lambda o: o.spec.message),
        Column("SOURCE", lambda o: o.spec.source.node or o.spec.source.component, True),
    ],
}
assert set(COLUMNS) == set(KINDS), "every kind needs columns"


def columns(kind: str, wide: bool, show_labels: bool = False) -> list[Column]:
    name = [] if kind == "Event" else [Column("NAME", lambda o: o.metadata.name)]
    labels = [Column("LABELS", _labels)] if show_labels else []
    return name + [c for c in COLUMNS[kind] if wide or not c.wide_only] + labels


def _labels(obj: AnyResource) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(obj.metadata.labels.items())) or "<none>"


def table(rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by three spaces, like kubectl."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not cells:
        return ""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def row(obj: AnyResource, wide: bool, show_labels: bool = False) -> list[object]:
    return [column.value(obj) for column in columns(obj.kind, wide, show_labels)]


def headers(kind: str, wide: bool, show_labels: bool = False) -> list[object]:
    return [column.header for column in columns(kind, wide, show_labels)]


def as_document(obj: AnyResource) -> dict[str, Any]:
    """An object as the user sees it: secrets' values are never printed."""
    document = obj.to_dict()
    if obj.kind == "Secret":
        document["spec"]["data"] = {key: None for key in document["spec"].get("data", {})}
    return document


@dataclass(frozen=True)
class Output:
    """An `-o` format: table, wide, yaml, json, name, jsonpath=TEMPLATE or
    custom-columns=HEADER:PATH,..."""

    format: str
    template: str = ""
    custom: tuple[tuple[str, str], ...] = ()
    show_labels: bool = False

    @property
    def tabular(self) -> bool:
        return self.format in ("table", "wide", "custom-columns")


FORMATS = ("table", "wide", "yaml", "json", "name")


def parse_output(text: str) -> Output:
    """The `-o` value; ValueError (one line) when it is none of the formats."""
    name, equals, value = text.partition("=")
    if not equals and name in FORMATS:
        return Output(name)
    if name == "jsonpath" and equals:
        jsonpath.check(value)
        return Output("jsonpath", template=value)
    if name == "custom-columns" and equals:
        custom = []
        for spec in value.split(","):
            header, colon, path = spec.partition(":")
            if not colon or not header.strip() or not path.strip():
                raise ValueError(f"custom-columns: {spec!r} is not HEADER:JSONPATH")
            jsonpath.values({}, path)  # raises on a bad path
            custom.append((header.strip(), path.strip()))
        return Output("custom-columns", custom=tuple(custom))
    raise ValueError(
        f"output format {text!r}: use one of {', '.join(FORMATS)}, jsonpath=TEMPLATE or "
        "custom-columns=HEADER:PATH,..."
    )


def sort_key(path: str) -> Callable[[AnyResource], tuple[int, float, str]]:
    """A key ordering objects by the first value `path` finds: missing first, numbers
    numerically, everything else as text."""

    def key(obj: AnyResource) -> tuple[int, float, str]:
        found = jsonpath.values(as_document(obj), path)
        if not found or found[0] is None:
            return (0, 0.0, "")
        value = found[0]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (1, float(value), "")
        return (2, 0.0, jsonpath.text_of(value))

    return key


def _cell(document: dict[str, Any], path: str) -> str:
    found = jsonpath.values(document, path)
    return ",".join(jsonpath.text_of(v) for v in found) if found else "<none>"


def render(
    objects: Sequence[AnyResource], output: str | Output, kind: str, single: bool = False
) -> str:
    """The text `get` prints for `objects` in format `output`; `single`: one object was asked
    for by name, so JSON and JSONPath see it rather than a List."""
    out = output if isinstance(output, Output) else Output(output)
    if out.format == "yaml":
        documents = [as_document(o) for o in objects]
        return yaml.safe_dump_all(documents, sort_keys=False).rstrip() if documents else ""
    if out.format in ("json", "jsonpath"):
        documents = [as_document(o) for o in objects]
        document = documents[0] if single and documents else {"kind": "List", "items": documents}
        if out.format == "jsonpath":
            return jsonpath.render(document, out.template)
        return json.dumps(document, indent=2)
    if out.format == "name":
        return "\n".join(f"{o.kind.lower()}/{o.metadata.name}" for o in objects)
    if out.format == "custom-columns":
        rows: list[list[object]] = [[header for header, _ in out.custom]]
        for obj in objects:
            document = as_document(obj)
            rows.append([_cell(document, path) for _, path in out.custom])
        return table(rows)
    wide = out.format == "wide"
    return table(
        [
            headers(kind, wide, out.show_labels),
            *(row(o, wide, out.show_labels) for o in objects),
        ]
    )
