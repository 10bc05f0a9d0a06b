"""Mutual TLS to etcd: the right certificate works; a wrong or missing one is refused clearly."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.etcd_transport import TlsFiles
from controller.store import Store, StoreError
from crds import parse_object
from e2e.etcd import EtcdCluster

MAKE_CERTS = Path(__file__).parent.parent / "deploy" / "etcd" / "make-certs.sh"


def make_pki(folder: Path) -> Path:
    subprocess.run(
        ["bash", str(MAKE_CERTS), str(folder), "etcd1=127.0.0.1", "host1"],
        check=True,
        capture_output=True,
    )
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(pki: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(pki=pki) as cluster:
        yield cluster


VM = {
    "apiVersion": "kvmctl.io/v1alpha1",
    "kind": "VirtualMachine",
    "metadata": {"name": "vm1"},
    "spec": {"memoryMiB": 64},
}


async def test_client_certificate_is_accepted(tls_etcd: EtcdCluster, pki: Path) -> None:
    tls = TlsFiles(ca=pki / "ca.crt", cert=pki / "admin.crt", key=pki / "admin.key")
    async with Store(tls_etcd.endpoints, prefix="/tls", tls=tls) as store:
        await store.create(parse_object(VM))
        assert (await store.get("VirtualMachine", "vm1")).metadata.generation == 1


async def test_missing_client_certificate_is_refused(tls_etcd: EtcdCluster, pki: Path) -> None:
    with pytest.raises(StoreError, match=r"unreachable|failed"):
        async with Store(
            tls_etcd.endpoints, prefix="/tls", tls=TlsFiles(ca=pki / "ca.crt"), timeout=3
        ):
            pass


async def test_certificate_from_another_ca_is_refused(
    tls_etcd: EtcdCluster, tmp_path: Path, pki: Path
) -> None:
    other = make_pki(tmp_path / "other")
    tls = TlsFiles(ca=pki / "ca.crt", cert=other / "admin.crt", key=other / "admin.key")
    with pytest.raises(StoreError, match=r"unreachable|failed"):
        async with Store(tls_etcd.endpoints, prefix="/tls", tls=tls, timeout=3):
            pass


async def test_plain_text_client_is_refused(tls_etcd: EtcdCluster) -> None:
    with pytest.raises(StoreError):
        async with Store(tls_etcd.endpoints, prefix="/tls", timeout=3):
            pass


def test_unreadable_certificate_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot read the TLS CA"):
        Store(["127.0.0.1:2379"], tls=TlsFiles(ca=tmp_path / "missing.crt"))
