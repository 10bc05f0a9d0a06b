"""kvmctl run against the test's etcd prefix: `kvmctl` (in-process, in the test's thread) and
`kvmctl_thread` (awaitable, for async tests: kvmctl as its own process, as users run it).

`kvmctl_thread` does not run kvmctl in-process beside the test's event loop: gRPC's asyncio
completion queue is one per process, and a second loop that closes while a call of the test's
store is in flight makes it log "Event loop is closed" on the stderr the test reads."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from controller.cli import main

Run = Callable[..., tuple[int, str, str]]
Kvmctl = Callable[..., Awaitable[tuple[int, str, str]]]


def exit_code(argv: list[str]) -> int:
    """kvmctl's exit code for `argv` (argparse's exits included)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture
def kvmctl_env(etcd_endpoints: list[str], key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kvmctl's environment: the test's etcd and prefix, no config file."""
    monkeypatch.setenv("KVMCTL_ETCD", ",".join(etcd_endpoints))
    monkeypatch.setenv("KVMCTL_PREFIX", key_prefix)
    monkeypatch.setenv("KVMCTL_CONFIG", "")


@pytest.fixture
def kvmctl(kvmctl_env: None, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run kvmctl in-process; returns (code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = exit_code(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def kvmctl_thread(kvmctl_env: None) -> Kvmctl:
    """Run kvmctl as a child process; awaits (code, stdout, stderr). The child is killed if the
    test stops waiting for it (a failed or cancelled test)."""

    async def run(*argv: str) -> tuple[int, str, str]:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.cli",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await child.communicate()
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert child.returncode is not None
        return child.returncode, out.decode(), err.decode()

    return run


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> str:
    """Write a manifest file; its path."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)
