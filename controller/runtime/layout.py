"""The key layout by writer: which etcd keys hold an object, and how they merge into one object.

The keys that are not objects (heartbeats, requests, claims, ...) are `layout_keys.py`'s.

Keys, relative to the cluster prefix, one watchable range `kinds/{Kind}/` per kind:

- `kinds/{Kind}/spec/{name}`: apiVersion, kind, metadata and spec (no status). Written by the
  admin (apply, GitOps, CLI) and by the controller for the objects it creates.
- `kinds/{Kind}/status/controller/{name}`: the controller's status part.
- `kinds/{Kind}/status/node.{NODE}/{name}`: node NODE's status part (its agent's only writes).
- Events have no status: a node's Events live whole under `kinds/Event/node.{NODE}/{name}`,
  the admin's and the controller's under `kinds/Event/spec/{name}`.

A status part is `{"metadata": {"uid", "finalizers"}, "status": {...}}`. The merged object's
status is the newest relevant part's status (highest mod_revision), with the controller-only
fields (`CONTROLLER_FIELDS`) taken from the controller part (their default without one). Node
parts count only for the nodes relevant to the object (`relevant_nodes`), and only while their
uid is the object's: a part left over from an older object of the same name never attaches to a
new one. Finalizers are the spec's plus those of every counted part. resourceVersion is the
highest mod_revision of the spec and the counted parts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from crds.meta import _check_name

CONTROLLER = "controller"
NODE_WRITER = "node."
KINDS_RANGE = "kinds/"
"""Every object's keys (one range per kind below it)."""
LAYOUT_KEY = "layout"
LAYOUT_VERSION = b"2"
OLD_OBJECTS = "objects/"
"""The previous layout: the whole object in `objects/{Kind}/{name}` (migrate-store)."""

CONTROLLER_FIELDS: dict[str, tuple[str, ...]] = {
    "VirtualMachine": ("placement", "relocations"),
    "ClusterNode": ("health", "fence"),
    "VirtualMachineMigration": ("sourceNode",),
}
"""Status fields only the controller decides (JSON names): a node's value is ignored."""

NODE_FINALIZERS = {"VirtualMachine": "kvmctl.io/domain", "IscsiTarget": "kvmctl.io/iscsi-target"}
"""The finalizer an agent holds (in its node's part) on the objects of a kind it cleans up."""

WRITER_OWNED_KINDS = ("Event",)
"""Kinds without status whose objects each writer keeps in its own subtree."""

