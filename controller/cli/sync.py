"""sync: apply the manifests of a Git repository's path, once or every interval (GitOps)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from controller.gitsync import (
    GitSyncer,
    SyncOptions,
    SyncResult,
    default_cache_dir,
    default_name,
    normalize_path,
    normalize_repo,
    parse_interval,
)

from .connect import store_from


def _interval(text: str) -> int:
    try:
        return parse_interval(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(commands: Any) -> None:
    sync = commands.add_parser(
        "sync",
        help="apply manifests from a Git repository and keep them applied",
        description="Fetch REF of REPO, apply every *.yaml/*.yml under PATH in dependency order, "
        "and repeat every interval, reverting hand edits. State: `kvmctl get gitsync`.",
    )
    sync.add_argument("--repo", required=True, metavar="PATH|URL", help="the Git repository")
    sync.add_argument("--ref", default="main", metavar="BRANCH", help="branch or tag (main)")
    sync.add_argument("--path", default=".", metavar="DIR", help="folder in the repository (.)")
    sync.add_argument(
        "--interval",
        type=_interval,
        default=30,
        metavar="DURATION",
        help="time between syncs: 30s, 5m, 1h or seconds (30s)",
    )
    sync.add_argument(
        "--prune", action="store_true", help="delete objects this sync created that left Git"
    )
    sync.add_argument(
        "--allow-empty",
        action="store_true",
        help="accept a path without manifests (and with --prune, delete everything it created)",
    )
    sync.add_argument("--once", action="store_true", help="sync once; exit 1 if it failed")
    sync.add_argument("--name", help="GitSync object recording the state (derived from repo+path)")
    sync.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help=f"where repository mirrors are kept ({default_cache_dir()})",
    )
    sync.set_defaults(func=run_sync)


def _report(name: str, result: SyncResult) -> None:
    if result.ok:
        print(f"gitsync/{name} {result.message}", flush=True)
    else:
        print(f"error: gitsync/{name} {result.reason}: {result.message}", file=sys.stderr)


async def run_sync(args: argparse.Namespace) -> int:
    repo = normalize_repo(args.repo)
    path = normalize_path(args.path)
    options = SyncOptions(
        repo=repo,
        name=args.name or default_name(repo, path),
        ref=args.ref,
        path=path,
        interval_seconds=args.interval,
        prune=args.prune,
        allow_empty=args.allow_empty,
        cache_dir=args.cache_dir or default_cache_dir(),
    )
    async with store_from(args) as store:
        syncer = GitSyncer(store, options)
        if args.once:
            result = await syncer.sync()
            _report(options.name, result)
            return 0 if result.ok else 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        last: tuple[bool, str | None] | None = None

        def report(result: SyncResult) -> None:
            """Print a sync when it changed something, failed, or the outcome differs."""
            nonlocal last
            outcome = (result.ok, result.commit)
            if result.changed or not result.ok or outcome != last:
                _report(options.name, result)
            last = outcome

        try:
            await syncer.run(stop, report)
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
    return 0
