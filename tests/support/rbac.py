"""etcd with mutual TLS and RBAC for the tests: certificates by deploy/etcd/make-certs.sh, a
store per user (etcd takes the user name from the certificate's CN), one etcd set up by a test's
own `setup` (users and roles by `apply_rbac`) before authentication is on."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.runtime.etcd_transport import TlsFiles
from controller.runtime.store import Store
from e2e.harness.etcd import EtcdCluster

MAKE_CERTS = Path(__file__).resolve().parent.parent.parent / "deploy" / "etcd" / "make-certs.sh"
PREFIX = "/kvmctl"


def make_pki(folder: Path, hosts: str = "host1 host2 host9", guest_clusters: str = "") -> Path:
    """A CA and certificates for the components, `hosts`' agents and `guest_clusters`' fence
    agents in `folder`. (The default host9 gets a certificate but no etcd user.)"""
    extra = [guest_clusters] if guest_clusters else []
    subprocess.run(
        ["bash", str(MAKE_CERTS), str(folder), "etcd1=127.0.0.1", hosts, *extra],
        check=True,
        capture_output=True,
    )
    return folder


def tls(pki: Path, user: str) -> TlsFiles:
    return TlsFiles(ca=pki / "ca.crt", cert=pki / f"{user}.crt", key=pki / f"{user}.key")


def store_as(etcd: EtcdCluster, pki: Path, user: str) -> Store:
    return Store(etcd.endpoints, prefix=PREFIX, tls=tls(pki, user), timeout=5)


@contextmanager
def etcd_with_rbac(
    pki: Path, setup: Callable[[EtcdCluster, Path], Coroutine[None, None, None]]
) -> Iterator[EtcdCluster]:
    """An etcd of its own with client certificates from `pki`, after `setup` ran on it."""
    with EtcdCluster(pki=pki) as cluster:
        asyncio.run(setup(cluster, pki))
        yield cluster
