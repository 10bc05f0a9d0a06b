"""etcd as users run it: one member inside each of some simulated hosts.

Each member is a host process (`host.spawn`), so pulling a host's power kills its member too.
It listens on the host's own address (`<address>:2379` for clients, `:2380` for peers; every
host has its own network namespace, so the ports never collide) and keeps its data on the host's
"disk": a directory that survives `host.kill()` / `host.start()`, so a host powered on again
restarts its member from its data dir and rejoins as the same member (etcd 3.4 ignores the
`--initial-cluster*` flags once a data dir exists; the restart passes `existing` all the same).
The data dirs live under /dev/shm when it is writable (etcd's fsyncs; see platform.md), linked
from `<host dir>/etcd-data`.

The root namespace reaches every member on its address over the lab bridge: the tests' own
store connects to all of them. Leader and member list come from `etcdctl` (argv, no shell).

Faults on a member alone (its host keeps running): `kill_member` (SIGKILL; `start_member`
restarts it from its data dir) and, after it, `replace_member` (its disk was lost: the data dir
wiped, the member removed from etcd's member list and added back as a new one, started empty; it
gets the data from the leader). `all_healthy` tells when every member is back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.harness.etcd import data_root
from e2e.harness.host_support import wait_until
from e2e.harness.hosts import SimulatedHost

CLIENT_PORT = 2379
PEER_PORT = 2380
HEALTHY_TIMEOUT = 90.0
"""Generous: a member restarting on a loaded 2-core machine replays its WAL first."""
ETCDCTL_TIMEOUT = 30.0


class HostEtcdError(RuntimeError):
    """A member inside a host could not be started or asked."""


@dataclass(frozen=True)
class Member:
    """One entry of etcd's member list."""

    member_id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]


