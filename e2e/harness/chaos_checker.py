"""The two-copies checker: a thread that samples every host's qemu processes and records any VM
running on two hosts at once; import it from `e2e.harness.chaos`."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from e2e.harness.cluster import Cluster
from e2e.harness.frozen import alive
from e2e.harness.host_support import LabError, qemu_guest_name
from e2e.harness.hosts import SimulatedHost


@dataclass(frozen=True)
class Overlap:
    """One sample in which a VM had a qemu process on more than one host."""

    vm: str
    hosts: tuple[str, ...]
    at: float
    """time.monotonic() of the sample."""


class TwoCopiesChecker:
    """Samples every host's qemu processes every `period` s; records any VM seen twice.

    Use as a context manager (a daemon thread), or `start()` / `stop()`. `violations` lists every
    overlapping sample; `where(vm)` is where the VM ran at the last sample; `first_seen(vm,
    host, since)` is when its qemu was first seen on `host` at or after `since`.
    """

    def __init__(self, cluster: Cluster, period: float = 0.1) -> None:
        self.cluster = cluster
        self.period = period
        self.violations: list[Overlap] = []
        self.samples = 0
        self._latest: dict[str, tuple[str, ...]] = {}
        self._appearances: list[tuple[float, str, str]] = []  # (time, vm, host)
        self._last_seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TwoCopiesChecker:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="two-copies checker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def __enter__(self) -> TwoCopiesChecker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def where(self, vm: str) -> tuple[str, ...]:
        """Hosts running the VM's qemu at the last sample (sorted)."""
        with self._lock:
            return self._latest.get(vm, ())

    def running(self) -> dict[str, tuple[str, ...]]:
        """Every VM seen at the last sample -> its hosts."""
        with self._lock:
            return dict(self._latest)

    def first_seen(self, vm: str, host: str, since: float) -> float | None:
        """When the VM's qemu first appeared on `host` at or after `since` (monotonic)."""
        with self._lock:
            for at, name, where in self._appearances:
                if at >= since and name == vm and where == host:
                    return at
        return None

    def last_seen(self, vm: str, host: str) -> float | None:
        """When the VM's qemu was last seen on `host` (monotonic), None if never."""
        with self._lock:
            return self._last_seen.get((vm, host))

    def appearances(self, vm: str, since: float) -> list[tuple[float, str]]:
        """(time, host) of every start of the VM's qemu on a host at or after `since`."""
        with self._lock:
            return [
                (at, host) for at, name, host in self._appearances if name == vm and at >= since
            ]

    def wait_sample(self, timeout: float = 10.0) -> None:
        """Block until at least one more sample was taken."""
        target = self.samples + 1
        deadline = time.monotonic() + timeout
        while self.samples < target:
            if time.monotonic() > deadline:
                raise TimeoutError("the two-copies checker took no sample")
            time.sleep(self.period / 4)

    def _run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            self._sample(started)
            self._stopping.wait(max(0.0, started + self.period - time.monotonic()))

    def _sample(self, at: float) -> None:
        seen = qemu_processes_by_host(self.cluster.lab.hosts.values())
        vm_hosts: dict[str, list[str]] = {}
        for host, guests in seen.items():
            for vm in guests:
                vm_hosts.setdefault(vm, []).append(host)
        latest = {vm: tuple(sorted(hosts)) for vm, hosts in vm_hosts.items()}
        with self._lock:
            for vm, hosts in latest.items():
                for host in hosts:
                    self._last_seen[(vm, host)] = at
                    if host not in self._latest.get(vm, ()):
                        self._appearances.append((at, vm, host))
                if len(hosts) > 1:
                    self.violations.append(Overlap(vm, hosts, at))
            self._latest = latest
            self.samples += 1


def qemu_processes_by_host(hosts: Iterable[SimulatedHost]) -> dict[str, set[str]]:
    """Host name -> names of the guests with a live qemu process there (one scan of /proc)."""
    namespaces: dict[str, str] = {}
    for host in hosts:
        with contextlib.suppress(LabError, OSError):
            namespaces[os.readlink(f"/proc/{host.init_pid}/ns/pid")] = host.name
    seen: dict[str, set[str]] = {name: set() for name in namespaces.values()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            host_name = namespaces.get(os.readlink(f"/proc/{entry}/ns/pid"))
            if host_name is None:
                continue
            guest = _live_qemu_guest(int(entry))
        except OSError:  # gone meanwhile
            continue
        if guest is not None:
            seen[host_name].add(guest)
    return seen


def _live_qemu_guest(pid: int) -> str | None:
    """The guest name of a live (not exiting, not zombie) qemu process, else None."""
    if not alive(pid):
        return None
    return qemu_guest_name(pid) or None
