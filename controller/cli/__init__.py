"""`kvmctl`: the command line. Each module here registers its subcommands.

Exit codes: 0 success, 1 error (one readable line on stderr), 2 usage; `diff` exits 1 for
differences and 2 for errors (like kubectl); `status` has its own (controller/cli/status.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from controller.manifests import ManifestError
from controller.runtime import quiet_grpc  # noqa: F401  (first: before gRPC loads)
from controller.runtime.config import ConfigError
from controller.runtime.logs import LOG_FORMATS, configure_logging
from controller.runtime.store import StoreError

from . import (
    admin,
    cluster,
    completion,
    dashboard,
    drain,
    edit,
    explain,
    resources,
    simulate,
    status,
    sync,
    vm,
    wait,
)
from .errors import UsageError

COMMAND_MODULES = [
    resources,
    edit,
    explain,
    wait,
    completion,
    sync,
    vm,
    admin,
    cluster,
    drain,
    status,
    simulate,
    dashboard,
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, as every kvmctl error: what is wrong and where to read more."""
        print(f"{self.prog}: error: {message} (see '{self.prog} -h')", file=sys.stderr)
        raise SystemExit(2)


def add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The flags every command takes, before the command (`top`) or after it.

    After it they default to SUPPRESS, so a flag given before the command is kept unless it is
    given again after. A command's own option of the same name wins (`drain --timeout`); the
    old global `--timeout` stays accepted before the command.
    """
    options: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--etcd",), {"help": "etcd endpoints, comma separated (env KVMCTL_ETCD)"}),
        (("--prefix",), {"help": "key prefix in etcd (env KVMCTL_PREFIX, default /kvmctl)"}),
        (("--context",), {"help": "context of the config file to use"}),
        (
            ("--etcd-timeout", "--timeout") if top else ("--etcd-timeout",),
            {"dest": "etcd_timeout", "type": float, "help": "seconds to wait for etcd (5)"},
        ),
        (("--cacert",), {"help": "CA of etcd's TLS certificate (env KVMCTL_CACERT)"}),
        (("--cert",), {"help": "client certificate for mutual TLS (env KVMCTL_CERT)"}),
        (("--key",), {"help": "client key for mutual TLS (env KVMCTL_KEY)"}),
        (
            ("-v", "--verbose"),
            {"action": "store_true", "help": "log debug information"},
        ),
        (
            ("--log-format",),
            {
                "choices": LOG_FORMATS,
                "default": "auto",
                "help": "stderr log lines: text, json, journal (<N> priorities); auto: journal "
                "under systemd, else text",
            },
        ),
    ]
    taken = parser._option_string_actions
    for flags, settings in options:
        if any(flag in taken for flag in flags):
            continue
        if top:
            parser.add_argument(*flags, **settings)
        else:  # listed by `kvmctl -h` only
            hidden = {**settings, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
            parser.add_argument(*flags, **hidden)


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser`, at any depth."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subcommand_parsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvmctl",
        description="High availability for KVM virtual machines. The options below may also "
        "follow the command (kvmctl get vm --etcd HOST:PORT).",
    )
    add_global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for module in COMMAND_MODULES:
        module.register(commands)
    for child in _subcommand_parsers(parser):
        add_global_options(child, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, logging.DEBUG if args.verbose else logging.WARNING)
    try:
        code: int = asyncio.run(args.func(args))
    except UsageError as error:
        print(f"kvmctl: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `kvmctl ... | head`: the reader is gone, say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (StoreError, ManifestError, ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return int(getattr(args, "error_code", 1))
    except KeyboardInterrupt:
        return 130
    return code
