"""A simulated IPMI BMC (pyghmi) so fence_ipmilan can power a simulated host off.

Run it as a child process, one per simulated host:

    python -m e2e.harness.bmc --port 0 --user admin --password-file F [--on-off-command ARGV...]

It prints one line `listening ADDRESS PORT` on stdout once the UDP socket is bound, then serves
until SIGTERM/SIGKILL. `--on-off-command` runs (argument list, no shell) when the chassis goes
from on to off, *before* the BMC acknowledges, so a test harness can kill the whole simulated
host and fence_ipmilan only ever sees "off" after the host is really gone.

`BmcProcess` starts and stops such a child from asyncio tests, by the PID it started.
pyghmi keeps its sessions in process-wide state, so one BMC per process is the simple, safe shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import pyghmi.ipmi.bmc

ON_OFF_COMMAND_TIMEOUT = 20.0
REPO_ROOT = Path(__file__).resolve().parents[2]


class SimulatedBmc(pyghmi.ipmi.bmc.Bmc):  # type: ignore[misc]
    """A chassis with a power state; `on_power_off` runs on every on -> off transition."""

    def __init__(
        self,
        users: dict[str, str],
        *,
        address: str = "127.0.0.1",
        port: int = 0,
        powered_on: bool = True,
        on_power_off: Callable[[], None] | None = None,
    ) -> None:
        # pyghmi routes sessions by IPv6 socket addresses: serve IPv4 on its mapped IPv6 form.
        if isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address):
            address = f"::ffff:{address}"
        super().__init__(users, port=port, address=address)
        # pyghmi keys client sessions by self.port: with port 0 it must be the port actually bound.
        self.port = self.serversocket.getsockname()[1]
        self._lock = threading.Lock()
        self._powered_on = powered_on
        self._on_power_off = on_power_off

    @property
    def powered_on(self) -> bool:
        with self._lock:
            return self._powered_on

    def get_power_state(self) -> str:
        return "on" if self.powered_on else "off"

    def power_off(self) -> None:
        with self._lock:
            if self._powered_on and self._on_power_off is not None:
                self._on_power_off()
            self._powered_on = False

    def power_shutdown(self) -> None:
        """A simulated host has no OS to ask politely: a soft off is a hard off."""
        self.power_off()

    def power_on(self) -> None:
        with self._lock:
            self._powered_on = True

    def power_cycle(self) -> None:
        self.power_off()
        self.power_on()

    def power_reset(self) -> None:
        self.power_cycle()

    def serve_forever(self) -> None:
        self.listen(timeout=30)


def run_command_callback(argv: Sequence[str]) -> Callable[[], None]:
    """A power-off hook that runs `argv` and waits for it; failures are reported on stderr."""

    def run() -> None:
        try:
            result = subprocess.run(
                list(argv), timeout=ON_OFF_COMMAND_TIMEOUT, capture_output=True, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            print(f"bmc: on-off command {argv[0]!r} failed: {error}", file=sys.stderr, flush=True)
            return
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            print(
                f"bmc: on-off command {argv[0]!r} exited {result.returncode}: {stderr}",
                file=sys.stderr,
                flush=True,
            )

    return run


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.harness.bmc", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (UDP)")
    parser.add_argument("--port", type=int, default=0, help="UDP port, 0 for a free one")
    parser.add_argument("--user", required=True, help="IPMI user name")
    parser.add_argument(
        "--password-file", required=True, type=Path, help="file holding the IPMI password"
    )
    parser.add_argument("--off", action="store_true", help="start with the chassis powered off")
    parser.add_argument(
        "--on-off-command",
        nargs=argparse.REMAINDER,
        default=[],
        help="command (and its arguments, must come last) run when the chassis is powered off",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        password = args.password_file.read_text().rstrip("\n")
    except OSError as error:
        print(f"bmc: cannot read --password-file {args.password_file}: {error}", file=sys.stderr)
        return 2
    hook = run_command_callback(args.on_off_command) if args.on_off_command else None
    bmc = SimulatedBmc(
        {args.user: password},
        address=args.address,
        port=args.port,
        powered_on=not args.off,
        on_power_off=hook,
    )
    print(f"listening {args.address} {bmc.port}", flush=True)
    bmc.serve_forever()
    return 0


class BmcProcess:
    """A `python -m e2e.harness.bmc` child process, for asyncio tests and harnesses.

    `command_prefix` wraps the child, e.g. `["ip", "netns", "exec", NS]` to serve inside a
    namespace. Use as `async with BmcProcess(...) as bmc:`; `bmc.port` is the bound UDP port.
    """

    def __init__(
        self,
        user: str,
        password: str,
        *,
        address: str = "127.0.0.1",
        port: int = 0,
        on_off_command: Sequence[str] = (),
        command_prefix: Sequence[str] = (),
        powered_on: bool = True,
    ) -> None:
        self.user = user
        self.address = address
        self._password = password
        self._requested_port = port
        self._on_off_command = list(on_off_command)
        self._command_prefix = list(command_prefix)
        self._powered_on = powered_on
        self._workdir: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self.port = 0

    def __repr__(self) -> str:
        return f"BmcProcess(user={self.user!r}, address={self.address!r}, port={self.port})"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def stderr_path(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("BMC not started")
        return self._workdir / "bmc.stderr"

    def _prepare_workdir(self) -> tuple[Path, int]:
        """A private directory with the password file; returns it and an open stderr log fd."""
        self._workdir = Path(tempfile.mkdtemp(prefix="kvmctl-bmc-"))
        password_file = self._workdir / "password"
        password_file.touch(mode=0o600)
        password_file.write_text(self._password)
        stderr_fd = os.open(self.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return password_file, stderr_fd

    async def start(self, timeout: float = 30.0) -> None:
        """Start the child and wait until it reports its bound port."""
        password_file, stderr_fd = await asyncio.to_thread(self._prepare_workdir)
        args = [
            *self._command_prefix,
            sys.executable,
            "-m",
            "e2e.harness.bmc",
            "--address",
            self.address,
            "--port",
            str(self._requested_port),
            "--user",
            self.user,
            "--password-file",
            str(password_file),
        ]
        if not self._powered_on:
            args.append("--off")
        if self._on_off_command:
            args += ["--on-off-command", *self._on_off_command]
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"}
        try:
            self._process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr_fd,
                env=env,
                start_new_session=True,
            )
            self.port = await asyncio.wait_for(self._read_port(), timeout)
        except BaseException:
            await self.stop()
            raise
        finally:
            os.close(stderr_fd)

    async def _read_port(self) -> int:
        assert self._process is not None and self._process.stdout is not None
        line = await self._process.stdout.readline()
        words = line.decode().split()
        if len(words) != 3 or words[0] != "listening":
            await self._process.wait()
            raise RuntimeError(
                f"BMC exited with {self._process.returncode} before listening: "
                f"{self.stderr_path.read_text()[-2000:]}"
            )
        return int(words[2])

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the child by its PID (SIGTERM, then SIGKILL) and remove its files."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._workdir is not None:
            await asyncio.to_thread(shutil.rmtree, self._workdir, ignore_errors=True)
            self._workdir = None

    async def __aenter__(self) -> BmcProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


if __name__ == "__main__":
    sys.exit(main())
