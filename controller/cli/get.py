"""`kvmctl get`: KIND[,KIND...] [NAME...] or KIND/NAME..., in any output format, or watched."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

import crds
from controller import jsonpath, printers
from controller.runtime.labels import parse_selector
from controller.runtime.store import Store

from .connect import store_from
from .errors import UsageError


def register(commands: Any) -> None:
    get = commands.add_parser(
        "get",
        help="list objects: get KIND[,KIND...] [NAME...] or get KIND/NAME...",
        description="Examples: get vm; get vm web1; get vm/web1 node/a; get node,vm; "
        "get vm -o jsonpath='{.items[*].metadata.name}'; "
        "get vm -o custom-columns=NAME:.metadata.name,NODE:.status.node --sort-by=.spec.vcpus",
    )
    get.add_argument("kind", metavar="KIND[,KIND]|KIND/NAME")
    get.add_argument("names", nargs="*", default=[], metavar="NAME")
    get.add_argument(
        "-o",
        "--output",
        type=output_arg,
        default=printers.Output("table"),
        metavar="FORMAT",
        help="table, wide, yaml, json, name, jsonpath=TEMPLATE, custom-columns=HEADER:PATH,...",
    )
    get.add_argument("-l", "--selector", help="label selector, e.g. app=web,tier!=db")
    get.add_argument("--sort-by", metavar="JSONPATH", help="order by this field, e.g. .spec.vcpus")
    get.add_argument("--show-labels", action="store_true", help="add a LABELS column")
    get.add_argument("-w", "--watch", action="store_true", help="after listing, stream changes")
    get.set_defaults(func=run_get)


Listed = list[tuple[crds.KindInfo, list[crds.AnyResource]]]


def output_arg(text: str) -> printers.Output:
    """argparse type of `-o`: a bad format or template is a usage error."""
    try:
        return printers.parse_output(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _sort_by(text: str) -> str:
    try:
        jsonpath.values({}, text)
    except ValueError as error:
        raise UsageError(f"--sort-by: {error}") from None
    return text


def get_targets(kind: str, names: list[str]) -> list[tuple[crds.KindInfo, list[str]]]:
    """What `get` lists: each kind with the names asked for (none: all of them)."""
    words = [kind, *names]
    if any("/" in word for word in words):
        targets: dict[str, tuple[crds.KindInfo, list[str]]] = {}
        for word in words:
            kind_word, slash, name = word.partition("/")
            if not slash or not name or "/" in name:
                raise UsageError(f"{word!r}: give every object as KIND/NAME, or KIND NAME...")
            info = crds.resolve_kind(kind_word)
            targets.setdefault(info.kind, (info, []))[1].append(name)
        return list(targets.values())
    kinds = [crds.resolve_kind(word) for word in kind.split(",") if word]
    if not kinds:
        raise UsageError("get needs a KIND")
    if names and len(kinds) > 1:
        raise UsageError("names go with one kind: get KIND NAME..., or KIND/NAME...")
    return [(info, list(names)) for info in dict.fromkeys(kinds)]


async def _objects(
    store: Store, info: crds.KindInfo, names: list[str]
) -> tuple[list[crds.AnyResource], int, list[str]]:
    """The objects, the revision to watch from, and errors for names not found."""
    if not names:
        objects, revision = await store.list_objects(info.kind)
        return objects, revision, []
    found, missing = [], []
    for name in names:
        obj = await store.try_get(info.kind, name)
        if obj is None:
            missing.append(f"{info.kind} {name!r} not found")
        else:
            found.append(obj)
    return found, await store.revision(), missing


async def run_get(args: argparse.Namespace) -> int:
    if args.kind == "leader":  # not a kind: the controllers' elected leader
        from .cluster import print_leader

        return await print_leader(args)
    targets = get_targets(args.kind, args.names)
    output: printers.Output = args.output
    if args.show_labels:
        output = replace(output, show_labels=True)
    sort = printers.sort_key(_sort_by(args.sort_by)) if args.sort_by else None
    if args.watch and (len(targets) > 1 or output.format == "jsonpath"):
        raise UsageError("--watch takes one kind, and no jsonpath output")
    selector = parse_selector(args.selector) if args.selector else None
    single = len(targets) == 1 and len(targets[0][1]) == 1
    listed: Listed = []
    missing: list[str] = []
    async with store_from(args) as store:
        revision = 0
        for info, names in targets:
            objects, revision, not_found = await _objects(store, info, names)
            missing += not_found
            if selector is not None:
                objects = [o for o in objects if selector(o.metadata.labels)]
            listed.append((info, sorted(objects, key=sort) if sort else objects))
        _print_listed(listed, output, single, named=any(names for _, names in targets))
        for error in missing:
            print(f"error: {error}", file=sys.stderr)
        if not args.watch:
            return 1 if missing else 0
        info, names = targets[0]
        await _watch(store, info, names, selector, output, revision, bool(listed[0][1]))
    return 0


def _print_listed(listed: Listed, output: printers.Output, single: bool, named: bool) -> None:
    """Print what `get` found; `named`: objects were asked for by name (errors say which are
    missing, so no "No ... found")."""
    if output.tabular or output.format == "name":  # one table per kind, as kubectl
        blocks = [
            printers.render(objects, output, info.kind) for info, objects in listed if objects
        ]
        if blocks:
            print("\n\n".join(blocks), flush=True)
        for info, objects in listed:
            if not objects and not named:
                print(f"No {info.plural} found.", file=sys.stderr)
        return
    everything = [obj for _, objects in listed for obj in objects]
    text = printers.render(everything, output, listed[0][0].kind, single=single)
    print(text, end="" if text.endswith("\n") else "\n", flush=True)


async def _watch(
    store: Store,
    info: crds.KindInfo,
    names: list[str],
    selector: Any,
    output: printers.Output,
    revision: int,
    printed: bool,
) -> None:
    """Stream changes of `info`'s objects after `revision`, one line (or document) each."""
    if not printed and output.tabular:
        print(printers.render([], output, info.kind), flush=True)
    async for event in store.watch(info.kind, revision + 1):
        obj = event.object
        if names and obj.metadata.name not in names:
            continue
        if selector is not None and not selector(obj.metadata.labels):
            continue
        if output.tabular:
            line = printers.render([obj], output, info.kind).splitlines()[1]
            print(line + ("   (deleted)" if event.type == "DELETED" else ""), flush=True)
        else:
            print(printers.render([obj], output, info.kind, single=True), flush=True)
            if output.format == "yaml":
                print("---", flush=True)
