"""`Lab`: a bridge with a private /24 in the root namespace and simulated hosts on it
(`hosts.py`), and the etcd those hosts reach at the bridge's address."""

from __future__ import annotations

import contextlib
import fcntl
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pyroute2 import IPRoute, netns

from e2e.harness.etcd import EtcdCluster
from e2e.harness.host_support import LabError, link_index, route_inside
from e2e.harness.hosts import GUEST_BRIDGE, SimulatedHost

NETWORK_LOCK = Path(tempfile.gettempdir()) / "kvmctl-lab-network.lock"
QEMU_USER = "libvirt-qemu"  # libvirtd refuses to start without it, whatever qemu.conf says


class Lab:
    """A bridge with a private /24 in the root namespace and simulated hosts on it.

    Use as a context manager; `cleanup()` removes every process, namespace, link and directory
    the lab made, even after a failure half-way through `start()`.
    """

    def __init__(self, host_names: Sequence[str] = ("host1", "host2")) -> None:
        if len(set(host_names)) != len(host_names) or not host_names:
            raise LabError(f"host names must be distinct and not empty: {list(host_names)}")
        self.lab_id = secrets.token_hex(3)
        self.bridge = f"kvl{self.lab_id}"
        self.root = Path(tempfile.mkdtemp(prefix=f"kvmctl-lab-{self.lab_id}-"))
        self.subnet_prefix = ""  # chosen in start(), e.g. "10.123.45"
        self.hosts = {name: SimulatedHost(self, name, i) for i, name in enumerate(host_names)}
        self._etcd_clusters: list[EtcdCluster] = []

    @property
    def gateway_address(self) -> str:
        """The root namespace's address on the lab network: where hosts reach etcd."""
        return f"{self.subnet_prefix}.1"

    def __getitem__(self, name: str) -> SimulatedHost:
        return self.hosts[name]

    def start_etcd(self, size: int = 1, extra_args: Sequence[str] = ()) -> EtcdCluster:
        """Start an etcd the hosts can reach: its members also listen on the gateway address.

        `cluster.endpoints` stay loopback addresses for the test itself; agents inside the
        hosts get `lab.host_etcd_endpoints(cluster)`. `cleanup()` stops it after the hosts.
        """
        cluster = EtcdCluster(
            size=size,
            extra_args=list(extra_args),
            client_hosts=["127.0.0.1", self.gateway_address],
        )
        self._etcd_clusters.append(cluster)
        return cluster.start()

    def host_etcd_endpoints(self, cluster: EtcdCluster) -> list[str]:
        """The endpoints of a `start_etcd` cluster as seen from inside the hosts."""
        return [f"{self.gateway_address}:{member.client_port}" for member in cluster.members]

    def start(self) -> Lab:
        try:
            ensure_qemu_user()
            self._create_network()
            for host in self.hosts.values():
                host.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        """Stop every host and remove namespaces, links and directories. Idempotent.

        Every step runs even when an earlier one failed; the failures are reported together.
        """
        steps: list[Callable[[], None]] = [host.stop for host in self.hosts.values()]
        steps += [cluster.stop for cluster in self._etcd_clusters]
        steps += [self._remove_links, self._remove_namespaces]
        steps.append(lambda: shutil.rmtree(self.root, ignore_errors=True))
        failures = []
        for step in steps:
            try:
                step()
            except Exception as error:  # keep cleaning; report below
                failures.append(f"{type(error).__name__}: {error}")
        if failures:
            raise LabError(f"cleanup of lab {self.lab_id} incomplete: {'; '.join(failures)}")

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _remove_links(self) -> None:
        with IPRoute() as ipr:
            for name in [host.uplink for host in self.hosts.values()] + [self.bridge]:
                indexes = ipr.link_lookup(ifname=name)
                if indexes:
                    ipr.link("del", index=indexes[0])

    def _remove_namespaces(self) -> None:
        existing = netns.listnetns()
        for host in self.hosts.values():
            if host.netns in existing:
                netns.remove(host.netns)

    def _create_network(self) -> None:
        with exclusive(NETWORK_LOCK), IPRoute() as ipr:
            self.subnet_prefix = free_subnet_prefix(ipr)
            ipr.link("add", ifname=self.bridge, kind="bridge")
            bridge = link_index(ipr, self.bridge)
            ipr.addr("add", index=bridge, address=self.gateway_address, prefixlen=24)
            ipr.link("set", index=bridge, state="up")
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "add", host.netns], check=True)
            with IPRoute() as ipr:
                ipr.link(
                    "add",
                    ifname=host.uplink,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": host.netns},
                )
                ipr.link("set", index=link_index(ipr, host.uplink), master=bridge, state="up")
            with route_inside(host.netns) as inside:
                inside.link("set", index=link_index(inside, "lo"), state="up")
                eth0 = link_index(inside, "eth0")
                inside.addr("add", index=eth0, address=host.address, prefixlen=24)
                inside.link("set", index=eth0, state="up")
                inside.link("add", ifname=GUEST_BRIDGE, kind="bridge")
                inside.link("set", index=link_index(inside, GUEST_BRIDGE), state="up")


def ensure_qemu_user() -> None:
    result = subprocess.run(["id", "-u", QEMU_USER], capture_output=True, check=False)
    if result.returncode == 0:
        return
    created = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", QEMU_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    # Exit 9: a concurrent lab created it first.
    if created.returncode not in (0, 9):
        raise LabError(f"cannot create system user {QEMU_USER}: {created.stderr.strip()}")


def free_subnet_prefix(ipr: IPRoute) -> str:
    """A 10.x.y prefix whose /24 no address or route on the machine touches."""
    used = {
        ".".join(str(message.get(attribute)).split(".")[:3])
        for message, attribute in [(a, "address") for a in ipr.get_addr(family=socket.AF_INET)]
        + [(r, "dst") for r in ipr.get_routes(family=socket.AF_INET)]
        if message.get(attribute)
    }
    for _ in range(1000):
        prefix = f"10.{random.randint(64, 254)}.{random.randint(1, 254)}"
        if prefix not in used:
            return prefix
    raise LabError("no free 10.x.y.0/24 for the lab network")


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
