"""Simulated KVM hosts on one machine, each with its own namespaces and libvirtd.

A `Lab` is a private /24 on a bridge in the root network namespace plus N `SimulatedHost`s.
Each host is:

- a network namespace holding `eth0` (a veth whose other end is on the lab bridge, address
  `<lab>.<10+i>`), `lo`, and an isolated bridge `br0` for guest NICs;
- a PID + mount + UTS namespace whose init (`python -m e2e.harness.hosts init`, PID 1 in there)
  mounts a private tmpfs on /run, bind-mounts per-host directories over the libvirt state
  directories, starts `libvirtd --listen` and then only reaps orphans. SIGKILL of that init kills
  every process of the host together (libvirtd, qemu guests, agents started with `spawn`), like
  pulling the power; `start()` afterwards powers it on again with the same disks (/etc/libvirt,
  /var/lib/libvirt) and an empty /run.

The hosts reach the root namespace at `lab.gateway_address` (the bridge's address), so etcd must
listen there too: `lab.start_etcd()` starts one that does, and `lab.host_etcd_endpoints(cluster)`
is what agents inside the hosts are given. Nothing routes beyond the lab's /24, so all traffic
stays on the bridge.

Every process is stopped by the PID (pidfd) we started; names are unique per lab, so parallel labs
do not collide. The harness is synchronous, like `e2e/harness/etcd.py`: it is driven from pytest
fixtures and blocking libvirt-python calls, and every call returns quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, NoReturn

from pyroute2 import IPRoute, netns
from pyroute2.netlink import NETLINK_ROUTE

from e2e.harness.etcd import EtcdCluster
from reconcilers.drivers.netns import socket_in_netns

REPO_ROOT = Path(__file__).resolve().parents[2]
NETWORK_LOCK = Path(tempfile.gettempdir()) / "kvmctl-lab-network.lock"
LIBVIRT_TCP_PORT = 16509
GUEST_BRIDGE = "br0"
# Inside a host these paths are bind mounts of the host's own directories (<host dir>/<name>).
HOST_STATE_MOUNTS = {
    "etc-libvirt": "/etc/libvirt",
    "run-libvirt": "/run/libvirt",
    "lib-libvirt": "/var/lib/libvirt",
    "log-libvirt": "/var/log/libvirt",
    "cache-libvirt": "/var/cache/libvirt",
}
# Run by `spawn` inside the host: wait for the go byte on fd argv[1], then become argv[2:].
_EXEC_WHEN_TOLD = (
    "import os, sys; go = int(sys.argv[1]); os.read(go, 1); os.close(go); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)
QEMU_USER = "libvirt-qemu"  # libvirtd refuses to start without it, whatever qemu.conf says


class LabError(RuntimeError):
    """A simulated host or the lab network could not be set up or driven."""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 20 ms until it holds; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(0.02)


class SimulatedHost:
    """One simulated KVM host. Create through `Lab`; `start()` powers it on."""

    def __init__(self, lab: Lab, name: str, index: int) -> None:
        self.lab = lab
        self.name = name
        self.index = index
        self.dir = lab.root / name
        self.netns = f"kvmctl-{lab.lab_id}-{name}"
        self.uplink = f"kvl{lab.lab_id}h{index}"  # root-namespace end of the host's veth
        self.host_uuid = str(uuid.uuid4())
        self._launcher: subprocess.Popen[bytes] | None = None
        self._init_pid: int | None = None
        self._init_pidfd: int | None = None
        self._pid_namespace: str | None = None
        self._spawned: dict[int, subprocess.Popen[bytes]] = {}  # PID -> its nsenter
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The host's address on the lab network."""
        return f"{self.lab.subnet_prefix}.{10 + self.index}"

    @property
    def libvirt_socket(self) -> Path:
        return self.dir / "run-libvirt" / "libvirt-sock"

    @property
    def libvirt_uri(self) -> str:
        """Reaches this host's libvirtd from anywhere on the machine, network cut or not."""
        return f"qemu+unix:///system?socket={self.libvirt_socket}"

    @property
    def libvirt_tcp_uri(self) -> str:
        """Reaches this host's libvirtd over the lab network, as a peer host would."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def migration_uri(self) -> str:
        """The URI for migration data to this host (`migrateToURI3`'s migrate_uri)."""
        return f"tcp://{self.address}"

    @property
    def init_pid(self) -> int:
        """PID (as seen from the root namespace) of the host's namespace init."""
        if self._init_pid is None:
            raise LabError(f"host {self.name} is not running")
        return self._init_pid

    # Power.

    def start(self, timeout: float = 30.0) -> None:
        """Power the host on: namespace init, then libvirtd answering on its sockets."""
        if self.is_running():
            raise LabError(f"host {self.name} is already running")
        self._prepare_dirs()
        with open(self.dir / "init.log", "ab") as log:
            self._launcher = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.netns,
                    "unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts",
                    "--mount-proc", "--propagation", "private",
                    sys.executable, "-m", "e2e.harness.hosts", "init",
                    "--host-dir", str(self.dir), "--hostname", self.name,
                ],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        launcher = self._launcher
        self._init_pid = _wait_for_child(
            launcher, timeout, f"init of host {self.name}", output_of=self.dir / "init.log"
        )
        self._init_pidfd = os.pidfd_open(self._init_pid)
        self._pid_namespace = os.readlink(f"/proc/{self._init_pid}/ns/pid")
        wait_until(
            lambda: self._libvirtd_answers() or launcher.poll() is not None,
            timeout,
            f"libvirtd of host {self.name} (see {self.dir}/libvirtd.log)",
        )
        if launcher.poll() is not None:
            raise LabError(f"host {self.name} died while starting: see {self.dir}/init.log")

    def kill(self) -> None:
        """Pull the power: SIGKILL the namespace init, so every process of the host dies."""
        if self._init_pidfd is not None:
            with contextlib.suppress(ProcessLookupError):  # already dead
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
        # An nsenter whose child was SIGSTOPped stops too and never reaps it, which keeps the
        # namespace from dying: wake the launchers we started.
        for launcher in self._spawned.values():
            if launcher.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    launcher.send_signal(signal.SIGCONT)

    def wait_dead(self, timeout: float = 30.0) -> None:
        """Wait until no process of the host is left, then release what we held for it."""
        wait_until(lambda: not self.processes(), timeout, f"every process of {self.name} gone")
        if self._launcher is not None:
            self._launcher.wait(timeout)
        for launcher in self._spawned.values():
            launcher.wait(timeout)
        self._spawned.clear()
        if self._init_pidfd is not None:
            os.close(self._init_pidfd)
        self._launcher = self._init_pid = self._init_pidfd = None

    def stop(self, timeout: float = 30.0) -> None:
        """Power off and wait for it; also stops the host's watchdog. Idempotent."""
        self.stop_watchdog()
        if self._launcher is None:
            return
        self.kill()
        self.wait_dead(timeout)

    def is_running(self) -> bool:
        """True while the host's init lives."""
        return self._launcher is not None and self._launcher.poll() is None

    # Processes.

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path = REPO_ROOT,
    ) -> int:
        """Run `argv` inside the host (its net, mount, UTS and PID namespaces).

        `env` is added to this process's environment; stdout and stderr go to `log_path` (or
        are discarded). Python finds this tree's code first (`PYTHONPATH`): `kvmctl` is the
        venv's script, whose editable install may point at another checkout. Returns the
        process's PID as seen from the root namespace: signal it directly (SIGSTOP, SIGKILL);
        it dies with the host.
        """
        environment = {**os.environ, **(env or {})}
        python_path = [str(REPO_ROOT), environment.get("PYTHONPATH")]
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, python_path))
        if shutil.which(argv[0], path=environment.get("PATH")) is None:
            raise LabError(f"cannot run {argv[0]!r} on host {self.name}: no such program")
        # The process waits for a byte on `go` before exec'ing argv: we learn its PID even when
        # argv would exit at once.
        go_read, go_write = os.pipe()
        command = [
            "nsenter", f"--target={self.init_pid}", "--mount", "--uts", "--net", "--pid",
            f"--wd={cwd}", "--", sys.executable, "-I", "-S", "-c", _EXEC_WHEN_TOLD,
            str(go_read), *argv,
        ]  # fmt: skip
        try:
            with _output(log_path) as output:
                launcher = subprocess.Popen(
                    command,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    pass_fds=(go_read,),
                    start_new_session=True,
                )
            pid = _wait_for_child(
                launcher, 30.0, f"{argv[0]} on host {self.name}", output_of=log_path
            )
            self._spawned[pid] = launcher
            os.write(go_write, b"x")
        finally:
            os.close(go_read)
            os.close(go_write)
        return pid

    def wait_exit(self, pid: int, timeout: float = 30.0) -> int:
        """Wait for a process from `spawn` to end; its exit status (-N: killed by signal N)."""
        # nsenter waits for the process and exits with its status.
        return self._spawned[pid].wait(timeout)

    def processes(self) -> list[int]:
        """Root-namespace PIDs of every live process of the host."""
        if self._pid_namespace is None:
            return []
        return [pid for pid in _all_pids() if _pid_namespace_of(pid) == self._pid_namespace]

    def qemu_guests(self) -> dict[str, int]:
        """The host's running qemu processes: guest name -> root-namespace PID."""
        guests = {}
        for pid in self.processes():
            name = qemu_guest_name(pid)
            if name is not None:
                guests[name] = pid
        return guests

    def qemu_pids(self) -> list[int]:
        """Root-namespace PIDs of the host's qemu processes."""
        return sorted(self.qemu_guests().values())

    # Network.

    def cut_network(self) -> None:
        """Unplug the host's cable: its veth goes down; the host keeps running."""
        self._set_uplink("down")

    def restore_network(self) -> None:
        """Plug the cable back in."""
        self._set_uplink("up")

    def _set_uplink(self, state: str) -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=_link_index(ipr, self.uplink), state=state)

    # Watchdog.

    def start_watchdog(self, timeout: float) -> Path:
        """Start the stand-in for /dev/watchdog; return the FIFO path the agent opens.

        It runs outside the host, arms on the first byte written and kills the host (its
        namespace init) when no byte arrives for `timeout` seconds; 'V' before close disarms.
        """
        if self._watchdog is not None and self._watchdog.poll() is None:
            raise LabError(f"host {self.name} already has a watchdog")
        fifo = self.dir / "watchdog"
        fifo.unlink(missing_ok=True)
        with open(self.dir / "watchdog.log", "ab") as log:
            self._watchdog = subprocess.Popen(
                [
                    sys.executable, "-m", "e2e.harness.watchdog", "--fifo", str(fifo),
                    "--pid", str(self.init_pid), "--timeout", str(timeout),
                ],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        watchdog = self._watchdog
        wait_until(
            lambda: fifo.exists() or watchdog.poll() is not None,
            30.0,
            f"watchdog FIFO of host {self.name}",
        )
        if watchdog.poll() is not None:
            raise LabError(f"watchdog of host {self.name} exited: see {self.dir}/watchdog.log")
        return fifo

    def stop_watchdog(self) -> None:
        if self._watchdog is None:
            return
        if self._watchdog.poll() is None:
            self._watchdog.kill()
        self._watchdog.wait()
        self._watchdog = None

    def watchdog_fired(self) -> bool:
        """True once the watchdog has killed the host (it exits 0 only after firing)."""
        return self._watchdog is not None and self._watchdog.poll() == 0

    # Set-up.

    def _prepare_dirs(self) -> None:
        for directory in HOST_STATE_MOUNTS:
            (self.dir / directory).mkdir(parents=True, exist_ok=True)
        run_dir = self.dir / "run-libvirt"  # /run is volatile: empty at every power-on
        shutil.rmtree(run_dir)
        run_dir.mkdir()
        etc = self.dir / "etc-libvirt"
        (etc / "libvirtd.conf").write_text(
            _config_lines(
                {
                    "host_uuid": self.host_uuid,
                    "auth_unix_rw": "none",
                    "auth_unix_ro": "none",
                    "unix_sock_dir": HOST_STATE_MOUNTS["run-libvirt"],
                    "listen_tls": 0,
                    "listen_tcp": 1,
                    "listen_addr": self.address,
                    "tcp_port": str(LIBVIRT_TCP_PORT),
                    "auth_tcp": "none",
                    "log_outputs": "3:stderr",
                }
            )
        )
        migration_port = 49152 + 64 * self.index
        (etc / "qemu.conf").write_text(
            _config_lines(
                {
                    "stdio_handler": "file",
                    "security_driver": "none",
                    "cgroup_controllers": [],
                    "user": "root",
                    "group": "root",
                    "dynamic_ownership": 0,
                    "remember_owner": 0,
                    "namespaces": [],
                    "migration_port_min": migration_port,
                    "migration_port_max": migration_port + 63,
                }
            )
        )

    def _libvirtd_answers(self) -> bool:
        """The unix socket accepts, and the TCP port listens in the host's network namespace
        (read from /proc, so this holds with the host's network cut too)."""
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.libvirt_socket))
            except OSError:
                return False
        listening = f":{LIBVIRT_TCP_PORT:04X} 00000000:0000 0A"  # local port, any peer, LISTEN
        try:
            return listening in Path(f"/proc/{self.init_pid}/net/tcp").read_text()
        except OSError:
            return False


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
            _ensure_qemu_user()
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
        with _exclusive(NETWORK_LOCK), IPRoute() as ipr:
            self.subnet_prefix = _free_subnet_prefix(ipr)
            ipr.link("add", ifname=self.bridge, kind="bridge")
            bridge = _link_index(ipr, self.bridge)
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
                ipr.link("set", index=_link_index(ipr, host.uplink), master=bridge, state="up")
            with route_inside(host.netns) as inside:
                inside.link("set", index=_link_index(inside, "lo"), state="up")
                eth0 = _link_index(inside, "eth0")
                inside.addr("add", index=eth0, address=host.address, prefixlen=24)
                inside.link("set", index=eth0, state="up")
                inside.link("add", ifname=GUEST_BRIDGE, kind="bridge")
                inside.link("set", index=_link_index(inside, GUEST_BRIDGE), state="up")


