"""How a command reaches the cluster (global flags, env, config file), and name arguments."""

from __future__ import annotations

import argparse

from controller.runtime import config
from controller.runtime.store import Store
from crds.meta import _check_name


def name_arg(value: str) -> str:
    """argparse type of an object name (DNS-1123 label): a bad one is a usage error."""
    try:
        return _check_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def settings_from(args: argparse.Namespace) -> config.Settings:
    """etcd endpoints, prefix, timeout and TLS files from the global flags, env and config."""
    return config.resolve(
        args.etcd, args.prefix, args.context, args.etcd_timeout, args.cacert, args.cert, args.key
    )


def store_from(args: argparse.Namespace) -> Store:
    return settings_from(args).store()
