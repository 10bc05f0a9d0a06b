"""`kvmctl wait --for=condition=Ready vm/web1 [--timeout 30]`, as kubectl wait.

`--for` takes `condition=TYPE` (status True), `condition=TYPE=VALUE`, `delete`, or
`jsonpath={.status.state}=Running`. Exit 0 once every object meets it, 1 at the timeout naming
each object still waiting and what it shows now, 2 for usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller import jsonpath, printers
from controller.runtime.store import Compacted, Store
from crds import AnyResource

from .connect import store_from
from .errors import UsageError
from .get import get_targets


@dataclass(frozen=True)
class Goal:
    """What `--for` asks; `met` tells whether an object (None: absent) meets it, and `now`
    what it shows instead."""

    text: str
    met: Callable[[AnyResource | None], bool]
    now: Callable[[AnyResource | None], str]


def parse_for(text: str) -> Goal:
    if text == "delete":
        return Goal(text, lambda obj: obj is None, lambda obj: "still there")
    what, equals, rest = text.partition("=")
    if what == "condition" and equals and rest:
        kind, _, wanted = rest.partition("=")
        value = wanted or "True"

        def condition(obj: AnyResource | None) -> str | None:
            found = obj.status.condition(kind) if obj is not None else None
            return None if found is None else found.status

        def now(obj: AnyResource | None) -> str:
            if obj is None:
                return "not found"
            found = obj.status.condition(kind)
            if found is None:
                return f"no {kind} condition"
            return f"{kind}={found.status} {found.reason}: {found.message}".rstrip(": ")

        return Goal(text, lambda obj: (condition(obj) or "").lower() == value.lower(), now)
    if what == "jsonpath" and equals and rest:
        path, equals, wanted = rest.rpartition("=")
        if not equals or not path:
            raise UsageError(f"--for={text}: use jsonpath={{PATH}}=VALUE")
        try:
            jsonpath.values({}, path)
        except ValueError as error:
            raise UsageError(f"--for: {error}") from None

        def shown(obj: AnyResource | None) -> str:
            if obj is None:
                return "not found"
            found = jsonpath.values(printers.as_document(obj), path)
            return ",".join(jsonpath.text_of(v) for v in found) or "<none>"

        return Goal(text, lambda obj: obj is not None and shown(obj) == wanted, shown)
    raise UsageError(
        f"--for={text}: use condition=TYPE[=VALUE], delete, or jsonpath={{PATH}}=VALUE"
    )


def register(commands: Any) -> None:
    wait = commands.add_parser(
        "wait",
        help="wait until objects meet a condition (exit 1 at the timeout)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    wait.add_argument("kind", metavar="KIND/NAME|KIND")
    wait.add_argument("names", nargs="*", default=[], metavar="NAME")
    wait.add_argument("--for", dest="goal", required=True, metavar="CONDITION")
    wait.add_argument("--timeout", dest="wait_timeout", type=float, default=30.0, help="s (30)")
    wait.set_defaults(func=run_wait)


async def run_wait(args: argparse.Namespace) -> int:
    goal = parse_for(args.goal)
    targets = [
        (info.kind, name) for info, names in get_targets(args.kind, args.names) for name in names
    ]
    if not targets:
        raise UsageError("wait needs objects: KIND/NAME... or KIND NAME...")
    async with store_from(args) as store:
        try:
            async with asyncio.timeout(args.wait_timeout):
                await asyncio.gather(*(_until(store, kind, name, goal) for kind, name in targets))
        except TimeoutError:
            states = [
                f"{kind.lower()}/{name} ({goal.now(await store.try_get(kind, name))})"
                for kind, name in targets
                if not goal.met(await store.try_get(kind, name))
            ]
            print(
                f"error: timed out after {args.wait_timeout:g} s waiting for {goal.text}: "
                + ", ".join(states),
                file=sys.stderr,
            )
            return 1
    for kind, name in targets:
        print(f"{kind.lower()}/{name} {'deleted' if goal.text == 'delete' else 'condition met'}")
    return 0


async def _until(store: Store, kind: str, name: str, goal: Goal) -> None:
    """Return once `kind/name` meets `goal`, following its changes by a watch."""
    while True:
        revision = await store.revision()  # before the read: the watch misses no change
        if goal.met(await store.try_get(kind, name)):
            return
        try:
            async for event in store.watch(kind, revision + 1):
                if event.object.metadata.name != name:
                    continue
                if goal.met(None if event.type == "DELETED" else event.object):
                    return
        except Compacted:
            continue
