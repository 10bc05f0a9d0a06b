"""apply, diff, get (controller/cli/get.py), describe, delete, events, version: reading and
writing objects."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import sys
from typing import Any

import yaml

import crds
from controller import manifests, printers
from controller.apply import PartialApply, apply_all, fresh, label, merged
from controller.runtime.store import Compacted, NotFound, Store

from . import get
from .connect import store_from
from .errors import UsageError
from .get import get_targets

VERSION = "0.1.0"


def register(commands: Any) -> None:
    apply = commands.add_parser("apply", help="create or update objects from manifests")
    apply.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR|-")
    apply.add_argument("-R", "--recursive", action="store_true")
    apply.add_argument("--dry-run", choices=["none", "client", "server"], default="none")
    apply.set_defaults(func=run_apply)

    diff = commands.add_parser(
        "diff", help="show what apply would change (exit 0: none, 1: differences, 2: error)"
    )
    diff.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR|-")
    diff.add_argument("-R", "--recursive", action="store_true")
    diff.set_defaults(func=run_diff, error_code=2)  # kubectl's: 1 means differences

    get.register(commands)

    describe = commands.add_parser("describe", help="show an object, its conditions and events")
    describe.add_argument("kind", metavar="KIND|KIND/NAME")
    describe.add_argument("name", nargs="?", default=None)
    describe.set_defaults(func=run_describe)

    delete = commands.add_parser("delete", help="delete objects by name or manifest")
    delete.add_argument("kind", nargs="?")
    delete.add_argument("name", nargs="?")
    delete.add_argument("-f", "--filename", action="append", metavar="FILE|DIR|-")
    delete.add_argument("--wait", action="store_true", help="wait until the objects are gone")
    delete.add_argument(
        "--timeout",
        "--wait-timeout",
        dest="wait_timeout",
        type=float,
        default=120.0,
        help="seconds --wait waits (120)",
    )
    delete.set_defaults(func=run_delete)

    events = commands.add_parser("events", help="list or stream events")
    events.add_argument("--for", dest="for_object", metavar="KIND/NAME")
    events.add_argument("--types", help="comma separated: Normal, Warning")
    events.add_argument("-w", "--watch", action="store_true")
    events.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    events.set_defaults(func=run_events)

    version = commands.add_parser("version", help="print client and etcd versions")
    version.set_defaults(func=run_version)


# apply / diff --------------------------------------------------------------------------------


async def run_apply(args: argparse.Namespace) -> int:
    loaded = manifests.load(args.filename, args.recursive)
    suffix = "" if args.dry_run == "none" else f" ({args.dry_run} dry run)"
    if args.dry_run == "client":
        for item in loaded:
            print(f"{item.object.kind.lower()}/{item.object.metadata.name} validated{suffix}")
        return 0
    async with store_from(args) as store:
        try:
            results = await apply_all(
                store,
                [m.object for m in loaded],
                dry_run=args.dry_run == "server",
                warn=lambda line: print(f"warning: {line}", file=sys.stderr),
            )
        except PartialApply as partial:  # every object's line, then the error
            for result in partial.applied:
                print(f"{label(result.object)} {result.outcome}{suffix}")
            for obj in partial.not_applied:
                print(f"{label(obj)} not applied{suffix}")
            raise
    for result in results:
        print(f"{label(result.object)} {result.outcome}{suffix}")
    return 0


def _comparable(obj: crds.AnyResource) -> str:
    document = {
        "metadata": {"labels": obj.metadata.labels, "annotations": obj.metadata.annotations},
        "spec": obj.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    if obj.kind == "Secret":
        document["spec"] = {"data": {k: "(redacted)" for k in document["spec"].get("data", {})}}
    return yaml.safe_dump(document, sort_keys=True)


async def run_diff(args: argparse.Namespace) -> int:
    loaded = manifests.load(args.filename, args.recursive)
    changed = False
    async with store_from(args) as store:
        for item in loaded:
            obj = item.object
            existing = await store.try_get(obj.kind, obj.metadata.name)
            before = "" if existing is None else _comparable(existing)
            after = _comparable(merged(existing, obj) if existing else fresh(obj))
            if obj.kind == "Secret" and existing is not None and existing.spec != obj.spec:
                after += "# secret values differ\n"
            label = f"{obj.kind.lower()}/{obj.metadata.name}"
            lines = list(
                difflib.unified_diff(
                    before.splitlines(keepends=True),
                    after.splitlines(keepends=True),
                    fromfile=f"{label} (live)",
                    tofile=f"{label} (manifest)",
                )
            )
            if lines:
                changed = True
                sys.stdout.writelines(lines)
    return 1 if changed else 0


# describe ------------------------------------------------------------------------------------


def _indent(text: str, spaces: int = 2) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


async def related_events(store: Store, kind: str, name: str) -> list[crds.Event]:
    events, _ = await store.list_objects("Event")
    found = [
        e
        for e in events
        if isinstance(e, crds.Event)
        and e.spec.involved_object.kind == kind
        and e.spec.involved_object.name == name
    ]
    return sorted(found, key=lambda e: e.spec.last_timestamp)


async def run_describe(args: argparse.Namespace) -> int:
    targets = get_targets(args.kind, [args.name] if args.name else [])
    if len(targets) != 1 or len(targets[0][1]) != 1:
        raise UsageError("describe takes one object: KIND NAME or KIND/NAME")
    info, (name,) = targets[0]
    async with store_from(args) as store:
        obj = await store.get(info.kind, name)
        events = await related_events(store, info.kind, name)
    document = printers.as_document(obj)
    meta = obj.metadata
    print(f"Name:          {meta.name}")
    print(f"Kind:          {obj.kind}")
    print(f"Labels:        {', '.join(f'{k}={v}' for k, v in meta.labels.items()) or '<none>'}")
    print(f"Created:       {meta.creation_timestamp} ({printers.age(meta.creation_timestamp)} ago)")
    print(f"Generation:    {meta.generation}")
    if meta.deletion_timestamp:
        print(
            f"Deleting since: {meta.deletion_timestamp} (finalizers: {', '.join(meta.finalizers)})"
        )
    print("Spec:")
    print(_indent(yaml.safe_dump(document["spec"], sort_keys=False).rstrip()))
    status = {k: v for k, v in document.get("status", {}).items() if k != "conditions"}
    if status:
        print("Status:")
        print(_indent(yaml.safe_dump(status, sort_keys=False).rstrip()))
    print("Conditions:")
    if obj.status.conditions:
        rows: list[list[object]] = [["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]]
        for c in obj.status.conditions:
            rows.append(
                [c.type, c.status, c.reason, printers.age(c.last_transition_time), c.message]
            )
        print(_indent(printers.table(rows)))
    else:
        print("  <none>")
    print("Events:")
    if events:
        rows = [["TYPE", "REASON", "AGE", "COUNT", "FROM", "MESSAGE"]]
        for e in events[-20:]:
            source = e.spec.source.node or e.spec.source.component
            rows.append(
                [
                    e.spec.type,
                    e.spec.reason,
                    printers.age(e.spec.last_timestamp),
                    e.spec.count,
                    source,
                    e.spec.message,
                ]
            )
        print(_indent(printers.table(rows)))
    else:
        print("  <none>")
    return 0


# delete --------------------------------------------------------------------------------------


async def _wait_gone(store: Store, targets: list[tuple[str, str]], timeout: float) -> None:
    async def gone(kind: str, name: str) -> None:
        while await store.try_get(kind, name) is not None:
            await asyncio.sleep(0.2)

    try:
        await asyncio.wait_for(asyncio.gather(*(gone(k, n) for k, n in targets)), timeout)
    except TimeoutError:
        left = [f"{k.lower()}/{n}" for k, n in targets if await store.try_get(k, n) is not None]
        raise ValueError(
            f"timed out after {timeout:.0f}s waiting for deletion of {', '.join(left)}"
        ) from None


async def run_delete(args: argparse.Namespace) -> int:
    targets: list[tuple[str, str]] = []
    if args.filename:
        if args.kind or args.name:
            raise UsageError("give either KIND NAME or -f FILE, not both")
        targets = [(m.object.kind, m.object.metadata.name) for m in manifests.load(args.filename)]
    elif args.kind and (args.name or "/" in args.kind):
        named = get_targets(args.kind, [args.name] if args.name else [])
        targets = [(info.kind, name) for info, names in named for name in names]
    else:
        raise UsageError("delete needs KIND NAME, KIND/NAME or -f FILE")
    missing = 0
    async with store_from(args) as store:
        for kind, name in targets:
            try:
                marked = await store.delete(kind, name)
            except NotFound as error:
                print(f"error: {error}", file=sys.stderr)
                missing += 1
                continue
            state = "deleted" if marked is None else "marked for deletion"
            print(f"{kind.lower()}/{name} {state}")
        if args.wait:
            await _wait_gone(store, targets, args.wait_timeout)
    return 1 if missing else 0


# events / version ----------------------------------------------------------------------------


def _event_filter(args: argparse.Namespace) -> Any:
    kind = name = None
    if args.for_object:
        word, _, name = args.for_object.partition("/")
        if not name:
            raise ValueError("--for takes KIND/NAME, e.g. vm/vm1")
        kind = crds.resolve_kind(word).kind
    types = {t.strip() for t in args.types.split(",")} if args.types else None
    if types and not types <= {"Normal", "Warning"}:
        raise ValueError("--types takes Normal and/or Warning")

    def accept(event: crds.Event) -> bool:
        involved = event.spec.involved_object
        if kind and (involved.kind != kind or involved.name != name):
            return False
        return types is None or event.spec.type in types

    return accept


def _print_events(events: list[crds.Event], output: str, header: bool) -> None:
    if output == "table":
        rows = [printers.row(e, False) for e in events]
        if header:
            rows.insert(0, list(printers.headers("Event", False)))
        if rows:
            print(printers.table(rows), flush=True)
    else:
        print(printers.render(events, output, "Event"), flush=True)


async def run_events(args: argparse.Namespace) -> int:
    accept = _event_filter(args)
    async with store_from(args) as store:
        objects, revision = await store.list_objects("Event")
        events = sorted(
            (e for e in objects if isinstance(e, crds.Event) and accept(e)),
            key=lambda e: e.spec.last_timestamp,
        )
        if events or args.output != "table":
            _print_events(events, args.output, header=True)
        elif not args.watch:
            print("No events found.", file=sys.stderr)
        if not args.watch:
            return 0
        printed_header = bool(events)
        while True:
            try:
                async for change in store.watch("Event", revision + 1):
                    revision = change.revision
                    event = change.object
                    if (
                        change.type == "DELETED"
                        or not isinstance(event, crds.Event)
                        or not accept(event)
                    ):
                        continue
                    _print_events([event], args.output, header=not printed_header)
                    printed_header = True
            except Compacted:
                _, revision = await store.list_objects("Event")


async def run_version(args: argparse.Namespace) -> int:
    print(f"Client Version: {VERSION}")
    async with store_from(args) as store:
        version = await store.etcd_version()
    print(f"etcd Version:   {version}")
    return 0
