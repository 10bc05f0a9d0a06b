"""Start and stop real etcd servers for tests, benchmarks and the demo.

Each server listens on free loopback ports and keeps its data under /dev/shm when it exists.
A port picked free can be taken before etcd binds it: the cluster then starts again on fresh
ports (`START_ATTEMPTS`). Processes are stopped by the PID we started, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_ATTEMPTS = 5
"""How often a cluster is started on fresh ports when one of its ports was taken meanwhile."""
HEALTHY_TIMEOUT = 60.0
PORT_TAKEN = "address already in use"


class EtcdStartError(RuntimeError):
    """etcd did not start; the message carries the end of its log."""


class EtcdPortTaken(EtcdStartError):
    """A member exited at start-up because one of its ports was taken after it was picked."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:  # all bound at once, so no port is handed out twice
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def data_root() -> Path:
    """Where test etcd data goes: /dev/shm when writable (etcd fsyncs every write)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@dataclass
class EtcdMember:
    """One etcd process. `cluster` is the full --initial-cluster string."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    cluster: str
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    pki: Path | None = None
    """A folder from deploy/etcd/make-certs.sh: serve clients over mutual TLS when set."""
    client_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    """The addresses clients reach this member on (all on `client_port`)."""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def _scheme(self) -> str:
        return "https" if self.pki else "http"

    @property
    def _client_urls(self) -> str:
        return ",".join(f"{self._scheme}://{host}:{self.client_port}" for host in self.client_hosts)

    def _tls_args(self) -> list[str]:
        if self.pki is None:
            return []
        return [
            f"--cert-file={self.pki / 'etcd1.crt'}",
            f"--key-file={self.pki / 'etcd1.key'}",
            f"--trusted-ca-file={self.pki / 'ca.crt'}",
            "--client-cert-auth",
        ]

    def start(self, state: str = "new") -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.name}.log"
        args = [
            "etcd",
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self._client_urls,
            "--advertise-client-urls", self._client_urls,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", self.cluster,
            "--initial-cluster-state", state,
            "--logger=zap",
            "--log-outputs=stderr",
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def healthy(self) -> bool:
        context = None
        if self.pki is not None:
            context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            context.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        url = f"{self._scheme}://{self.endpoint}/health"
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as reply:
                return b'"true"' in reply.read()
        except OSError:
            return False

    def check_running(self) -> None:
        """Raise `EtcdPortTaken` or `EtcdStartError` if the process has exited."""
        if self.process is None or self.process.poll() is None:
            return
        log = self._log_text()
        message = (
            f"etcd {self.name} exited with status {self.process.returncode}: {_complaint(log)}"
        )
        raise EtcdPortTaken(message) if PORT_TAKEN in log else EtcdStartError(message)

    def _log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            if self.healthy():
                return
            time.sleep(0.05)
        raise TimeoutError(f"etcd {self.name} not healthy after {timeout}s: see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class EtcdCluster:
    """One or more etcd members on loopback; `endpoints` is what clients are given.

    `client_hosts` are the addresses the members serve clients on (loopback by default). The
    ports, and so `members` and `endpoints`, are final only once `start()` returned.
    """

    def __init__(
        self,
        size: int = 1,
        extra_args: list[str] | None = None,
        pki: Path | None = None,
        client_hosts: list[str] | None = None,
    ) -> None:
        if pki is not None and size != 1:
            raise ValueError("TLS test clusters have one member (the certificate is etcd1's)")
        self.size = size
        self.extra_args = list(extra_args or [])
        self.pki = pki
        self.client_hosts = list(client_hosts or ["127.0.0.1"])
        self.root = Path(tempfile.mkdtemp(prefix="kvmctl-etcd-", dir=data_root()))
        self.members = self._new_members()

    def _new_members(self) -> list[EtcdMember]:
        """Members on freshly picked ports."""
        ports = free_ports(2 * self.size)
        pairs = list(zip(ports[0::2], ports[1::2], strict=True))
        cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(pairs))
        return [
            EtcdMember(
                name=f"m{i}",
                client_port=client,
                peer_port=peer,
                data_dir=self.root / f"m{i}",
                cluster=cluster,
                extra_args=list(self.extra_args),
                pki=self.pki,
                client_hosts=list(self.client_hosts),
            )
            for i, (client, peer) in enumerate(pairs)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self) -> EtcdCluster:
        """Start every member and wait until all are healthy; on failure nothing is left running.

        When a member exits because a port was taken after it was picked, the whole cluster
        starts again on fresh ports, up to `START_ATTEMPTS` times.
        """
        attempts = 1
        while True:
            try:
                self._start_once()
                return self
            except EtcdPortTaken as error:
                if attempts == START_ATTEMPTS:
                    raise EtcdStartError(
                        f"etcd did not start in {attempts} attempts on fresh ports: {error}"
                    ) from None
                if any(member.extra_args != self.extra_args for member in self.members):
                    raise EtcdStartError(
                        f"{error}; not retried on fresh ports: a member's extra_args were changed "
                        "after construction and may name the old ones (pass client_hosts instead)"
                    ) from None
                self.members = self._new_members()
                attempts += 1

    def _start_once(self) -> None:
        try:
            for member in self.members:
                member.start()
            deadline = time.monotonic() + HEALTHY_TIMEOUT
            waiting = list(self.members)
            while waiting:
                for member in self.members:
                    member.check_running()
                waiting = [member for member in waiting if not member.healthy()]
                if waiting and time.monotonic() > deadline:
                    names = ", ".join(member.name for member in waiting)
                    raise EtcdStartError(f"etcd {names} not healthy after {HEALTHY_TIMEOUT} s")
                time.sleep(0.05)
        except BaseException:
            self._stop_members()
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def restart(self, index: int = 0) -> None:
        member = self.members[index]
        member.stop()
        member.start(state="existing")
        member.wait_healthy()

    def stop(self) -> None:
        self._stop_members()
        shutil.rmtree(self.root, ignore_errors=True)

    def _stop_members(self) -> None:
        # Followers first: a 3.4 leader stopped after its peers can hang for many seconds.
        for member in reversed(self.members):
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _complaint(log: str) -> str:
    """etcd's last error from its log (zap JSON lines), or else the log's last lines."""
    for line in reversed(log.splitlines()):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "error" in entry:
                return f"{entry.get('msg', 'error')}: {entry['error']}"
    return " | ".join(log.strip().splitlines()[-3:])[-1500:]