class HostEtcd:
    """One etcd member in each of `hosts`, named after its host. `start()` starts them all."""

    def __init__(
        self, hosts: Sequence[SimulatedHost], extra_args: Sequence[str] = (), token: str = ""
    ) -> None:
        if not hosts:
            raise HostEtcdError("etcd inside the hosts needs at least one host")
        self.hosts = {host.name: host for host in hosts}
        self.extra_args = list(extra_args)
        self.token = token or "kvmctl"
        self.root = Path(tempfile.mkdtemp(prefix="kvmctl-host-etcd-", dir=data_root()))
        """Every member's data dir (`<root>/<host>`): remove it when the lab goes."""
        self.pids: dict[str, int] = {}
        """Host name -> root-namespace PID of its running member."""

    # Addresses.

    def endpoint(self, name: str) -> str:
        return f"{self.hosts[name].address}:{CLIENT_PORT}"

    @property
    def endpoints(self) -> list[str]:
        """Every member's client address: the same from the root namespace and from the hosts."""
        return [self.endpoint(name) for name in self.hosts]

    def data_dir(self, name: str) -> Path:
        return self.root / name

    # Life cycle.

    def start(self) -> None:
        """Start every member of a new cluster and wait until all are healthy."""
        for name in self.hosts:
            self.start_member(name, "new", wait=False)
        for name in self.hosts:
            self.wait_healthy(name)

    def start_member(self, name: str, state: str = "existing", *, wait: bool = True) -> None:
        """Start the member of host `name` (just powered on: from its data dir)."""
        host = self.hosts[name]
        data_dir = self.data_dir(name)
        data_dir.mkdir(exist_ok=True)
        link = host.dir / "etcd-data"
        if not link.is_symlink():
            link.symlink_to(data_dir)
        own = f"http://{host.address}"
        peers = ",".join(f"{peer}=http://{h.address}:{PEER_PORT}" for peer, h in self.hosts.items())
        argv = [
            "etcd",
            "--name", name,
            "--data-dir", str(data_dir),
            "--listen-client-urls", f"{own}:{CLIENT_PORT}",
            "--advertise-client-urls", f"{own}:{CLIENT_PORT}",
            "--listen-peer-urls", f"{own}:{PEER_PORT}",
            "--initial-advertise-peer-urls", f"{own}:{PEER_PORT}",
            "--initial-cluster", peers,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--logger=zap",
            "--log-outputs=stderr",
            *self.extra_args,
        ]  # fmt: skip
        self.pids[name] = host.spawn(argv, log_path=host.dir / "etcd.log")
        if wait:
            self.wait_healthy(name)

    def kill_member(self, name: str) -> None:
        """SIGKILL the member of host `name` alone (the host keeps running); wait until gone."""
        pid = self.pids.pop(name)
        os.kill(pid, signal.SIGKILL)
        self.hosts[name].wait_exit(pid, ETCDCTL_TIMEOUT)

    def replace_member(self, name: str) -> None:
        """The killed member of host `name` lost its disk: wipe its data dir, remove it from
        etcd's member list, add it back (a new member ID, same name and peer URL) and start it
        empty; wait until it is healthy. Raises `HostEtcdError` when it does not rejoin."""
        if name in self.pids:
            raise HostEtcdError(f"the etcd member of {name} still runs: kill it first")
        shutil.rmtree(self.data_dir(name), ignore_errors=True)
        others = [
            self.endpoint(other)
            for other, host in self.hosts.items()
            if other != name and host.is_running()
        ]
        peer_url = f"http://{self.hosts[name].address}:{PEER_PORT}"

        def removed() -> bool:
            listed = [member for member in self.members() if peer_url in member.peer_urls]
            for member in listed:
                self._etcdctl(others, "member", "remove", f"{member.member_id:x}")
            return not listed

        def added() -> bool:
            if any(peer_url in member.peer_urls for member in self.members()):
                return True
            self._etcdctl(others, "member", "add", name, f"--peer-urls={peer_url}")
            return False

        self._until(removed, f"etcd member {name} removed")
        self._until(added, f"etcd member {name} added again")
        self.start_member(name, "existing")

    @staticmethod
    def _until(step: Callable[[], bool], what: str) -> None:
        """Repeat a membership change until `step` finds it done. A new etcd leader drops a
        membership change proposed before it applied its predecessor's entries (etcdctl then
        times out), so a change right after an election needs another try."""
        failures: list[str] = []

        def done() -> bool:
            try:
                return step()
            except HostEtcdError as error:
                failures.append(str(error))
                return False

        try:
            wait_until(done, HEALTHY_TIMEOUT, what)
        except TimeoutError:
            last = failures[-1] if failures else "no error"
            within = f"not done within {HEALTHY_TIMEOUT:.0f} s"
            raise HostEtcdError(f"{what}: {within} ({last})") from None

    def forget(self, name: str) -> None:
        """The host lost its power: its member died with it."""
        self.pids.pop(name, None)

    def remove_data(self) -> None:
        """Delete every data dir (after the hosts, and so the members, are gone)."""
        shutil.rmtree(self.root, ignore_errors=True)

    # Questions.

    def healthy(self, name: str) -> bool:
        """The member answers /health with true (it is part of a cluster with a leader)."""
        url = f"http://{self.endpoint(name)}/health"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return b'"true"' in reply.read()
        except OSError:
            return False

    def wait_healthy(self, name: str, timeout: float = HEALTHY_TIMEOUT) -> None:
        host = self.hosts[name]
        log = host.dir / "etcd.log"

        def healthy_or_dead() -> bool:
            return self.healthy(name) or self.pids.get(name) not in host.processes()

        try:
            wait_until(healthy_or_dead, timeout, f"etcd member {name} healthy")
        except TimeoutError:
            raise HostEtcdError(
                f"etcd member {name} did not rejoin within {timeout:.0f} s: "
                f"{_last_line(log)} (see {log})"
            ) from None
        if not self.healthy(name):
            raise HostEtcdError(f"etcd member {name} exited: {_last_line(log)} (see {log})")

    def all_healthy(self) -> bool:
        """Every host's member answers /health, etcd lists exactly these members (all
        started: an added member has no name until it runs) and they agree on one leader."""
        if not all(self.healthy(name) for name in self.hosts):
            return False
        if sorted(member.name for member in self.members()) != sorted(self.hosts):
            return False
        return self.leader() is not None

    def members(self) -> list[Member]:
        """etcd's member list, as the first answering member sees it."""
        reply = self._etcdctl(self._live_endpoints(), "member", "list")
        if not isinstance(reply, dict):
            raise HostEtcdError(f"etcdctl member list: unexpected reply {reply!r}")
        return [
            Member(
                member_id=int(entry["ID"]),
                name=str(entry.get("name", "")),
                peer_urls=tuple(entry.get("peerURLs", ())),
                client_urls=tuple(entry.get("clientURLs", ())),
            )
            for entry in reply.get("members", [])
        ]

    def leader(self) -> str | None:
        """The host holding etcd's leader; None while the answering members disagree or know
        none (an election is under way)."""
        endpoints = self._live_endpoints()
        statuses = self._etcdctl(endpoints, "endpoint", "status")
        if not isinstance(statuses, list):
            raise HostEtcdError(f"etcdctl endpoint status: unexpected reply {statuses!r}")
        leaders = {int(status["Status"]["leader"]) for status in statuses}
        if len(leaders) != 1 or 0 in leaders:
            return None
        [leader_id] = leaders
        names = {member.member_id: member.name for member in self.members()}
        return names.get(leader_id)

    def move_leader(self, name: str) -> None:
        """Hand etcd's leadership to the member of host `name` (`etcdctl move-leader`)."""
        ids = {member.name: member.member_id for member in self.members()}
        if name not in ids:
            raise HostEtcdError(f"no etcd member named {name}")
        argv = self._etcdctl_argv(self._live_endpoints(), "move-leader", f"{ids[name]:x}")
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=ETCDCTL_TIMEOUT
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise HostEtcdError(f"etcdctl move-leader to {name} failed: {last}")

    def _live_endpoints(self) -> list[str]:
        """Endpoints of the members whose host is powered on (a dead one only costs time)."""
        live = [self.endpoint(name) for name, host in self.hosts.items() if host.is_running()]
        if not live:
            raise HostEtcdError("no etcd member runs: every etcd host is powered off")
        return live

    @staticmethod
    def _etcdctl_argv(endpoints: Sequence[str], *command: str) -> list[str]:
        return [
            "etcdctl", "--endpoints", ",".join(endpoints), "--dial-timeout=2s",
            "--command-timeout=5s", *command,
        ]  # fmt: skip

    @classmethod
    def _etcdctl(cls, endpoints: Sequence[str], *command: str) -> Any:
        """Run `etcdctl ... -w json`; its parsed output. With some endpoints unreachable it
        exits 1 but still prints what the others answered."""
        argv = cls._etcdctl_argv(endpoints, *command, "-w", "json")
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=ETCDCTL_TIMEOUT
        )
        try:
            return json.loads(result.stdout)
        except ValueError:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise HostEtcdError(f"etcdctl {' '.join(command)} failed: {last}") from None


def _last_line(log: Path) -> str:
    """The last line of a member's log (its latest complaint), shortened."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"
