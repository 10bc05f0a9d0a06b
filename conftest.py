"""Shared fixtures: a real etcd (one per test session, a fresh key prefix per test), network
namespaces and loop devices of a test's own."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from e2e.harness.etcd import EtcdCluster


@pytest.fixture(scope="session")
def etcd_session() -> Iterator[EtcdCluster]:
    with EtcdCluster() as cluster:
        yield cluster


@pytest.fixture
def etcd_endpoints(etcd_session: EtcdCluster) -> list[str]:
    return etcd_session.endpoints


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test uses, so tests can share one etcd."""
    return f"/kvmctl-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def etcd_private() -> Iterator[EtcdCluster]:
    """An etcd of the test's own, for tests that restart, compact or kill it."""
    with EtcdCluster() as cluster:
        yield cluster


async def _ip(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, f"ip {' '.join(args)}: {output.decode()}"


@pytest.fixture
async def netns() -> AsyncIterator[str]:
    """A fresh network namespace of the test's own, deleted afterwards with everything in it."""
    name = f"kvmctl-ns-{uuid.uuid4().hex[:8]}"
    await _ip("netns", "add", name)
    try:
        yield name
    finally:
        await _ip("netns", "del", name)


@pytest.fixture
def make_loop_device(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Attach sparse files of the given size (bytes) as loop devices; all detached at teardown."""
    attached: list[str] = []

    def attach(size: int) -> str:
        backing = tmp_path / f"loop-{uuid.uuid4().hex[:8]}.img"
        with open(backing, "wb") as file:
            file.truncate(size)
        # The kernel lab loads modules on demand; on a host without modules this does nothing.
        subprocess.run(["modprobe", "loop"], check=False, capture_output=True, timeout=60)
        result = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, f"losetup: {result.stderr.strip()}"
        attached.append(result.stdout.strip())
        return attached[-1]

    try:
        yield attach
    finally:
        for device in attached:
            subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60)