_WRITER = re.compile(r"controller|node\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

Document = dict[str, Any]


def node_writer(node: str) -> str:
    """The writer identity of `node`'s agent."""
    return NODE_WRITER + _check_name(node)


def check_writer(writer: str) -> str:
    if not _WRITER.fullmatch(writer):
        raise ValueError(f"writer {writer!r} must be 'controller' or 'node.<node name>'")
    return writer


def writer_node(writer: str) -> str | None:
    """The node a writer writes for, None for the controller."""
    return writer.removeprefix(NODE_WRITER) if writer.startswith(NODE_WRITER) else None


def kind_range(kind: str) -> str:
    return f"{KINDS_RANGE}{kind}/"


def parts_range(kind: str, writer: str | None = None) -> str:
    """Every status part of a kind, or only `writer`'s."""
    return f"kinds/{kind}/status/" + (f"{writer}/" if writer is not None else "")


def spec_range(kind: str, writer: str = CONTROLLER) -> str:
    """Where `writer` keeps the specs it writes: `spec/`, or its own subtree for Events."""
    own = kind in WRITER_OWNED_KINDS and writer != CONTROLLER
    return f"kinds/{kind}/{writer if own else 'spec'}/"


def spec_key(kind: str, name: str, writer: str = CONTROLLER) -> str:
    return spec_range(kind, writer) + _check_name(name)


def part_key(kind: str, name: str, writer: str) -> str:
    return parts_range(kind, writer) + _check_name(name)


def has_parts(kind: str) -> bool:
    return kind not in WRITER_OWNED_KINDS


@dataclass(frozen=True)
class KeyRef:
    """What a key under `kinds/{Kind}/` holds: a spec (of `subtree`) or `writer`'s part."""

    name: str
    writer: str | None = None
    subtree: str = "spec"

    @property
    def is_spec(self) -> bool:
        return self.writer is None


def parse_key(kind: str, relative: str) -> KeyRef | None:
    """The KeyRef of a key relative to the prefix; None for a key kvmctl does not write."""
    rest = relative.removeprefix(kind_range(kind))
    if rest == relative:
        return None
    parts = rest.split("/")
    if len(parts) == 3 and parts[0] == "status" and _WRITER.fullmatch(parts[1]):
        return KeyRef(parts[2], writer=parts[1])
    own_subtree = kind in WRITER_OWNED_KINDS and parts[0].startswith(NODE_WRITER)
    if len(parts) == 2 and (parts[0] == "spec" or (own_subtree and _WRITER.fullmatch(parts[0]))):
        return KeyRef(parts[1], subtree=parts[0])
    return None


def relevant_nodes(kind: str, name: str, spec: Document, controller: Document) -> set[str] | None:
    """The nodes whose status part counts for an object; None: every node's.

    `spec` is the stored spec document, `controller` the controller part's status.
    VirtualMachine: the node it is placed on (agents write only while it is placed there).
    VirtualMachineMigration: its target and (scheduled by the controller) source node.
    ClusterNode X: node X. Bond, IscsiTarget: their `spec.node`. VolumeGroup: `spec.nodes`,
    every node when empty. Other kinds: none.
    """
    body = spec.get("spec") or {}
    if kind == "ClusterNode":
        return {name}
    if kind in ("Bond", "IscsiTarget"):
        return {str(body.get("node"))}
    if kind == "VirtualMachine":
        placement = controller.get("placement") or {}
        return {str(placement["node"])} if placement.get("node") else set()
    if kind == "VirtualMachineMigration":
        nodes = {str(body.get("targetNode"))}
        if controller.get("sourceNode"):
            nodes.add(str(controller["sourceNode"]))
        return nodes
    if kind == "VolumeGroup":
        return {str(node) for node in body.get("nodes") or []} or None
    return set()


@dataclass
class Stored:
    """A key's decoded value and mod_revision."""

    document: Document
    revision: int


@dataclass
class Snapshot:
    """Every key of one object as read: its spec and the status parts by writer."""

    kind: str
    name: str
    spec: Stored
    spec_key: str
    parts: dict[str, Stored] = field(default_factory=dict)

    @property
    def uid(self) -> Any:
        return (self.spec.document.get("metadata") or {}).get("uid")

    def relevant(self) -> set[str] | None:
        controller = self.parts.get(CONTROLLER)
        status = controller.document.get("status") or {} if controller is not None else {}
        return relevant_nodes(self.kind, self.name, self.spec.document, status)

    def counted(self) -> dict[str, Stored]:
        """The parts that count for the merge (relevant writer, same uid)."""
        nodes = self.relevant()
        return {
            writer: part
            for writer, part in self.parts.items()
            if (part.document.get("metadata") or {}).get("uid") == self.uid
            and (writer == CONTROLLER or nodes is None or writer_node(writer) in nodes)
        }

    def version(self) -> int:
        return max([self.spec.revision, *(p.revision for p in self.counted().values())])

    def finalizers(self) -> list[str]:
        """The spec's finalizers, then the counted parts' (each once)."""
        result = list(_finalizers(self.spec.document))
        for part in self.counted().values():
            result += [f for f in _finalizers(part.document) if f not in result]
        return result

    def part_finalizers(self) -> set[str]:
        return {f for part in self.counted().values() for f in _finalizers(part.document)}

    def merged(self) -> Document:
        """The whole object as one document (resourceVersion set)."""
        document = copy.deepcopy(self.spec.document)
        if has_parts(self.kind):
            counted = self.counted()
            newest = max(counted.values(), key=lambda p: p.revision, default=None)
            status = copy.deepcopy(newest.document.get("status") or {}) if newest else {}
            controller = counted.get(CONTROLLER)
            decided = controller.document.get("status") or {} if controller else {}
            for name in CONTROLLER_FIELDS.get(self.kind, ()):
                if name in decided:
                    status[name] = copy.deepcopy(decided[name])
                else:
                    status.pop(name, None)
            document["status"] = status
            document["metadata"]["finalizers"] = self.finalizers()
        document["metadata"]["resourceVersion"] = str(self.version())
        return document


def _finalizers(document: Mapping[str, Any]) -> Iterable[str]:
    return (document.get("metadata") or {}).get("finalizers") or []


def part_document(uid: Any, status: Document, finalizers: Iterable[str]) -> Document:
    return {"metadata": {"uid": uid, "finalizers": list(finalizers)}, "status": status}


class KindView:
    """Every key of one kind, grouped into objects: a listing, or a watch's running state."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.specs: dict[str, tuple[str, Stored]] = {}
        """Spec key (relative) -> (name, stored spec)."""
        self.parts: dict[str, dict[str, Stored]] = {}
        """Name -> writer -> stored part."""
        self._spec_keys: dict[str, set[str]] = {}

    def snapshot(self, key: str) -> Snapshot:
        name, spec = self.specs[key]
        return Snapshot(self.kind, name, spec, key, dict(self.parts.get(name, {})))

    def snapshots(self) -> list[Snapshot]:
        return [self.snapshot(key) for key in self.specs]

    def set(self, key: str, stored: Stored | None) -> list[tuple[Document | None, Document | None]]:
        """Store (or, with None, drop) one key; the merged objects before and after that changed."""
        ref = parse_key(self.kind, key)
        if ref is None:
            return []
        affected = [key] if ref.is_spec else sorted(self._spec_keys.get(ref.name, ()))
        before = {k: self.snapshot(k).merged() for k in affected if k in self.specs}
        self._put(ref, key, stored)
        after = {k: self.snapshot(k).merged() for k in affected if k in self.specs}
        return [(before.get(k), after.get(k)) for k in affected if before.get(k) != after.get(k)]

    def load(self, key: str, stored: Stored) -> None:
        """Store one key of a listing."""
        ref = parse_key(self.kind, key)
        if ref is not None:
            self._put(ref, key, stored)

    def _put(self, ref: KeyRef, key: str, stored: Stored | None) -> None:
        if ref.writer is not None:
            parts = self.parts.setdefault(ref.name, {})
            if stored is None:
                parts.pop(ref.writer, None)
            else:
                parts[ref.writer] = stored
        elif stored is None:
            self.specs.pop(key, None)
            self._spec_keys.get(ref.name, set()).discard(key)
        else:
            self.specs[key] = (ref.name, stored)
            self._spec_keys.setdefault(ref.name, set()).add(key)
