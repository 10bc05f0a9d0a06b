"""admin: cluster administration (etcd users and roles, store migration)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controller.migrate_store import migrate_store
from controller.rbac import apply_rbac, cluster_roles, describe_roles

from .connect import store_from


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def register(commands: Any) -> None:
    admin = commands.add_parser("admin", help="cluster administration")
    topics = admin.add_subparsers(dest="topic", metavar="TOPIC")
    topics.required = True
    rbac = topics.add_parser(
        "rbac",
        help="etcd users and roles for the controller, agents and monitoring",
        description="Users are the CNs of make-certs.sh's client certificates: admin, "
        "controller, monitor, agent-<node>, fence-<guest cluster>. See docs/security.md.",
    )
    actions = rbac.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name, help_text in (
        ("apply", "create or correct users and roles, then enable authentication"),
        ("show", "print the permissions apply would set (no etcd needed)"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument(
            "--nodes", type=_names, required=True, metavar="NODE,...", help="agent nodes"
        )
        action.add_argument(
            "--secret-readers",
            type=_names,
            default=[],
            metavar="NODE,...",
            help="storage nodes whose agents read Secrets (CHAP targets)",
        )
        action.add_argument(
            "--guest-clusters",
            type=_names,
            default=[],
            metavar="CLUSTER,...",
            help="guest clusters whose fence_kvmctl (user fence-CLUSTER) fences their VMs",
        )
        if name == "apply":
            action.add_argument(
                "--no-enable", action="store_true", help="set roles but leave auth as it is"
            )
        action.set_defaults(func=run_rbac_apply if name == "apply" else run_rbac_show)
    migrate = topics.add_parser(
        "migrate-store",
        help="move a store of an older kvmctl to the key layout by writer (idempotent)",
        description="Moves each object of the objects/... layout into its spec key and status "
        "parts, one transaction per object. Stop the controllers and agents first.",
    )
    migrate.set_defaults(func=run_migrate_store)


async def run_rbac_apply(args: argparse.Namespace) -> int:
    roles = cluster_roles(args.nodes, args.secret_readers, args.guest_clusters)
    async with store_from(args) as store:
        changes = await apply_rbac(store, roles, enable=not args.no_enable)
    for line in changes or ["users and roles unchanged"]:
        print(line)
    if not args.no_enable:
        print("authentication enabled")
    return 0


async def run_rbac_show(args: argparse.Namespace) -> int:
    roles = cluster_roles(args.nodes, args.secret_readers, args.guest_clusters)
    for line in describe_roles(roles):
        print(line)
    return 0


async def run_migrate_store(args: argparse.Namespace) -> int:
    store = store_from(args)
    try:
        await store.connect(check_layout=False)
        lines, left = await migrate_store(store)
    finally:
        await store.close()
    for line in lines:
        print(line)
    if left:
        print(
            f"error: {left} object(s) not migrated; the store stays in the old layout",
            file=sys.stderr,
        )
        return 1
    print(f"store at {store.prefix}: key layout version 2")
    return 0
