"""Link events to the Bond queue: which Bonds use a link, and the netlink watch that enqueues
them."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from typing import NoReturn

from controller.runtime.informer import Informer, KeySink
from crds import Bond
from reconcilers.drivers.netlink import Netlink, NetlinkDriverError

log = logging.getLogger("reconcilers.bond")  # one logger for the whole Bond reconciler


def bond_keys_for_link(bonds: Iterable[Bond], node: str, link: str) -> list[str]:
    """Names of the Bonds on `node` that use link `link` (as bond, slave or bridge)."""
    keys = []
    for bond in bonds:
        spec = bond.spec
        if spec.node != node:
            continue
        names = {spec.interface, *spec.slaves}
        if spec.bridge is not None:
            names.add(spec.bridge.name)
        if link in names:
            keys.append(bond.metadata.name)
    return keys


async def watch_bond_links(
    netns: str | None, node: str, bonds: Informer, queue: KeySink
) -> NoReturn:
    """Enqueue the Bonds that use a link whenever it changes (carrier, master, up/down).

    Runs until cancelled. When the kernel dropped events (the watch fell behind: ENOBUFS), it
    watches anew and enqueues every Bond of this node, since any of their links may have
    changed unseen. Any other failure raises `NetlinkDriverError`, so the task group running
    it fails instead of carrying on without link events.
    """
    async with Netlink(netns) as nl:
        while True:
            try:
                async for event in nl.watch_links():
                    if event.action == "existing":
                        continue
                    for key in bond_keys_for_link(_cached_bonds(bonds), node, event.link.name):
                        queue.add(key)
            except NetlinkDriverError as error:
                if error.code != errno.ENOBUFS:
                    raise
                log.warning("%s; re-reading every Bond of %s", error, node)
                for bond in _cached_bonds(bonds):
                    if bond.spec.node == node:
                        queue.add(bond.metadata.name)
                continue
            raise NetlinkDriverError(f"the link watch in {netns or 'the current namespace'} ended")


def _cached_bonds(bonds: Informer) -> list[Bond]:
    return [bond for bond in bonds.list() if isinstance(bond, Bond)]
