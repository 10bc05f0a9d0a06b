"""GitOps in the tests: a Git repository the test writes and commits to, and syncers of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from controller.gitsync import COMPONENT, GitSyncer, SyncOptions
from controller.runtime.events import EventRecorder
from controller.runtime.store import Store
from crds import VirtualMachine


class Repository:
    """A Git repository in a temporary folder that the test writes and commits to."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def git(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            "git",
            "-c",
            "user.name=kvmctl test",
            "-c",
            "user.email=test@kvmctl.invalid",
            *args,
            cwd=self.directory,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, f"git {args}: {err.decode()}"
        return out.decode().strip()

    def write(self, path: str, text: str) -> None:
        target = self.directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def remove(self, path: str) -> None:
        (self.directory / path).unlink()

    async def commit(self, message: str) -> str:
        await self.git("add", "-A")
        await self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return await self.git("rev-parse", "HEAD")


@pytest.fixture
async def repo(tmp_path: Path) -> Repository:
    directory = tmp_path / "config"
    directory.mkdir()
    repository = Repository(directory)
    await repository.git("init", "--quiet", "--initial-branch=main")
    repository.write("README.md", "cluster configuration\n")
    return repository


MakeSyncer = Callable[..., GitSyncer]


@pytest.fixture
def make_syncer(store: Store, repo: Repository, tmp_path: Path) -> MakeSyncer:
    """A syncer of clusters/lab in `repo` named lab, with prune on, unless overridden."""
    base = SyncOptions(
        repo=str(repo.directory),
        name="lab",
        path="clusters/lab",
        prune=True,
        cache_dir=tmp_path / "cache",
    )

    def make(**overrides: Any) -> GitSyncer:
        options = replace(base, **overrides)
        return GitSyncer(store, options, EventRecorder(store, COMPONENT, ttl=60))

    return make


async def vm_memory(store: Store, name: str) -> int | None:
    obj = await store.try_get("VirtualMachine", name)
    return obj.spec.memory_mib if isinstance(obj, VirtualMachine) else None
