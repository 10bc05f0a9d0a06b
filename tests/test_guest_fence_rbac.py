"""A guest cluster's fence_kvmctl credential under etcd TLS and RBAC: it reaches nothing but its
own fence requests and their answers, cannot act on another guest cluster's VM, and fences its
own VMs through the leading controller.

One real etcd per module, users and roles by `apply_rbac` with guest clusters `web` and `db`,
certificates by deploy/etcd/make-certs.sh; fence_kvmctl runs as a separate process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.rbac import apply_rbac, cluster_roles
from controller.runtime import layout_keys
from controller.runtime.store import PermissionDenied, Store
from e2e.harness.etcd import EtcdCluster
from tests.support.agents import Cluster, vm_object
from tests.support.fence import fence, fencing_cluster, join
from tests.support.rbac import PREFIX, etcd_with_rbac, make_pki, store_as, tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), "host1", guest_clusters="web db")


async def _setup(etcd: EtcdCluster, pki: Path) -> None:
    async with store_as(etcd, pki, "admin") as admin:
        for name, cluster in (("mine", "web"), ("theirs", "db")):
            await admin.create(vm_object(name))
            await join(admin, name, cluster)
        await apply_rbac(admin, cluster_roles(["host1"], guest_clusters=["web", "db"]))


@pytest.fixture(scope="module")
def etcd(pki: Path) -> Iterator[EtcdCluster]:
    with etcd_with_rbac(pki, _setup) as cluster:
        yield cluster


@pytest.fixture
async def admin(etcd: EtcdCluster, pki: Path) -> AsyncIterator[Store]:
    async with store_as(etcd, pki, "admin") as store:
        yield store


@pytest.fixture
async def guest(etcd: EtcdCluster, pki: Path) -> AsyncIterator[Store]:
    async with store_as(etcd, pki, "fence-web") as store:
        yield store


@pytest.fixture
async def controller(etcd: EtcdCluster, pki: Path, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The leading controller (its own certificate) serving guest fencing."""
    async with store_as(etcd, pki, "controller") as store, fencing_cluster(store, tmp_path) as lab:
        yield lab


def credentials(pki: Path, user: str) -> dict[str, str]:
    files = tls(pki, user)
    return {"cacert": str(files.ca), "cert": str(files.cert), "key": str(files.key)}


async def test_the_guest_credential_reaches_no_object(guest: Store) -> None:
    vm = vm_object("mine").model_dump(mode="json", by_alias=True, exclude_none=True)
    for kind in ("VirtualMachine", "ClusterNode", "Secret", "Event"):
        key = guest.key(kind, "mine")
        with pytest.raises(PermissionDenied, match="user fence-web lacks permission"):
            await guest.call(guest.client.put(key, str(vm).encode()), key, "write")
        with pytest.raises(PermissionDenied, match="user fence-web lacks permission"):
            await guest.call(guest.client.delete(key), key, "delete")
        with pytest.raises(PermissionDenied, match="user fence-web lacks permission"):
            await guest.get(kind, "mine")
    for other in (
        layout_keys.absolute(PREFIX, layout_keys.guest_fence_request("db", "theirs")),
        layout_keys.absolute(PREFIX, layout_keys.guest_fence_result("web", "mine")),
        layout_keys.absolute(PREFIX, layout_keys.guest_power_state("web", "mine")),
        f"{PREFIX}/requests/fence-ack/host1",
        f"{PREFIX}/reports/host1",
        f"{PREFIX}/leader/controller",
    ):
        with pytest.raises(PermissionDenied, match="user fence-web lacks permission"):
            await guest.call(guest.client.put(other.encode(), b"{}"), other.encode(), "write")


async def test_a_vm_of_another_guest_cluster_is_refused(
    admin: Store, controller: Cluster, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await admin.get("VirtualMachine", "theirs")
    web = {"guest_cluster": "", **credentials(pki, "fence-web")}  # the cluster from the CN
    for action in ("off", "reboot"):
        assert await fence(admin, action, "theirs", **web) == (1, "")
        error = capsys.readouterr().err
        assert "off refused: VirtualMachine theirs is not in guest cluster web" in error
    assert await admin.get("VirtualMachine", "theirs") == before
    # Naming the other cluster does not help: the certificate says which one this is.
    code, _ = await fence(
        admin, "off", "theirs", guest_cluster="db", **credentials(pki, "fence-web")
    )
    assert code == 1
    assert "guest_cluster 'db' does not match the client certificate" in capsys.readouterr().err
    assert await admin.get("VirtualMachine", "theirs") == before


async def test_the_guest_powers_off_its_own_vm(
    admin: Store, controller: Cluster, pki: Path
) -> None:
    web = {"guest_cluster": "", **credentials(pki, "fence-web")}  # the cluster from the CN
    assert await fence(admin, "off", "mine", **web) == (0, "Success: Powered OFF\n")
    vm = await admin.get("VirtualMachine", "mine")
    assert vm.spec.run_state == "stopped" and vm.spec.shutdown_timeout_seconds == 0
    assert await fence(admin, "status", "mine", **web) == (2, "Status: OFF\n")
    assert await fence(admin, "list", **web) == (0, "mine,\n")
    assert await fence(admin, "monitor", **web) == (0, "")
