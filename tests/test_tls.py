"""Mutual TLS to etcd: the right certificate works; a wrong or missing one is refused clearly."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.runtime.etcd_transport import TlsFiles
from controller.runtime.store import Store, StoreError
from crds import parse_object
from e2e.harness.etcd import EtcdCluster
from e2e.harness.polling import eventually

MAKE_CERTS = Path(__file__).parent.parent / "deploy" / "etcd" / "make-certs.sh"


def make_pki(folder: Path, days: int = 825) -> Path:
    subprocess.run(
        ["bash", str(MAKE_CERTS), str(folder), "etcd1=127.0.0.1", "host1"],
        check=True,
        capture_output=True,
        env={**os.environ, "KVMCTL_CERT_DAYS": str(days)},
    )
    return folder


def expired_pki(pki: Path, folder: Path) -> Path:
    """Certificates from `pki`'s CA that expired a day ago (openssl takes negative days)."""
    folder.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy(pki / name, folder / name)
    return make_pki(folder, days=-1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates from another CA."""
    return make_pki(tmp_path_factory.mktemp("other"))


@pytest.fixture(scope="module")
def expired(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Path:
    return expired_pki(pki, tmp_path_factory.mktemp("expired") / "pki")


@pytest.fixture(scope="module")
def tls_etcd(pki: Path) -> Iterator[EtcdCluster]:
    # Also on 127.0.0.2, an address its certificate does not name.
    with EtcdCluster(pki=pki, client_hosts=["127.0.0.1", "127.0.0.2"]) as cluster:
        yield cluster


def admin(pki: Path) -> TlsFiles:
    return TlsFiles(ca=pki / "ca.crt", cert=pki / "admin.crt", key=pki / "admin.key")


async def refusal(endpoints: list[str], tls: TlsFiles | None) -> str:
    """The one-line error of connecting to `endpoints`."""
    with pytest.raises(StoreError) as caught:
        async with Store(endpoints, prefix="/tls", tls=tls, timeout=3):
            pass
    message = str(caught.value)
    assert "\n" not in message
    return message


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
    message = await refusal(tls_etcd.endpoints, TlsFiles(ca=pki / "ca.crt"))
    assert "no client certificate: etcd requires one" in message


async def test_client_certificate_from_another_ca_is_refused(
    tls_etcd: EtcdCluster, other: Path, pki: Path
) -> None:
    tls = TlsFiles(ca=pki / "ca.crt", cert=other / "admin.crt", key=other / "admin.key")
    message = await refusal(tls_etcd.endpoints, tls)
    assert f"etcd refused our client certificate {other / 'admin.crt'}" in message
    assert "unknown CA" in message


async def test_expired_client_certificate_is_named(
    tls_etcd: EtcdCluster, expired: Path, pki: Path
) -> None:
    tls = TlsFiles(ca=pki / "ca.crt", cert=expired / "admin.crt", key=expired / "admin.key")
    message = await refusal(tls_etcd.endpoints, tls)
    assert f"our client certificate {expired / 'admin.crt'} expired on " in message


async def test_server_certificate_from_an_unknown_ca_is_named(
    tls_etcd: EtcdCluster, other: Path, pki: Path
) -> None:
    tls = TlsFiles(ca=other / "ca.crt", cert=pki / "admin.crt", key=pki / "admin.key")
    message = await refusal(tls_etcd.endpoints, tls)
    assert (
        f"unknown CA: etcd's certificate is not signed by the CA in {other / 'ca.crt'}" in message
    )


async def test_a_host_the_server_certificate_does_not_name_is_a_name_mismatch(
    tls_etcd: EtcdCluster, pki: Path
) -> None:
    port = tls_etcd.members[0].client_port
    message = await refusal([f"127.0.0.2:{port}"], admin(pki))
    assert "name mismatch: etcd's certificate does not name the host dialled" in message


async def test_expired_server_certificate_is_named(expired: Path, pki: Path) -> None:
    cluster = EtcdCluster(pki=expired)  # never "healthy": its certificate fails verification
    try:
        member = cluster.members[0]
        member.start()
        await eventually(lambda: serves_tls(member.client_port), "etcd serving TLS")
        message = await refusal(cluster.endpoints, admin(pki))
        assert "TLS to etcd at" in message and "etcd's certificate has expired" in message
    finally:
        cluster.stop()


def serves_tls(port: int) -> bool:
    """A TLS handshake on `port` completes (certificates not checked)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
            context.wrap_socket(raw) as tls,
        ):
            return tls.version() is not None
    except OSError:
        return False


async def test_plain_text_client_is_refused(tls_etcd: EtcdCluster) -> None:
    message = await refusal(tls_etcd.endpoints, None)
    assert "unreachable" in message and "if etcd serves TLS, use https://" in message


async def test_https_without_a_ca_trusts_the_system_never_plain_text(
    tls_etcd: EtcdCluster, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    https = [f"https://{endpoint}" for endpoint in tls_etcd.endpoints]
    pair = TlsFiles(cert=pki / "admin.crt", key=pki / "admin.key")
    # The system's CAs do not include the test CA: refused as an unknown CA (in plain text,
    # etcd would have closed the connection instead).
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "admin.crt"))
    message = await refusal(https, pair)
    assert "unknown CA: etcd's certificate is not signed by a CA this system trusts" in message
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.crt"))
    async with Store(https, prefix="/tls", tls=pair, timeout=3) as store:
        await store.revision()
    message = await refusal(https, None)  # TLS with the system's CAs, no client certificate
    assert "no client certificate" in message


def test_http_with_tls_files_is_a_contradiction(pki: Path) -> None:
    with pytest.raises(StoreError, match=r"is plain http:// but TLS files were given"):
        Store(["http://127.0.0.1:2379"], tls=admin(pki))


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("127.0.0.1:99999", "port 99999 is not in 1-65535"),
        ("127.0.0.1:0", "port 0 is not in 1-65535"),
        ("127.0.0.1:٢٣٧٩", "must look like host:port"),
        ("127.0.0.1:-1", "must look like host:port"),
        ("127.0.0.1", "must look like host:port"),
        ("ftp://127.0.0.1:2379", "scheme must be http:// or https://"),
        ("127.0.0.1:2379/path", "must look like host:port"),
        ("bad host:2379", "must look like host:port"),
    ],
)
def test_bad_endpoints_are_refused(endpoint: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        Store([endpoint])


def test_mixed_schemes_are_refused() -> None:
    with pytest.raises(StoreError, match="mix http, https and bare host:port"):
        Store(["https://10.0.0.1:2379", "10.0.0.2:2379"])


def test_the_cli_says_one_line_without_grpcs_own_logging(
    tls_etcd: EtcdCluster, other: Path, pki: Path
) -> None:
    env = {key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"}
    env.update(KVMCTL_CONFIG="", KVMCTL_ETCD=f"https://{tls_etcd.endpoints[0]}")
    for flags, cause in (
        (["--cacert", str(other / "ca.crt")], "unknown CA"),
        (["--cacert", str(pki / "ca.crt")], "no client certificate"),
        (["--cacert", str(pki / "ca.crt"), "--cert", str(other / "admin.crt"),
          "--key", str(other / "admin.key")], "refused our client certificate"),
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "controller.cli", *flags, "--timeout", "3", "get", "vm"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1
        assert result.stderr.startswith("error: TLS to etcd at ") and cause in result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_unreadable_certificate_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot read the TLS CA"):
        Store(["127.0.0.1:2379"], tls=TlsFiles(ca=tmp_path / "missing.crt"))
