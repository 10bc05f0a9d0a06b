"""The kvmctl API: one pydantic model per kind, and the table that names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .bond import Bond
from .clusternode import ClusterNode
from .clusterpolicy import ClusterPolicy
from .event import Event
from .gitsync import GitSync
from .iscsitarget import IscsiTarget
from .meta import API_GROUP, API_VERSION, Condition, ObjectMeta, Resource, Status, parse_size
from .migration import VirtualMachineMigration
from .secret import Secret
from .virtualmachine import VirtualMachine
from .volumegroup import VolumeGroup

AnyResource = Resource[Any, Any]


@dataclass(frozen=True)
class KindInfo:
    kind: str
    model: type[AnyResource]
    plural: str
    short_names: tuple[str, ...]


KINDS: dict[str, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo("ClusterNode", ClusterNode, "clusternodes", ("node", "nodes", "cn")),
        KindInfo("ClusterPolicy", ClusterPolicy, "clusterpolicies", ("policy", "cp")),
        KindInfo("Bond", Bond, "bonds", ("bond",)),
        KindInfo("IscsiTarget", IscsiTarget, "iscsitargets", ("it", "target")),
        KindInfo("VolumeGroup", VolumeGroup, "volumegroups", ("vg",)),
        KindInfo("VirtualMachine", VirtualMachine, "virtualmachines", ("vm", "vms")),
        KindInfo(
            "VirtualMachineMigration",
            VirtualMachineMigration,
            "virtualmachinemigrations",
            ("vmim", "migration"),
        ),
        KindInfo("Secret", Secret, "secrets", ("secret",)),
        KindInfo("GitSync", GitSync, "gitsyncs", ("gitsync", "gs")),
        KindInfo("Event", Event, "events", ("ev", "event")),
    )
}

# The order `apply` and `sync` write kinds in: what others refer to comes first.
APPLY_ORDER = [
    "Secret",
    "ClusterPolicy",
    "Bond",
    "IscsiTarget",
    "VolumeGroup",
    "ClusterNode",
    "VirtualMachine",
    "VirtualMachineMigration",
]


class UnknownKind(ValueError):
    pass


def resolve_kind(word: str) -> KindInfo:
    """Find a kind by its name, plural or short name, case-insensitively (like kubectl)."""
    lowered = word.lower()
    for info in KINDS.values():
        if lowered in (info.kind.lower(), info.plural, *info.short_names):
            return info
    known = ", ".join(sorted(KINDS))
    raise UnknownKind(f"unknown kind {word!r} (known: {known})")


def describe_validation_error(error: ValidationError) -> str:
    """One readable line per problem: `spec.disks[0].volume: message`."""
    lines = []
    for problem in error.errors():
        path = ""
        for part in problem["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                # A user's key may hold newlines or terminal escapes: never print them raw.
                shown = part if part.isprintable() else repr(part)
                path += f".{shown}" if path else shown
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{path or '(document)'}: {message}")
    return "; ".join(lines)


def parse_object(document: dict[str, Any]) -> AnyResource:
    """Validate one document into its kind's model. Raises ValueError with a readable message."""
    if not isinstance(document, dict):
        raise ValueError("a manifest document must be a mapping")
    api_version = document.get("apiVersion")
    if api_version != API_VERSION:
        raise ValueError(f"apiVersion: expected {API_VERSION!r}, got {api_version!r}")
    kind = document.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind: unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    try:
        return KINDS[kind].model.model_validate(document)
    except ValidationError as error:
        raise ValueError(describe_validation_error(error)) from None


__all__ = [
    "API_GROUP",
    "API_VERSION",
    "APPLY_ORDER",
    "KINDS",
    "AnyResource",
    "Bond",
    "ClusterNode",
    "ClusterPolicy",
    "Condition",
    "Event",
    "GitSync",
    "IscsiTarget",
    "KindInfo",
    "ObjectMeta",
    "Resource",
    "Secret",
    "Status",
    "UnknownKind",
    "VirtualMachine",
    "VirtualMachineMigration",
    "VolumeGroup",
    "describe_validation_error",
    "parse_object",
    "parse_size",
    "resolve_kind",
]
