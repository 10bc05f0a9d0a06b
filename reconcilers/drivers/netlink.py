"""Thin async driver over rtnetlink (pyroute2 0.9 `AsyncIPRoute`) for links, bonds and bridges.

The only code in kvmctl that talks netlink. Every method is one or a few kernel requests;
deciding *what* to change is the reconcilers' job. Kernel errors come out as
`NetlinkDriverError` with a sentence naming the operation and the link. The error and the
records (`Link`, `BondInfo`, `LinkEvent`, `Address`, `BOND_MODES`) are in netlink_types; import
them from here.

    async with Netlink("host1") as nl:
        await nl.create_bond("bond0", "active-backup", miimon=100)
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import AsyncIterator, Awaitable
from types import TracebackType
from typing import Any, Literal, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink import NETLINK_ROUTE
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK

from .netlink_types import (
    BOND_MODES,
    Address,
    BondInfo,
    Link,
    LinkEvent,
    NetlinkDriverError,
)
from .netns import NetnsError, socket_in_netns

__all__ = [
    "BOND_MODES",
    "Address",
    "BondInfo",
    "Link",
    "LinkEvent",
    "Netlink",
    "NetlinkDriverError",
]

_BOND_MODE_NAMES = {number: name for name, number in BOND_MODES.items()}
_IFF_UP = 0x1

T = TypeVar("T")


_BOND_REASONS = {
    errno.EOPNOTSUPP: "kernel has no bonding support",
    errno.ENOTEMPTY: "only possible while the bond has no slaves",
    errno.EBUSY: "only possible while the bond is down",
}


def _explain(code: int, operation: str) -> str:
    if "bond" in operation and code in _BOND_REASONS:
        return f"{operation}: {_BOND_REASONS[code]} (errno {code})"
    reasons = {
        errno.ENODEV: "no such link",
        errno.EEXIST: "already exists",
        errno.EBUSY: "link is busy",
        errno.EPERM: "not permitted",
        errno.EOPNOTSUPP: "not supported by this kernel or link type",
        errno.EADDRNOTAVAIL: "address not present",
        errno.ENOBUFS: "the kernel dropped events that were not read in time",
    }
    reason = reasons.get(code, os.strerror(code))
    return f"{operation}: {reason} (errno {code})"


class Netlink:
    """Netlink access to one network namespace (None: the caller's own namespace).

    A named namespace must already exist: it is opened read-only, never created.
    Use as an async context manager, or call `open()` and `close()`.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: AsyncIPRoute | None = None

    async def open(self) -> None:
        """Open the netlink socket (inside the namespace when one is named)."""
        self._ipr = await self._new_socket()

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def __aenter__(self) -> Netlink:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def _new_socket(self, groups: int = 0) -> AsyncIPRoute:
        if self.netns is None:
            return AsyncIPRoute(groups=groups)
        try:
            sock = socket_in_netns(self.netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
        except NetnsError as error:
            raise NetlinkDriverError(str(error.strerror), error.errno or errno.EIO) from None
        return AsyncIPRoute(fileno=sock.detach(), groups=groups)

    @property
    def _route(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise NetlinkDriverError("netlink driver used before open()")
        return self._ipr

    async def _call(self, operation: str, request: Awaitable[T]) -> T:
        try:
            return await request
        except NetlinkError as error:
            raise NetlinkDriverError(_explain(error.code, operation), error.code) from None

    async def _collect(self, operation: str, request: Awaitable[AsyncIterator[Any]]) -> list[Any]:
        """All messages of a dump request (errors may also arrive while reading it)."""
        try:
            return [message async for message in await request]
        except NetlinkError as error:
            raise NetlinkDriverError(_explain(error.code, operation), error.code) from None

    # -- reading ------------------------------------------------------------------------------

    async def _dump(self) -> list[Any]:
        return await self._collect("list links", self._route.link("dump"))

    async def links(self) -> list[Link]:
        """Every link in the namespace."""
        messages = await self._dump()
        names = {message["index"]: message.get("ifname") for message in messages}
        return [_to_link(message, names) for message in messages]

    async def link(self, name: str) -> Link:
        """One link by name; `NetlinkDriverError` (code ENODEV) if there is none."""
        message = await self._get(name)
        master_index = message.get("master")
        names = {}
        if master_index:
            master = await self._call(
                f"look up master of {name}", self._route.link("get", index=master_index)
            )
            names[master_index] = master[0].get("ifname")
        return _to_link(message, names)

    async def exists(self, name: str) -> bool:
        indices = await self._call(f"look up {name}", self._route.link_lookup(ifname=name))
        return bool(indices)

    async def _get(self, name: str, operation: str = "") -> Any:
        """The kernel's message for link `name`; errors name `operation` (default: the lookup)."""
        operation = operation or f"get link {name}"
        replies = await self._call(operation, self._route.link("get", ifname=name))
        return replies[0]

    async def _index(self, name: str, operation: str = "") -> int:
        index: int = (await self._get(name, operation))["index"]
        return index

    async def bond_info(self, name: str) -> BondInfo:
        """Mode, miimon, primary, active slave and slaves of bond `name`."""
        message = await self._get(name)
        if message.get(("linkinfo", "kind")) != "bond":
            raise NetlinkDriverError(f"bond info for {name}: link is not a bond")
        messages = await self._dump()
        names = {m["index"]: m.get("ifname") for m in messages}
        slaves = [m.get("ifname") for m in messages if m.get("master") == message["index"]]
        data = ("linkinfo", "data")
        mode = message.get((*data, "bond_mode"))
        return BondInfo(
            mode=_BOND_MODE_NAMES.get(mode, str(mode)),
            miimon=message.get((*data, "bond_miimon")) or 0,
            primary=names.get(message.get((*data, "bond_primary"))),
            active_slave=names.get(message.get((*data, "bond_active_slave"))),
            slaves=sorted(slaves),
        )

    async def addresses(self, name: str) -> list[Address]:
        """IPv4 and IPv6 addresses on link `name`."""
        index = await self._index(name)
        messages = await self._collect(
            f"list addresses of {name}", self._route.addr("dump", index=index)
        )
        return [
            Address(f"{message.get('address')}/{message['prefixlen']}", message["family"])
            for message in messages
        ]

    # -- creating and deleting ----------------------------------------------------------------

    async def create_veth(self, name: str, peer: str) -> None:
        """A veth pair `name` <-> `peer` (tests and simulated hosts use these as NICs)."""
        await self._call(
            f"create veth {name}",
            self._route.link("add", ifname=name, kind="veth", peer={"ifname": peer}),
        )

    async def create_bond(
        self, name: str, mode: str, miimon: int = 100, primary: str | None = None
    ) -> None:
        """A bond device; `mode` is a name from `BOND_MODES`. `primary` must already be a slave
        or be set later with `set_bond_options` after enslaving."""
        options: dict[str, Any] = {"bond_mode": _mode_number(mode), "bond_miimon": miimon}
        await self._call(
            f"create bond {name}", self._route.link("add", ifname=name, kind="bond", **options)
        )
        if primary is not None:
            await self.set_bond_options(name, primary=primary)

    async def set_bond_options(
        self,
        name: str,
        *,
        mode: str | None = None,
        miimon: int | None = None,
        primary: str | None = None,
    ) -> None:
        """Change bond settings. The kernel only changes the mode of a bond that is down and has
        no slaves; `primary` names a slave."""
        options: dict[str, Any] = {}
        if mode is not None:
            options["bond_mode"] = _mode_number(mode)
        if miimon is not None:
            options["bond_miimon"] = miimon
        if primary is not None:
            options["bond_primary"] = await self._index(
                primary, f"set primary of bond {name} to {primary}"
            )
        if options:
            await self._call(
                f"set options of bond {name}",
                self._route.link("set", ifname=name, kind="bond", **options),
            )

    async def create_bridge(self, name: str) -> None:
        await self._call(
            f"create bridge {name}", self._route.link("add", ifname=name, kind="bridge")
        )

    async def delete_link(self, name: str) -> None:
        await self._call(f"delete link {name}", self._route.link("del", ifname=name))

    # -- changing -----------------------------------------------------------------------------

    async def enslave(self, slave: str, master: str) -> None:
        """Make `slave` a port of bridge or bond `master`. A bond only takes slaves that are
        down, so an up slave of a bond is set down first (the bond brings it back up)."""
        operation = f"enslave {slave} to {master}"
        master_message = await self._get(master, operation)
        slave_index = await self._index(slave, operation)
        if master_message.get(("linkinfo", "kind")) == "bond":
            await self._call(operation, self._route.link("set", index=slave_index, state="down"))
        await self._call(
            operation, self._route.link("set", index=slave_index, master=master_message["index"])
        )

    async def release(self, slave: str) -> None:
        """Remove `slave` from its bond or bridge."""
        await self._call(f"release {slave}", self._route.link("set", ifname=slave, master=0))

    async def set_up(self, name: str) -> None:
        await self._call(f"set {name} up", self._route.link("set", ifname=name, state="up"))

    async def set_down(self, name: str) -> None:
        await self._call(f"set {name} down", self._route.link("set", ifname=name, state="down"))

    async def set_mtu(self, name: str, mtu: int) -> None:
        await self._call(
            f"set MTU of {name} to {mtu}", self._route.link("set", ifname=name, mtu=mtu)
        )

    async def add_address(self, name: str, cidr: str) -> None:
        """Add `cidr` (`10.0.0.1/24`, or IPv6) to link `name`."""
        interface = _parse_cidr(cidr)
        index = await self._index(name)
        await self._call(
            f"add address {cidr} to {name}",
            self._route.addr(
                "add",
                index=index,
                address=str(interface.ip),
                prefixlen=interface.network.prefixlen,
            ),
        )

    async def del_address(self, name: str, cidr: str) -> None:
        interface = _parse_cidr(cidr)
        index = await self._index(name)
        await self._call(
            f"delete address {cidr} from {name}",
            self._route.addr(
                "del",
                index=index,
                address=str(interface.ip),
                prefixlen=interface.network.prefixlen,
            ),
        )

    # -- events -------------------------------------------------------------------------------

    async def watch_links(self) -> AsyncIterator[LinkEvent]:
        """Every link as `existing`, then link changes as they happen (close the generator to
        stop). The listing is taken after subscribing, so no change falls in between.

        Only AF_UNSPEC messages are reported: the kernel also sends AF_BRIDGE copies for
        bridge ports, which carry no carrier. A failing monitor socket raises
        `NetlinkDriverError`, e.g. ENOBUFS when the event loop read too slowly and the kernel
        dropped events: the caller must start over, it has missed changes.
        """
        operation = f"watch links in {self.netns or 'the current namespace'}"
        monitor = await self._new_socket(groups=RTMGRP_LINK)
        try:
            await self._call(operation, monitor.bind())
            messages = await self._dump()
            names: dict[int, str] = {m["index"]: m.get("ifname") for m in messages}
            for message in messages:
                yield LinkEvent("existing", _to_link(message, names))
            while True:
                async for message in self._monitor_messages(operation, monitor):
                    event = message.get("event")
                    if message.get("family") != 0 or event not in ("RTM_NEWLINK", "RTM_DELLINK"):
                        continue
                    names[message["index"]] = message.get("ifname")
                    master_index = message.get("master")
                    if master_index and master_index not in names:
                        names.update({m["index"]: m.get("ifname") for m in await self._dump()})
                    action: Literal["new", "del"] = "new" if event == "RTM_NEWLINK" else "del"
                    yield LinkEvent(action, _to_link(message, names))
        finally:
            monitor.close()

    async def _monitor_messages(self, operation: str, monitor: AsyncIPRoute) -> AsyncIterator[Any]:
        """The messages of one read from `monitor`; kernel errors name `operation`."""
        try:
            async for message in monitor.get():
                yield message
        except NetlinkError as error:
            raise NetlinkDriverError(_explain(error.code, operation), error.code) from None
        except OSError as error:  # pyroute2 reports ENOBUFS as OSError
            code = error.errno or errno.EIO
            raise NetlinkDriverError(_explain(code, operation), code) from None


def _mode_number(mode: str) -> int:
    try:
        return BOND_MODES[mode]
    except KeyError:
        known = ", ".join(BOND_MODES)
        raise NetlinkDriverError(f"unknown bond mode {mode!r} (known: {known})") from None


def _parse_cidr(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in cidr:
        raise NetlinkDriverError(f"address {cidr!r} needs a prefix length, e.g. 10.0.0.1/24")
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError:
        raise NetlinkDriverError(f"address {cidr!r} is not a valid IP address/prefix") from None


def _to_link(message: Any, names: dict[int, str]) -> Link:
    master_index = message.get("master")
    return Link(
        name=message.get("ifname"),
        index=message["index"],
        kind=message.get(("linkinfo", "kind")),
        master=names.get(master_index) if master_index else None,
        operstate=message.get("operstate") or "UNKNOWN",
        carrier=bool(message.get("carrier")),
        up=bool(message["flags"] & _IFF_UP),
        mtu=message.get("mtu") or 0,
        mac=message.get("address") or "",
    )
