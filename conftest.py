"""Shared fixtures: a real etcd (one per test session, a fresh key prefix per test)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from e2e.etcd import EtcdCluster


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
