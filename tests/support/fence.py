"""fence_kvmctl for the tests: run it for guest cluster GUEST, label VMs members of a guest
cluster, and a leading controller serving guest fencing over agents on test-driver hosts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from controller.apply import apply_one
from controller.ha.guest_requests import GUEST_CLUSTER_LABEL
from controller.runtime.store import Store
from e2e.harness.fence_agent import run_fence_kvmctl
from e2e.harness.guest_fencing import guest_fencing
from tests.support.agents import Cluster

GUEST = "guests"
"""The guest cluster of these tests' fence_kvmctl."""


async def fence(
    store: Store, action: str, plug: str | None = None, **extra: str
) -> tuple[int, str]:
    """Run `python -m controller.cli.fence_kvmctl` with options on stdin; (exit code, stdout)."""
    values = {
        "action": action,
        "etcd": ",".join(store.endpoints),
        "prefix": store.prefix,
        "guest_cluster": GUEST,
    }
    if plug is not None:
        values["plug"] = plug
    values.update(extra)
    return await run_fence_kvmctl(values, 120)


async def join(store: Store, vm: str, guest_cluster: str | None = GUEST) -> None:
    """Label `vm` a member of `guest_cluster` (None: of none), as an admin's manifest does."""
    obj = await store.get("VirtualMachine", vm)
    if guest_cluster is None:
        obj.metadata.labels.pop(GUEST_CLUSTER_LABEL, None)
    else:
        obj.metadata.labels[GUEST_CLUSTER_LABEL] = guest_cluster
    await apply_one(store, obj)


@asynccontextmanager
async def fencing_cluster(store: Store, tmp_path: Path) -> AsyncIterator[Cluster]:
    """A `Cluster` whose stand-in controller leads and serves guest fencing."""
    lab = Cluster(store, tmp_path)
    await lab.lead()
    try:
        async with guest_fencing(store, lab.token, lab.term.guard):
            yield lab
    finally:
        await lab.close()
