"""Fixtures shared by the tests in tests/ (their helpers live in tests/support/)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from controller.runtime.store import Store
from tests.support.agents import cluster
from tests.support.cli import kvmctl, kvmctl_env, kvmctl_thread
from tests.support.gitrepo import make_syncer, repo
from tests.support.ha import controller, leases

__all__ = [  # fixtures defined in tests/support/
    "cluster",
    "controller",
    "kvmctl",
    "kvmctl_env",
    "kvmctl_thread",
    "leases",
    "make_syncer",
    "repo",
]


@pytest.fixture
async def store(etcd_endpoints: list[str], key_prefix: str) -> AsyncIterator[Store]:
    """A store on the test's own key prefix of the session's etcd."""
    async with Store(etcd_endpoints, key_prefix) as connected:
        yield connected
