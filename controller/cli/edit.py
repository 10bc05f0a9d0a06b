"""`kvmctl edit KIND NAME` (or KIND/NAME): change an object in $EDITOR, as kubectl edit.

The object is opened as YAML (as `get -o yaml` shows it); what you save is validated like a
manifest and written like `apply` writes it (metadata labels and annotations, and spec; status
stays the components'). Nothing is written when you save it unchanged or invalid, or when
someone else changed its spec, labels or annotations meanwhile; your edit is then kept in a
file the error names. A status written meanwhile (agents do, all the time) is merged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

import crds
from controller import manifests, printers
from controller.apply import find_clash, merged
from controller.runtime.store import Conflict, Store

from .connect import store_from
from .errors import UsageError
from .get import get_targets

ATTEMPTS = 10
HEADER = """\
# Edit the object below and save to apply; lines beginning with '#' are ignored.
# Only metadata.labels, metadata.annotations and spec are written: status belongs to the
# controller and the agents. Save it unchanged (or empty) to write nothing.
"""


def register(commands: Any) -> None:
    edit = commands.add_parser(
        "edit",
        help="edit an object in $EDITOR and apply it (with a conflict check)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    edit.add_argument("kind", metavar="KIND|KIND/NAME")
    edit.add_argument("name", nargs="?", default=None)
    edit.set_defaults(func=run_edit)


def _editor() -> list[str]:
    command = os.environ.get("KVMCTL_EDITOR") or os.environ.get("EDITOR") or "vi"
    words = shlex.split(command)
    if not words:
        raise UsageError("$EDITOR is empty")
    return words


def _user_part(obj: crds.AnyResource) -> tuple[Any, ...]:
    """What an edit writes, to tell whether someone else wrote it meanwhile."""
    return (obj.spec, obj.metadata.labels, obj.metadata.annotations)


async def _run_editor(path: Path) -> None:
    command = [*_editor(), str(path)]
    try:
        process = await asyncio.create_subprocess_exec(*command)
    except FileNotFoundError:
        raise ValueError(f"editor {command[0]!r} not found (set $EDITOR)") from None
    code = await process.wait()
    if code != 0:
        raise ValueError(f"editor {command[0]} exited with {code}; nothing written")


def _edited(path: Path, original: crds.AnyResource) -> crds.AnyResource | None:
    """The saved object; None when the file was emptied. ValueError when it is invalid."""
    text = path.read_text(encoding="utf-8")
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        return None
    loaded = manifests.load_text(text, str(path))
    if len(loaded) != 1:
        raise ValueError(f"{path}: holds {len(loaded)} objects; keep exactly the one edited")
    obj = loaded[0].object
    if (obj.kind, obj.metadata.name) != (original.kind, original.metadata.name):
        raise ValueError(
            f"{path}: kind and name must stay {original.kind} {original.metadata.name!r}"
        )
    return obj


async def _write(store: Store, original: crds.AnyResource, edited: crds.AnyResource) -> None:
    """Write `edited` over the live object while its user part is still `original`'s."""
    for _ in range(ATTEMPTS):
        live = await store.get(original.kind, original.metadata.name)
        if _user_part(live) != _user_part(original):
            raise Conflict(
                f"{original.kind} {original.metadata.name!r} was changed by someone else "
                "while you edited it"
            )
        desired = merged(live, edited)
        clash = await find_clash(store, [desired])
        if clash is not None:
            raise ValueError(clash)
        try:
            await store.update(desired)
            return
        except Conflict:
            continue  # a status (or finalizer) written meanwhile: merge again
    raise Conflict(f"{original.kind} {original.metadata.name!r} kept changing; try again")


def _draft(name: str, document: str) -> Path:
    """A private temporary file holding the object to edit."""
    handle, path = tempfile.mkstemp(prefix=f"kvmctl-edit-{name}-", suffix=".yaml")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(HEADER + document)
    return Path(path)


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


async def run_edit(args: argparse.Namespace) -> int:
    targets = get_targets(args.kind, [args.name] if args.name else [])
    if len(targets) != 1 or len(targets[0][1]) != 1:
        raise UsageError("edit takes one object: KIND NAME or KIND/NAME")
    info, (name,) = targets[0]
    if info.kind == "Secret":
        raise UsageError("Secrets are not edited (their values are never shown): apply a file")
    async with store_from(args) as store:
        original = await store.get(info.kind, name)
        document = yaml.safe_dump(printers.as_document(original), sort_keys=False)
        path = _draft(name, document)
        label = f"{info.kind.lower()}/{name}"
        keep = True
        try:
            await _run_editor(path)
            edited = _edited(path, original)
            if edited is None or _user_part(merged(original, edited)) == _user_part(original):
                keep = False
                print(f"{label} unchanged: nothing written")
                return 0
            await _write(store, original, edited)
            keep = False
        except (ValueError, Conflict) as error:
            print(f"error: {error}; your edit is kept in {path}", file=sys.stderr)
            return 1
        finally:
            if not keep:
                _discard(path)
    print(f"{label} edited")
    return 0
