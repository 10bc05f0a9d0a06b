"""The simulated-host harness on real parts: namespaces, one libvirtd per host, TCG guests."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from e2e.guest.build import GuestImage, ensure_guest_image
from e2e.guest.console import BOOTED_LINE, read_ticks, tick_gaps, wait_for_tick
from e2e.harness.host_support import wait_until
from e2e.harness.hosts import GUEST_BRIDGE, SimulatedHost
from e2e.harness.lab import Lab

MIGRATION_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """Errors are raised as exceptions; do not also print them on stderr."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return ensure_guest_image()


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(["host-a", "host-b"]) as running:
        yield running


def start_guest(
    host: SimulatedHost, image: GuestImage, tmp_path: Path, bridge: str | None = None
) -> Path:
    """Define and start the test guest on `host`; return its serial log once it counts."""
    serial_log = tmp_path / "guest-serial.log"
    conn = libvirt.open(host.libvirt_uri)
    try:
        domain = conn.defineXML(image.domain_xml("guest", serial_log, bridge=bridge))
        domain.create()
    finally:
        conn.close()
    wait_for_tick(serial_log, above=0)
    return serial_log


def migrate(guest: str, source: SimulatedHost, target: SimulatedHost) -> None:
    """Live peer-to-peer migration: source libvirtd talks to the target over the lab network."""
    conn = libvirt.open(source.libvirt_uri)
    try:
        domain = conn.lookupByName(guest)
        params = {libvirt.VIR_MIGRATE_PARAM_URI: target.migration_uri}
        domain.migrateToURI3(target.libvirt_tcp_uri, params, MIGRATION_FLAGS)
    finally:
        conn.close()


def test_hosts_are_separate_machines(lab: Lab, tmp_path: Path) -> None:
    host_a, host_b = lab["host-a"], lab["host-b"]
    uuids = set()
    for host in (host_a, host_b):
        conn = libvirt.open(host.libvirt_tcp_uri)
        try:
            assert conn.getHostname() == host.name
            uuids.add(conn.getCapabilities().split("<uuid>")[1].split("</uuid>")[0])
        finally:
            conn.close()
    assert len(uuids) == 2

    # A process spawned in a host lives in its PID namespace and reaches the lab gateway.
    with socket.socket() as server:
        server.bind((lab.gateway_address, 0))
        server.listen()
        server.settimeout(30)
        port = server.getsockname()[1]
        log = tmp_path / "client.log"
        pid = host_a.spawn(
            [
                "python3", "-c",
                "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])));"
                "s.sendall(socket.gethostname().encode())",
                lab.gateway_address, str(port),
            ],
            log_path=log,
        )  # fmt: skip
        assert pid in host_a.processes() or not os.path.exists(f"/proc/{pid}")
        connection, (peer_address, _) = server.accept()
        with connection:
            connection.settimeout(30)
            assert connection.recv(100) == b"host-a"
        assert peer_address == host_a.address


