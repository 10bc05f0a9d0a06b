"""`kvmctl`: the command line. Each module here registers its subcommands.

Exit codes: 0 success, 1 error (one readable line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from controller.manifests import ManifestError
from controller.runtime import quiet_grpc  # noqa: F401  (first: before gRPC loads)
from controller.runtime.config import ConfigError
from controller.runtime.store import StoreError

from . import admin, cluster, resources, simulate, status, sync, vm

COMMAND_MODULES = [resources, sync, vm, admin, cluster, status, simulate]


class UsageError(Exception):
    """Wrong words on the command line: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvmctl", description="High availability for KVM virtual machines.")
    parser.add_argument("--etcd", help="etcd endpoints, comma separated (env KVMCTL_ETCD)")
    parser.add_argument("--prefix", help="key prefix in etcd (env KVMCTL_PREFIX, default /kvmctl)")
    parser.add_argument("--context", help="context of the config file to use")
    parser.add_argument(
        "--etcd-timeout",
        "--timeout",
        dest="etcd_timeout",
        type=float,
        help="seconds to wait for etcd (default 5)",
    )
    parser.add_argument("--cacert", help="CA of etcd's TLS certificate (env KVMCTL_CACERT)")
    parser.add_argument("--cert", help="client certificate for mutual TLS (env KVMCTL_CERT)")
    parser.add_argument("--key", help="client key for mutual TLS (env KVMCTL_KEY)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
        return 1
    except KeyboardInterrupt:
        return 130
    return code
