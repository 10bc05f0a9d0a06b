"""SIGSTOP and SIGCONT of a process `SimulatedHost.spawn` started inside a host.

`spawn` runs the process under `nsenter` (outside the host), which waits for it and mirrors a
stop: seeing its child stopped, it stops itself, and once continued it continues the child. So a
stopped process is continued by continuing its launcher; and while the launcher is stopped it
cannot reap the process, which keeps a dead host from finishing dying (a PID namespace whose
init died waits until every process of it is reaped). `Frozen.thaw` handles both.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from e2e.harness.host_support import wait_until


def process_state(pid: int | None) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T, Z...), None if there is no such process."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int | None) -> bool:
    """Whether the process lives (a stopped one does; a zombie does not)."""
    return process_state(pid) not in (None, "Z", "X")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@dataclass(frozen=True)
class Frozen:
    """A process stopped by `freeze`, with the launcher that mirrors its stop."""

    pid: int
    launcher: int

    @classmethod
    def freeze(cls, pid: int) -> Frozen:
        """SIGSTOP the process (a root-namespace PID from `spawn`)."""
        frozen = cls(pid, _parent(pid))
        os.kill(pid, signal.SIGSTOP)
        return frozen

    def thaw(self, what: str, timeout: float = 30.0) -> None:
        """Continue the launcher, which continues the process if it still lives (or reaps it if
        its host killed it); wait until neither is stopped."""

        def thawed() -> bool:
            # The launcher stops itself only after seeing the process stop: until both run (or
            # are gone), keep continuing it.
            if process_state(self.launcher) == "T":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.launcher, signal.SIGCONT)
                return False
            return process_state(self.pid) != "T"

        wait_until(thawed, timeout, f"{what} continued")
