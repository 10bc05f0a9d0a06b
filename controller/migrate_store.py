"""`kvmctl admin migrate-store`: from one key per object to the key layout by writer.

The previous layout kept the whole object in `objects/{Kind}/{name}`. Each object moves in one
transaction (it holds only if the old key is unchanged and the new spec key does not exist):
its metadata and spec become the spec key, its status the controller's part, and the finalizer
an agent holds on it (`NODE_FINALIZERS`) moves to the part of the node that will remove it
(the VM's placement node or last node, the IscsiTarget's node). Events keep their lease. Then
the old key is deleted. Running it again migrates what is left and changes nothing else; once
no old key remains the `layout` key records version 2.
"""

from __future__ import annotations

import json
from typing import Any

from controller.runtime import layout
from controller.runtime.store import (
    Delete,
    KeyCompare,
    KeyValue,
    Operation,
    Put,
    Store,
    StoreError,
    to_json,
)
from crds import KINDS
from crds.meta import _check_name


def _finalizer_node(kind: str, document: dict[str, Any]) -> str | None:
    """The node whose agent removes the kind's node finalizer from this object."""
    status = document.get("status") or {}
    if kind == "VirtualMachine":
        placement = status.get("placement") or {}
        return placement.get("node") or status.get("node")
    if kind == "IscsiTarget":
        node: str | None = (document.get("spec") or {}).get("node")
        return node
    return None


async def migrate_store(store: Store) -> tuple[list[str], int]:
    """Migrate every old-layout object: one line per object, and how many were not migrated.

    The `layout` key is written only when none is left.
    """
    old = store.raw_key(layout.OLD_OBJECTS)
    reply = await store.keys.get_prefix(old)
    lines = []
    left = 0
    for kv in reply:
        try:
            lines.append(await _migrate_one(store, kv))
        except (StoreError, ValueError, KeyError, TypeError) as error:
            left += 1
            lines.append(f"{store.relative(kv.key)}: not migrated: {error}")
    if not left:
        marker = store.raw_key(layout.LAYOUT_KEY)
        await store.keys.put(marker, layout.LAYOUT_VERSION)
    return lines, left


async def _migrate_one(store: Store, kv: KeyValue) -> str:
    relative = store.relative(kv.key)
    _, kind, name = relative.split("/", 2)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    _check_name(name)
    document = json.loads(kv.value)
    document["metadata"]["resourceVersion"] = "1"
    KINDS[kind].model.model_validate(document)  # a value kvmctl can read back
    document["metadata"].pop("resourceVersion")
    spec_key = store.raw_key(layout.spec_key(kind, name))
    ops: list[Operation] = []
    if layout.has_parts(kind):
        status = document.pop("status", None) or {}
        uid = document["metadata"].get("uid")
        finalizers = document["metadata"].get("finalizers") or []
        node_finalizer = layout.NODE_FINALIZERS.get(kind)
        node = _finalizer_node(kind, document | {"status": status})
        moved = []
        if node_finalizer is not None and node_finalizer in finalizers and node:
            moved = [node_finalizer]
            document["metadata"]["finalizers"] = [f for f in finalizers if f != node_finalizer]
            node_part = layout.part_document(uid, status, moved)
            node_key = store.part_key(kind, name, layout.node_writer(node))
            ops.append(Put(node_key, to_json(node_part)))
        controller_part = layout.part_document(uid, status, [])
        ops.append(Put(store.part_key(kind, name, layout.CONTROLLER), to_json(controller_part)))
    ops += [Put(spec_key, to_json(document), kv.lease), Delete(kv.key)]
    ok, _ = await store.keys.transaction(
        [KeyCompare.modified(kv.key, kv.mod_revision), KeyCompare.created(spec_key, 0)],
        ops,
        key=spec_key,
    )
    if not ok:
        raise StoreError("changed while migrating, or already present in the new layout")
    return f"{kind.lower()}/{name}: migrated"
