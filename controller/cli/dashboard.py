"""`kvmctl dashboard`: the cluster in a browser, live (controller/dashboard/).

Read-only: the page cannot change anything, and the server only reads etcd. It listens on
loopback unless told otherwise; on any other address it needs HTTPS (--tls-cert, --tls-key) and
etcd credentials of the read-only `monitor` role (--cert/--key of a certificate with CN monitor,
docs/security.md), and refuses to start without them.

Under systemd (deploy/systemd/kvmctl-dashboard.service, Type=notify) it waits for etcd, sends
READY=1 once it serves the first snapshot and feeds the unit's watchdog from its event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import ssl
from pathlib import Path
from typing import Any

from controller.dashboard.live import LiveView
from controller.dashboard.server import DashboardServer
from controller.rbac import MONITOR
from controller.runtime.config import Settings
from controller.runtime.systemd import Service

from .connect import settings_from
from .errors import UsageError

DEFAULT_PORT = 8480


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "dashboard",
        help="a live, read-only web view of hosts, VMs, events and failovers",
        description=(__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options: list[tuple[str, dict[str, Any]]] = [
        ("--address", {"default": "127.0.0.1", "help": "address to listen on (%(default)s)"}),
        ("--port", {"type": int, "default": DEFAULT_PORT, "help": "port (%(default)s; 0: any)"}),
        ("--tls-cert", {"type": Path, "help": "HTTPS certificate (PEM)"}),
        ("--tls-key", {"type": Path, "help": "HTTPS private key (PEM)"}),
    ]
    for flag, settings in options:
        parser.add_argument(flag, **settings)
    parser.set_defaults(func=run_dashboard)


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it is not known to be loopback


def check_exposure(
    address: str, tls_cert: Path | None, tls_key: Path | None, settings: Settings
) -> None:
    """Refuse, with one line, what would expose more than a read-only view on loopback."""
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("dashboard: --tls-cert and --tls-key go together")
    if is_loopback(address):
        return
    if tls_cert is None:
        raise UsageError(
            f"dashboard: {address} is not a loopback address: serving there needs HTTPS "
            "(--tls-cert and --tls-key)"
        )
    user = settings.tls.user() if settings.tls is not None else None
    if user != MONITOR:
        shown = f"user {user!r}" if user else "no client certificate"
        raise UsageError(
            f"dashboard: {address} is not a loopback address: serving there needs etcd "
            f"credentials of the read-only {MONITOR} role (--cert/--key with CN {MONITOR}), "
            f"not {shown}"
        )


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


async def run_dashboard(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    check_exposure(args.address, args.tls_cert, args.tls_key, settings)
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    store = settings.store()
    view = LiveView(store)
    server = DashboardServer(view, args.address, args.port, tls)
    try:
        async with Service() as service:
            await store.connect_when_reachable()
            await view.start()
            await server.start()
            print(f"dashboard: {server.url}", flush=True)
            service.ready(f"serving {server.url}")
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()  # until SIGTERM (systemctl stop) or interrupted
    finally:
        await server.stop()
        await view.stop()
        await store.close()
    return 0
