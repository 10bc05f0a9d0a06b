"""Detached clusters (the demo): what one holds, recorded in a file, removed from another process.

`Cluster.detach(state_file)` writes a `DetachedState`: every PID with its start time (so a reused
PID is never signalled) and the signal that stops it, the network namespaces, links, loop devices
and directories. `teardown_detached(state_file)` removes them, continuing past failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns


class DetachError(RuntimeError):
    """A process to record is not running."""


@dataclass
class RecordedProcess:
    """A process of a detached cluster: stopped only if its PID still names the same process."""

    what: str
    pid: int
    start_time: int
    stop_signal: int


@dataclass
class DetachedState:
    """Everything a detached cluster holds, enough to remove it from another process."""

    prefix: str
    """The cluster's kvmctl key prefix in etcd."""
    processes: list[RecordedProcess] = field(default_factory=list)
    network_namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    loop_devices: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    etcd_endpoints: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DetachedState:
        data = json.loads(path.read_text())
        processes = [RecordedProcess(**entry) for entry in data.pop("processes")]
        return cls(processes=processes, **data)


def teardown_detached(state_file: Path) -> list[str]:
    """Remove a detached cluster recorded in `state_file`; the problems met (keeps going)."""
    state = DetachedState.load(state_file)
    problems = []
    live = [p for p in state.processes if _start_time(p.pid) == p.start_time]
    for process in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, process.stop_signal)
    deadline = time.monotonic() + 30.0
    for process in live:
        while _start_time(process.pid) == process.start_time and not _is_zombie(process.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10.0
            time.sleep(0.05)
    # Host processes (qemu, nsenter'd agents) die with their init; wait for their namespaces.
    existing = netns.listnetns()
    with IPRoute() as ipr:
        for link in state.links:
            indexes = ipr.link_lookup(ifname=link)
            if indexes:
                try:
                    ipr.link("del", index=indexes[0])
                except Exception as error:  # keep going; report below
                    problems.append(f"link {link}: {error}")
    for name in state.network_namespaces:
        if name in existing:
            try:
                netns.remove(name)
            except Exception as error:  # keep going; report below
                problems.append(f"network namespace {name}: {error}")
    for device in state.loop_devices:
        problem = detach_loop(device)
        if problem:
            problems.append(problem)
    for directory in state.directories:
        shutil.rmtree(directory, ignore_errors=True)
    state_file.unlink(missing_ok=True)
    return problems


def record_process(what: str, pid: int, stop_signal: int) -> RecordedProcess:
    start_time = _start_time(pid)
    if start_time is None:
        raise DetachError(f"{what} (pid {pid}) is not running")
    return RecordedProcess(what, pid, start_time, int(stop_signal))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the PID: a unique identity)."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def detach_loop(device: str) -> str | None:
    result = subprocess.run(
        ["losetup", "--detach", device], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0 and "No such device" not in result.stderr:
        return f"loop device {device}: {result.stderr.strip()}"
    return None
