"""A 3-member etcd for tests that stop or kill members (bind it: `cluster = three_members`)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from e2e.harness.etcd import EtcdCluster


@pytest.fixture
def three_members() -> Iterator[EtcdCluster]:
    with EtcdCluster(size=3) as cluster:
        try:
            yield cluster
        finally:
            for member in cluster.members:  # a stopped member must resume to be stopped
                if member.process is not None and member.process.poll() is None:
                    member.process.send_signal(signal.SIGCONT)
