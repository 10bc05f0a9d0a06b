"""Sockets in a named network namespace, opened from a thread that enters it (no fork)."""

from __future__ import annotations

import os
import socket

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink import NETLINK_ROUTE

from reconcilers.drivers.netns import NetnsError, socket_in_netns


def link_names(route: IPRoute) -> set[str]:
    return {link.get("ifname") for link in route.get_links()}


def test_a_netlink_socket_sees_the_namespace_and_the_caller_stays_put(netns: str) -> None:
    own_namespace = os.stat("/proc/thread-self/ns/net").st_ino
    sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    with IPRoute(fileno=sock.detach()) as inside:
        assert link_names(inside) == {"lo"}
    assert os.stat("/proc/thread-self/ns/net").st_ino == own_namespace
    with IPRoute() as outside:
        assert link_names(outside) != {"lo"}


def test_a_missing_namespace_is_one_clear_error() -> None:
    with pytest.raises(NetnsError, match="network namespace 'kvmctl-no-such-ns' does not exist"):
        socket_in_netns("kvmctl-no-such-ns", socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)


@pytest.mark.parametrize("name", ["", "..", "../etc", "a/b", "x\n", "-rf"])
def test_names_that_could_escape_the_netns_directory_are_refused(name: str) -> None:
    with pytest.raises(NetnsError, match="invalid network namespace name"):
        socket_in_netns(name, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
