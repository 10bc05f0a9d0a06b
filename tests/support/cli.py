"""kvmctl run in-process against the test's etcd prefix: `kvmctl` (in the test's thread) and
`kvmctl_thread` (awaitable: in a worker thread, as kvmctl runs its own event loop)."""

from __future__ import annotations

import asyncio
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
def kvmctl_thread(kvmctl_env: None, capsys: pytest.CaptureFixture[str]) -> Kvmctl:
    """Run kvmctl in a worker thread; awaits (code, stdout, stderr)."""

    async def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(exit_code, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> str:
    """Write a manifest file; its path."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)
