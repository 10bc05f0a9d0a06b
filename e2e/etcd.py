"""Start and stop real etcd servers for tests, benchmarks and the demo.

Each server listens on free loopback ports and keeps its data under /dev/shm when it exists.
Processes are stopped by the PID we started, never by name.
"""

from __future__ import annotations

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _data_root() -> Path:
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

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def _scheme(self) -> str:
        return "https" if self.pki else "http"

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
            "--listen-client-urls", f"{self._scheme}://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"{self._scheme}://127.0.0.1:{self.client_port}",
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

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited: see {self.log_path}")
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
    """One or more etcd members on loopback; `endpoints` is what clients are given."""

    def __init__(
        self, size: int = 1, extra_args: list[str] | None = None, pki: Path | None = None
    ) -> None:
        if pki is not None and size != 1:
            raise ValueError("TLS test clusters have one member (the certificate is etcd1's)")
        self.root = Path(tempfile.mkdtemp(prefix="kvmctl-etcd-", dir=_data_root()))
        ports = [(free_port(), free_port()) for _ in range(size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        self.members = [
            EtcdMember(
                name=f"m{i}",
                client_port=client,
                peer_port=peer,
                data_dir=self.root / f"m{i}",
                cluster=cluster,
                extra_args=list(extra_args or []),
                pki=pki,
            )
            for i, (client, peer) in enumerate(ports)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.start()
        for member in self.members:
            member.wait_healthy()
        return self

    def restart(self, index: int = 0) -> None:
        member = self.members[index]
        member.stop()
        member.start(state="existing")
        member.wait_healthy()

    def stop(self) -> None:
        # Followers first: a 3.4 leader stopped after its peers can hang for many seconds.
        for member in reversed(self.members):
            member.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