def test_hosts_reach_etcd_on_the_lab_gateway(lab: Lab, tmp_path: Path) -> None:
    cluster = lab.start_etcd()
    [endpoint] = lab.host_etcd_endpoints(cluster)
    log = tmp_path / "etcdctl.log"
    put = lab["host-b"].spawn(
        ["etcdctl", f"--endpoints=http://{endpoint}", "put", "/lab-check", "from-host-b"],
        env={"ETCDCTL_API": "3"},
        log_path=log,
    )
    assert lab["host-b"].wait_exit(put) == 0, log.read_text()
    get = subprocess.run(
        [
            "etcdctl",
            f"--endpoints=http://{cluster.endpoints[0]}",
            "get",
            "--print-value-only",
            "/lab-check",
        ],
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert get.stdout.strip() == "from-host-b"


@pytest.mark.slow
def test_killing_a_host_kills_all_its_processes(
    lab: Lab, guest_image: GuestImage, tmp_path: Path
) -> None:
    host_a, host_b = lab["host-a"], lab["host-b"]
    start_guest(host_a, guest_image, tmp_path)
    assert list(host_a.qemu_guests()) == ["guest"]
    sleeper = host_a.spawn(["sleep", "600"])
    assert sleeper in host_a.processes()

    host_a.kill()
    host_a.wait_dead()

    assert host_a.qemu_pids() == []
    assert not os.path.exists(f"/proc/{sleeper}")
    assert host_b.is_running() and host_b.processes()

    # Power on again, cable still out: libvirtd answers on its unix socket, the persistent
    # definition survived, nothing runs.
    host_a.cut_network()
    host_a.start()
    conn = libvirt.open(host_a.libvirt_uri)
    try:
        assert not conn.lookupByName("guest").isActive()
    finally:
        conn.close()


@pytest.mark.slow
def test_live_migration_keeps_the_guest_counting(
    lab: Lab, guest_image: GuestImage, tmp_path: Path
) -> None:
    host_a, host_b = lab["host-a"], lab["host-b"]
    # With a NIC on the host's guest bridge: qemu gets a tap device on both sides.
    serial_log = start_guest(host_a, guest_image, tmp_path, bridge=GUEST_BRIDGE)
    source_pid = host_a.qemu_guests()["guest"]

    migrate("guest", host_a, host_b)

    assert list(host_b.qemu_guests()) == ["guest"]
    wait_until(lambda: not host_a.qemu_pids(), 30, "qemu gone from the source")
    assert not os.path.exists(f"/proc/{source_pid}")
    ticks_at_switch = read_ticks(serial_log)[-1]
    wait_for_tick(serial_log, above=ticks_at_switch + 10)
    ticks = read_ticks(serial_log)
    assert ticks[0] == 0 and tick_gaps(ticks) == []
    assert serial_log.read_bytes().count(BOOTED_LINE) == 1


@pytest.mark.slow
def test_guest_powers_off_on_shutdown(lab: Lab, guest_image: GuestImage, tmp_path: Path) -> None:
    host = lab["host-a"]
    serial_log = start_guest(host, guest_image, tmp_path)
    conn = libvirt.open(host.libvirt_uri)
    try:
        domain = conn.lookupByName("guest")
        domain.shutdown()  # the ACPI power button
        wait_until(lambda: not domain.isActive(), 60, "guest shut off after shutdown()")
        state, reason = domain.state()
        assert (state, reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
    finally:
        conn.close()
    assert b"kvmctl-guest powering off" in serial_log.read_bytes()
    assert host.qemu_pids() == []


@pytest.mark.slow
def test_migration_to_a_cut_off_host_fails_and_the_guest_keeps_running(
    lab: Lab, guest_image: GuestImage, tmp_path: Path
) -> None:
    host_a, host_b = lab["host-a"], lab["host-b"]
    serial_log = start_guest(host_a, guest_image, tmp_path)
    host_b.cut_network()

    with pytest.raises(libvirt.libvirtError):
        migrate("guest", host_a, host_b)

    assert list(host_a.qemu_guests()) == ["guest"] and host_b.qemu_pids() == []
    before = read_ticks(serial_log)[-1]
    wait_for_tick(serial_log, above=before + 5)
    assert tick_gaps(read_ticks(serial_log)) == []

    # The cable back in: the same migration succeeds.
    host_b.restore_network()
    migrate("guest", host_a, host_b)
    assert list(host_b.qemu_guests()) == ["guest"]


class WatchdogFeeder:
    """Writes a byte to the watchdog FIFO every `interval` seconds, as an agent would."""

    def __init__(self, fifo: Path, interval: float) -> None:
        self._fd = os.open(fifo, os.O_WRONLY)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        while not self._stop.is_set():
            os.write(self._fd, b"\0")
            self._stop.wait(self._interval)

    def stop(self, magic_close: bool) -> None:
        self._stop.set()
        self._thread.join()
        if magic_close:
            os.write(self._fd, b"V")
        os.close(self._fd)


def watchdog_log(host: SimulatedHost) -> str:
    return (host.dir / "watchdog.log").read_text()


def stays_alive(host: SimulatedHost, seconds: float) -> bool:
    """Watch the host for `seconds` (a negative check cannot end early unless it fails)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not host.is_running():
            return False
        time.sleep(0.05)
    return True


def test_watchdog_kills_the_host_when_no_longer_fed(lab: Lab) -> None:
    host = lab["host-a"]
    fifo = host.start_watchdog(timeout=1.0)
    feeder = WatchdogFeeder(fifo, interval=0.2)
    wait_until(lambda: "state=armed" in watchdog_log(host), 30, "watchdog armed")

    feeder.stop(magic_close=False)  # an agent that crashed: closed without 'V'

    wait_until(lambda: not host.is_running(), 30, "host killed by its watchdog")
    host.wait_dead()
    # The watchdog process exits (status 0) just after it killed the host.
    wait_until(host.watchdog_fired, 30, "the watchdog exited reporting it fired")
    assert lab["host-b"].is_running()


def test_watchdog_spares_a_fed_host_and_disarms_on_magic_close(lab: Lab) -> None:
    host = lab["host-a"]
    timeout = 1.0
    fifo = host.start_watchdog(timeout=timeout)
    assert stays_alive(host, 2 * timeout)  # disarmed until the first byte

    feeder = WatchdogFeeder(fifo, interval=timeout / 5)
    wait_until(lambda: "state=armed" in watchdog_log(host), 30, "watchdog armed")
    assert stays_alive(host, 3 * timeout)

    feeder.stop(magic_close=True)
    wait_until(lambda: "disarmed by magic close" in watchdog_log(host), 30, "watchdog disarmed")
    assert stays_alive(host, 3 * timeout)
    assert not host.watchdog_fired()
