"""A KVM host's simulated IPMI BMC (`e2e.harness.bmc`) as a process on the lab gateway.

Powering the chassis off SIGKILLs the host's namespace init: `fence_ipmilan` run by a controller
on another host really pulls the power. The process runs in a session of its own and is stopped
by the PID it was started with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from e2e.harness.host_support import LabError, wait_until
from e2e.harness.hosts import REPO_ROOT

BMC_USER = "admin"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class BmcEndpoint:
    """Where a host's simulated BMC answers IPMI (UDP, on the lab gateway)."""

    address: str
    port: int
    user: str


@dataclass
class BmcProcess:
    """One running BMC: its process, where it answers and its log."""

    process: subprocess.Popen[bytes]
    endpoint: BmcEndpoint
    log_path: Path

    @classmethod
    def start(
        cls, host: str, init_pid: int, address: str, password_file: Path, port: int = 0
    ) -> BmcProcess:
        """A BMC for `host` on `address`:`port` (0: any free port) whose power-off kills
        `init_pid`; it logs next to `password_file`."""
        log_path = password_file.parent / f"bmc-{host}.log"
        argv = [
            sys.executable, "-m", "e2e.harness.bmc", "--address", address,
            "--port", str(port), "--user", BMC_USER, "--password-file", str(password_file),
            "--on-off-command", "kill", "-KILL", str(init_pid),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        bound: list[int] = []

        def listening() -> bool:
            for line in log_path.read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "listening":
                    bound.append(int(words[2]))
                    return True
            return process.poll() is not None

        wait_until(listening, START_TIMEOUT, f"BMC of {host} listening")
        if not bound:
            raise LabError(f"BMC of {host} exited: see {log_path}")
        return cls(process, BmcEndpoint(address, bound[0], BMC_USER), log_path)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
