"""How kvmctl reaches etcd: endpoints, TLS files and the gRPC channel aetcd dials.

The store (controller/store.py) builds its client here and asks here what a failed request
means; nothing else in kvmctl dials etcd.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # a list of every object of a kind arrives as one reply


class StoreError(Exception):
    """A store failure with a message fit for a user."""


class Unavailable(StoreError):
    """etcd could not be reached or did not answer in time."""


def grpc_target(endpoints: Sequence[str]) -> tuple[str, int]:
    """aetcd's (host, port) for one or several `host:port` endpoints.

    aetcd dials `f"{host}:{port}"`. For several IPv4 endpoints we hand gRPC its own list syntax
    (`ipv4:a:p1,b:p2`), so the channel fails over between members by itself.
    """
    parsed: list[tuple[str, int]] = []
    for endpoint in endpoints:
        endpoint = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise StoreError(f"etcd endpoint {endpoint!r} must look like host:port")
        parsed.append((host, int(port)))
    if not parsed:
        raise StoreError("no etcd endpoint given (use --etcd or KVMCTL_ETCD)")
    if len(parsed) == 1:
        return parsed[0]
    try:
        for host, _ in parsed:
            ipaddress.IPv4Address(host)
    except ValueError:
        log.warning("several etcd endpoints given by name: using only %s", parsed[0][0])
        return parsed[0]
    head = ",".join(f"{host}:{port}" for host, port in parsed[:-1])
    last_host, last_port = parsed[-1]
    return f"ipv4:{head},{last_host}", last_port


def _der_elements(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, content) of each DER element in `data`, in order."""
    offset = 0
    while offset < len(data):
        tag, length = data[offset], data[offset + 1]
        offset += 2
        if length & 0x80:
            size = length & 0x7F
            length = int.from_bytes(data[offset : offset + size], "big")
            offset += size
        yield tag, data[offset : offset + length]
        offset += length


_COMMON_NAME_OID = b"\x55\x04\x03"  # 2.5.4.3
_EXPLICIT_VERSION_TAG = 0xA0


def certificate_user(pem: bytes) -> str | None:
    """The subject CN of a PEM certificate: etcd's user name under `--client-cert-auth`."""
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.decode())
        certificate = next(_der_elements(der))[1]
        to_be_signed = next(_der_elements(certificate))[1]
        fields = [body for tag, body in _der_elements(to_be_signed) if tag != _EXPLICIT_VERSION_TAG]
        subject = fields[4]  # after serial, signature algorithm, issuer, validity
        for _, relative_name in _der_elements(subject):
            for _, attribute in _der_elements(relative_name):
                (_, oid), (_, value) = _der_elements(attribute)
                if oid == _COMMON_NAME_OID:
                    return value.decode()
    except (ValueError, IndexError, StopIteration, UnicodeDecodeError):
        return None
    return None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS to etcd: the CA that signed etcd's certificate, our pair."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def user(self) -> str | None:
        """The etcd user this client is, from its certificate's CN (None if unknown)."""
        if self.cert is None:
            return None
        try:
            return certificate_user(self.cert.read_bytes())
        except OSError:
            return None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as error:
                raise StoreError(f"cannot read the TLS {what} {path}: {error.strerror}") from None

        if (self.cert is None) != (self.key is None):
            raise StoreError("a TLS client certificate needs both --cert and --key")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca, "CA"),
            private_key=read(self.key, "key"),
            certificate_chain=read(self.cert, "certificate"),
        )


class TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client over a TLS channel (aetcd itself only dials plain text)."""

    def __init__(self, tls: TlsFiles, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = tls.credentials()

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = aetcd.rpc.secure_channel(
            target, self._credentials, options=list(self._options.items())
        )
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def is_permission_denied(error: aetcd.exceptions.ClientError) -> bool:
    """aetcd wraps etcd's PERMISSION_DENIED status in a plain ClientError: look at the cause."""
    cause = error.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and (
        cause.code() == grpc.StatusCode.PERMISSION_DENIED
    )


def unavailable(endpoints: Sequence[str], error: Exception) -> Unavailable:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return Unavailable(f"etcd at {','.join(endpoints)} is unreachable: {detail}")


def make_client(
    endpoints: Sequence[str], timeout: float, tls: TlsFiles | None = None
) -> aetcd.Client:
    """An aetcd client for `endpoints` (not connected yet)."""
    host, port = grpc_target(endpoints)
    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "timeout": timeout,
        "connect_wait_timeout": int(timeout),
        "options": {"grpc.max_receive_message_length": MAX_MESSAGE_BYTES},
    }
    return TlsClient(tls, **settings) if tls else aetcd.Client(**settings)
