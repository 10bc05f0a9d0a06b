"""Simulated KVM hosts on one machine, each with its own namespaces and libvirtd.

A `Lab` (lab.py) is a private /24 on a bridge in the root network namespace plus N
`SimulatedHost`s. Each host is:

- a network namespace holding `eth0` (a veth whose other end is on the lab bridge, address
  `<lab>.<10+i>`), `lo`, and an isolated bridge `br0` for guest NICs;
- a PID + mount + UTS namespace whose init (`python -m e2e.harness.host_init init`, PID 1 in
  there) mounts a private tmpfs on /run, bind-mounts per-host directories over the libvirt state
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

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pyroute2 import IPRoute

from e2e.harness.host_init import HOST_STATE_MOUNTS
from e2e.harness.host_support import (
    LabError,
    all_pids,
    link_index,
    log_output,
    pid_namespace_of,
    qemu_guest_name,
    wait_for_child,
    wait_until,
)

if TYPE_CHECKING:
    from e2e.harness.lab import Lab

REPO_ROOT = Path(__file__).resolve().parents[2]
LIBVIRT_TCP_PORT = 16509
GUEST_BRIDGE = "br0"
# Run by `spawn` inside the host: wait for the go byte on fd argv[1], then become argv[2:].
_EXEC_WHEN_TOLD = (
    "import os, sys; go = int(sys.argv[1]); os.read(go, 1); os.close(go); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


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
                    sys.executable, "-m", "e2e.harness.host_init", "init",
                    "--host-dir", str(self.dir), "--hostname", self.name,
                ],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        launcher = self._launcher
        self._init_pid = wait_for_child(
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
            with log_output(log_path) as output:
                launcher = subprocess.Popen(
                    command,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    pass_fds=(go_read,),
                    start_new_session=True,
                )
            pid = wait_for_child(
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
        return [pid for pid in all_pids() if pid_namespace_of(pid) == self._pid_namespace]

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
            ipr.link("set", index=link_index(ipr, self.uplink), state=state)

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