# Helpers.


def route_inside(netns_name: str) -> IPRoute:
    """An IPRoute inside a named namespace, opened without pyroute2's fork (see drivers.netns)."""
    sock = socket_in_netns(netns_name, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    return IPRoute(fileno=sock.detach())


def _config_lines(settings: Mapping[str, str | int | list[str]]) -> str:
    """libvirt's config syntax: strings quoted, numbers bare, lists in brackets."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, list):
            rendered = "[ " + ", ".join(f'"{item}"' for item in value) + " ]"
        elif isinstance(value, int):
            rendered = str(value)
        else:
            rendered = f'"{value}"'
        lines.append(f"{key} = {rendered}\n")
    return "".join(lines)


def _ensure_qemu_user() -> None:
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


def _free_subnet_prefix(ipr: IPRoute) -> str:
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


def _link_index(ipr: IPRoute, name: str) -> int:
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        raise LabError(f"network link {name} does not exist")
    index: int = indexes[0]
    return index


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _output(log_path: Path | None) -> Iterator[IO[bytes] | int]:
    if log_path is None:
        yield subprocess.DEVNULL
        return
    with open(log_path, "ab") as log:
        yield log


def _wait_for_child(
    launcher: subprocess.Popen[bytes], timeout: float, what: str, output_of: Path | None = None
) -> int:
    """The PID of the process `launcher` (unshare or nsenter) forked.

    If it exits first, the LabError quotes the last lines of `output_of`, where it wrote.
    """
    children_file = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    children: list[str] = []

    def forked() -> bool:
        nonlocal children
        try:
            children = children_file.read_text().split()
        except OSError:
            children = []
        return bool(children) or launcher.poll() is not None

    wait_until(forked, timeout, what)
    if not children:
        said = ""
        if output_of is not None and output_of.exists():
            tail = output_of.read_text(errors="replace").splitlines()[-5:]
            said = f"; last output in {output_of}: " + " | ".join(tail)
        raise LabError(f"{what} exited at once with status {launcher.returncode}{said}")
    return int(children[0])


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _pid_namespace_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:  # gone meanwhile
        return None


def qemu_guest_name(pid: int) -> str | None:
    """The libvirt guest name of a qemu process (`-name guest=NAME,...`), else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not argv or not Path(argv[0].decode()).name.startswith("qemu-system"):
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"-name":
            for part in value.decode().split(","):
                if part.startswith("guest="):
                    return part.removeprefix("guest=")
            return value.decode().split(",")[0]
    return ""


# The host's init: PID 1 of the host's PID namespace.


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def host_init(host_dir: Path, hostname: str) -> NoReturn:
    """Give the host its own /run and libvirt state, start libvirtd, then reap forever."""
    socket.sethostname(hostname)
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    for directory, mount_point in HOST_STATE_MOUNTS.items():
        os.makedirs(mount_point, exist_ok=True)
        _mount("--bind", str(host_dir / directory), mount_point)
    with open(host_dir / "libvirtd.log", "ab") as log:
        subprocess.Popen(["libvirtd", "--listen"], stdout=log, stderr=subprocess.STDOUT)
    # Orphans (qemu, processes whose nsenter died) are re-parented to us: reap them all.
    # SIGCHLD stays blocked so one arriving between wait() and sigwaitinfo() is not lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        try:
            os.wait()
        except ChildProcessError:
            signal.sigwaitinfo({signal.SIGCHLD})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.harness.hosts")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="run as a simulated host's namespace init")
    init.add_argument("--host-dir", type=Path, required=True)
    init.add_argument("--hostname", required=True)
    args = parser.parse_args(argv)
    host_init(args.host_dir, args.hostname)


if __name__ == "__main__":
    sys.exit(main())
