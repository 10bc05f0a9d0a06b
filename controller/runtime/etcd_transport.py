"""How kvmctl reaches etcd: endpoints, TLS files and the gRPC channel aetcd dials.

The store (controller/runtime/store.py) builds its client here and asks here what a failed request
means; nothing else in kvmctl dials etcd.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.rtypes
import aetcd.watcher
import grpc

from controller.runtime.etcd_members import PROBE_INTERVAL, FailoverStub, Members

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # a list of every object of a kind arrives as one reply


class StoreError(Exception):
    """A store failure with a message fit for a user."""


class Unavailable(StoreError):
    """etcd could not be reached or did not answer in time."""


Scheme = Literal["http", "https"] | None
_SCHEMES: dict[str, Scheme] = {"": None, "http": "http", "https": "https"}
_PORT = re.compile(r"[0-9]{1,5}")
_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")


def parse_endpoints(endpoints: Sequence[str]) -> tuple[Scheme, list[tuple[str, int]]]:
    """The scheme the endpoints share (None when none names one) and their (host, port)s."""
    schemes: set[Scheme] = set()
    parsed: list[tuple[str, int]] = []
    for endpoint in endpoints:
        scheme, _, rest = endpoint.rpartition("://")
        if scheme not in _SCHEMES:
            raise StoreError(f"etcd endpoint {endpoint!r}: scheme must be http:// or https://")
        schemes.add(_SCHEMES[scheme])
        host, _, port = rest.rstrip("/").rpartition(":")
        if not _HOST.fullmatch(host) or not _PORT.fullmatch(port):
            raise StoreError(f"etcd endpoint {endpoint!r} must look like host:port")
        if not 1 <= int(port) <= 65535:
            raise StoreError(f"etcd endpoint {endpoint!r}: port {port} is not in 1-65535")
        parsed.append((host, int(port)))
    if not parsed:
        raise StoreError("no etcd endpoint given (use --etcd or KVMCTL_ETCD)")
    if len(schemes) > 1:
        raise StoreError(f"etcd endpoints {','.join(endpoints)} mix http, https and bare host:port")
    return schemes.pop(), parsed


def grpc_targets(endpoints: Sequence[str]) -> list[str]:
    """The `host:port` gRPC dials for each endpoint (names are resolved by gRPC)."""
    _, parsed = parse_endpoints(endpoints)
    return [f"{host}:{port}" for host, port in parsed]


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
_UTC_TIME_TAG = 0x17


def _certificate_fields(pem: bytes) -> list[bytes]:
    """The fields of a PEM certificate's to-be-signed part after its version: serial,
    signature algorithm, issuer, validity, subject, ..."""
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    certificate = next(_der_elements(der))[1]
    to_be_signed = next(_der_elements(certificate))[1]
    return [body for tag, body in _der_elements(to_be_signed) if tag != _EXPLICIT_VERSION_TAG]


def certificate_user(pem: bytes) -> str | None:
    """The subject CN of a PEM certificate: etcd's user name under `--client-cert-auth`."""
    try:
        for _, relative_name in _der_elements(_certificate_fields(pem)[4]):
            for _, attribute in _der_elements(relative_name):
                (_, oid), (_, value) = _der_elements(attribute)
                if oid == _COMMON_NAME_OID:
                    return value.decode()
    except (ValueError, IndexError, StopIteration, UnicodeDecodeError):
        return None
    return None


def certificate_validity(pem: bytes) -> tuple[datetime, datetime] | None:
    """A PEM certificate's (notBefore, notAfter); None if it cannot be read."""
    try:
        times = []
        for tag, body in _der_elements(_certificate_fields(pem)[3]):
            text = body.decode("ascii")
            layout = "%y%m%d%H%M%SZ" if tag == _UTC_TIME_TAG else "%Y%m%d%H%M%SZ"
            times.append(datetime.strptime(text, layout).replace(tzinfo=UTC))
        not_before, not_after = times
    except (ValueError, IndexError, StopIteration, UnicodeDecodeError):
        return None
    return not_before, not_after


def system_roots() -> bytes | None:
    """The system's trusted CAs as PEM (OpenSSL's default file, `SSL_CERT_FILE` if set);
    None when there is none, and gRPC falls back to its own bundle."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate:
            try:
                return Path(candidate).read_bytes()
            except OSError:
                continue
    return None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS to etcd: the CA that signed etcd's certificate (None: the system's
    trusted CAs), and our certificate and key for mutual TLS."""

    ca: Path | None = None
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
            root_certificates=read(self.ca, "CA") if self.ca else system_roots(),
            private_key=read(self.key, "key"),
            certificate_chain=read(self.cert, "certificate"),
        )


class EtcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client over one channel per etcd member (controller/runtime/etcd_members.py),
    over TLS when `tls` is set (aetcd itself only dials plain text), and knowing what it
    dialled so that a failure can be explained."""

    def __init__(self, endpoints: Sequence[str], tls: TlsFiles | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.endpoints = list(endpoints)
        self.tls = tls
        self._credentials = tls.credentials() if tls else None
        self.etcd_members: Members | None = None
        self.probe_interval = PROBE_INTERVAL
        """Seconds of silence after which an etcd member in use is probed (etcd_members.py)."""

    def probe_after_silence(self, seconds: float) -> None:
        """Probe a member in use once it has been silent `seconds`, never sooner than after
        the default `PROBE_INTERVAL`."""
        self.probe_interval = max(PROBE_INTERVAL, seconds)
        if self.etcd_members is not None:
            self.etcd_members.probe_interval = self.probe_interval

    def stub(self, stub_class: type) -> FailoverStub:
        """A stub of one of etcd's services (e.g. `aetcd.rpc.AuthStub`) on this client's members."""
        assert self.etcd_members is not None, "connect() first"
        return FailoverStub(self.etcd_members, stub_class)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = list(self._options.items())
        members = Members(
            grpc_targets(self.endpoints),
            self._credentials,
            options,
            self.metadata,
            self.probe_interval,
        )
        members.start()
        self.etcd_members = members
        self.kvstub = self.stub(aetcd.rpc.KVStub)
        self.clusterstub = self.stub(aetcd.rpc.ClusterStub)
        self.leasestub = self.stub(aetcd.rpc.LeaseStub)
        self.maintenancestub = self.stub(aetcd.rpc.MaintenanceStub)
        self._connected.set()  # no shared watcher: each watch has its own (`watch`)

    async def watch(
        self,
        key: bytes,
        range_end: bytes | None = None,
        start_revision: int | None = None,
        progress_notify: bool = False,
        kind: aetcd.rtypes.EventKind | None = None,
        prev_kv: bool = False,
        watch_id: int | None = None,
        fragment: bool = False,
    ) -> aetcd.rtypes.Watch:
        """aetcd's watch (and so `watch_prefix`), on a gRPC stream of its own.

        aetcd multiplexes a client's watches on one stream and hands etcd's "created" reply to
        whichever watch is being created when it arrives: after a create timed out on a slow
        etcd, its late reply went to the next watch created (another prefix's) and that one's
        own was cancelled, so it got the other prefix's events and never its own (one agent of
        the 50-host rack: its VirtualMachine cache stopped for good; tests/test_store_watch_
        streams.py). With one watch per stream a late reply can only be this watch's.
        """
        await self.connect()
        watcher = aetcd.watcher.Watcher(
            self.stub(aetcd.rpc.WatchStub), timeout=self._timeout, metadata=self.metadata
        )
        events: asyncio.Queue[Any] = asyncio.Queue()
        try:
            created = await watcher.add_callback(
                key,
                events.put,
                range_end=range_end,
                start_revision=start_revision,
                progress_notify=progress_notify,
                kind=kind,
                prev_kv=prev_kv,
                watch_id=watch_id,
                fragment=fragment,
            )
        except grpc.aio.AioRpcError as error:
            await watcher.shutdown()
            aetcd.exceptions._handle_exception(error)
            raise
        except BaseException:
            await watcher.shutdown()
            raise

        async def cancel() -> None:
            await events.put(None)
            await watcher.shutdown()

        async def iterator() -> AsyncIterator[aetcd.rtypes.Event]:
            try:
                while (event := await events.get()) is not None:
                    if isinstance(event, grpc.aio.AioRpcError):
                        aetcd.exceptions._handle_exception(event)
                    if isinstance(event, Exception):
                        raise event
                    yield event
            finally:
                await watcher.shutdown()

        return aetcd.rtypes.Watch(iterator, cancel, created.watch_id)

    async def watch_once(
        self, key: bytes, timeout: float | None = None, **options: Any
    ) -> aetcd.rtypes.Event:
        """aetcd's first-event watch (its lock waits with it), on a stream of its own: `watch`
        with the same `options`."""
        watch = await self.watch(key, **options)
        try:
            async with asyncio.timeout(timeout):
                async for event in watch:
                    return event
        except TimeoutError:
            raise aetcd.exceptions.WatchTimeoutError from None
        finally:
            await watch.cancel()
        raise aetcd.exceptions.WatchTimeoutError  # the watch ended without an event

    async def close(self) -> None:
        if self.etcd_members is not None:
            await self.etcd_members.close()
        self.etcd_members = None
        self._init_channel_attrs()
        self._connected.clear()


def make_client(
    endpoints: Sequence[str], timeout: float, tls: TlsFiles | None = None
) -> EtcdClient:
    """A client for `endpoints` (not connected yet), never in plain text to an `https://` one.

    `https://` without TLS files trusts the system's CAs; `http://` with TLS files is refused
    as a contradiction; bare `host:port` is TLS exactly when TLS files are given.
    """
    scheme, _ = parse_endpoints(endpoints)
    if scheme == "http" and tls is not None:
        raise StoreError(
            f"etcd endpoint {endpoints[0]} is plain http:// but TLS files were given "
            "(--cacert/--cert/--key): use https:// or drop them"
        )
    if scheme == "https" and tls is None:
        tls = TlsFiles()
    return EtcdClient(
        endpoints,
        tls,
        timeout=timeout,
        connect_wait_timeout=int(timeout),
        options={"grpc.max_receive_message_length": MAX_MESSAGE_BYTES},
    )


def is_permission_denied(error: aetcd.exceptions.ClientError) -> bool:
    """aetcd wraps etcd's PERMISSION_DENIED status in a plain ClientError: look at the cause."""
    cause = error.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and (
        cause.code() == grpc.StatusCode.PERMISSION_DENIED
    )


