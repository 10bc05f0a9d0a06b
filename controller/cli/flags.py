"""Flags more than one command declares."""

from __future__ import annotations

import argparse

from controller.ha.environment import HaTimings


def add_heartbeat_flags(
    parser: argparse.ArgumentParser, whose: str, ttl_type: type[int] | type[float]
) -> None:
    """--lease-ttl, --renew-interval, --self-fence-margin: the agents' heartbeat lease timing.

    The agent declares its own (`whose` "this agent's", an integer TTL: etcd's leases are whole
    seconds); the controller the agents' it must assume (the same values as given to them).
    """
    defaults = HaTimings()
    parser.add_argument(
        "--lease-ttl",
        type=ttl_type,
        default=ttl_type(defaults.lease_ttl),
        help=f"{whose} heartbeat lease TTL, s",
    )
    parser.add_argument(
        "--renew-interval",
        type=float,
        default=defaults.renew_interval,
        help=f"{whose} lease renewal interval, s",
    )
    parser.add_argument(
        "--self-fence-margin",
        type=float,
        default=defaults.self_fence_margin,
        help=f"how long before {whose} lease lapses a cut-off agent destroys its guests, s",
    )


def add_wait_flags(parser: argparse.ArgumentParser, until: str) -> None:
    """--wait (follow the operation `until` ...) and its --timeout (alias --wait-timeout)."""
    parser.add_argument("--wait", action="store_true", help=f"wait {until}")
    parser.add_argument(
        "--timeout",
        "--wait-timeout",
        dest="wait_timeout",
        type=float,
        default=600.0,
        help="seconds --wait waits (600)",
    )


def add_telemetry_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """--metrics-host, --metrics-port (/healthz and /metrics) and --otlp-endpoint."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=default_port,
        help=f"port of /healthz and /metrics (default {default_port}; 0: any free port)",
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", help="address to serve them on (%(default)s)"
    )
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="also send traces and metrics by OTLP/HTTP to this collector (http://HOST:4318)",
    )