def unavailable(client: EtcdClient, error: Exception) -> Unavailable:
    """`error` (a failed or timed-out request) as one line naming its cause."""
    where = ",".join(client.endpoints)
    detail = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, TimeoutError) or not detail:
        return Unavailable(f"etcd at {where} is unreachable: no answer in time")
    if client.tls is not None:
        cause = _tls_cause(detail, client.tls)
        if cause is not None:
            return Unavailable(f"TLS to etcd at {where} failed: {cause}")
    elif "Socket closed" in detail:
        detail += " (if etcd serves TLS, use https:// or --cacert)"
    return Unavailable(f"etcd at {where} is unreachable: {_grpc_reason(detail)}")


def _grpc_reason(detail: str) -> str:
    """gRPC's last error without its `failed to connect...: CODE: ipv4:host:port:` preamble."""
    return re.sub(r"^.*last error: [A-Z_]+: (ipv[46]:)?\S+: ", "", detail)


_SERVER_CERTIFICATE = re.compile(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)")


def _tls_cause(detail: str, tls: TlsFiles) -> str | None:
    """What went wrong in the TLS handshake, from gRPC's message and our own files."""
    trusted = f"the CA in {tls.ca}" if tls.ca else "a CA this system trusts"
    if "Hostname Verification" in detail or "Peer name" in detail:
        return "name mismatch: etcd's certificate does not name the host dialled"
    verify = _SERVER_CERTIFICATE.search(detail)
    if verify is not None:
        reason = verify.group(1).strip()
        if "expired" in reason:
            return "etcd's certificate has expired"
        if "not yet valid" in reason:
            return "etcd's certificate is not valid yet (check the clocks)"
        if "issuer" in reason or "self-signed" in reason or "self signed" in reason:
            return f"unknown CA: etcd's certificate is not signed by {trusted}"
        return f"etcd's certificate was refused: {reason}"
    if "Handshake read failed" in detail:
        return "etcd closed the TLS handshake: does it serve TLS on this port?"
    if "TSI_DATA_CORRUPTED" in detail:
        return _client_certificate_cause(tls)
    return None


def _client_certificate_cause(tls: TlsFiles) -> str:
    """Why etcd would refuse our client certificate (it only tells us that it did)."""
    if tls.cert is None:
        return "no client certificate: etcd requires one (give --cert and --key)"
    try:
        validity = certificate_validity(tls.cert.read_bytes())
    except OSError:
        validity = None
    moment = datetime.now(UTC)
    if validity is not None and validity[1] < moment:
        return f"our client certificate {tls.cert} expired on {validity[1]:%Y-%m-%d %H:%M} UTC"
    if validity is not None and validity[0] > moment:
        return f"our client certificate {tls.cert} is not valid yet (check the clocks)"
    return (
        f"etcd refused our client certificate {tls.cert}: "
        "it is not signed by a CA etcd trusts (unknown CA)"
    )
