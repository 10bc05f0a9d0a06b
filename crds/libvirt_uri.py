"""Which libvirt URIs kvmctl opens or hands to libvirtd: an allow-list, not a deny-list.

libvirt runs programs chosen by a URI: `qemu+ext://...?command=PROG` runs PROG as root,
`qemu+ssh` runs ssh (`command=` picks the binary, `netcat=` the remote command, a host or user
starting with `-` would be an ssh option), and `socket=` redirects a connection. A ClusterNode's
`spec.libvirtUri` and the `status.libvirtUri` its agent reports are untrusted, yet the source
host's libvirtd opens them for a peer-to-peer migration. So:

- a *peer* URI (spec, status, migration target) is `qemu[+unix|+tcp|+tls|+ssh|+libssh|+libssh2]`
  with path `/system`; remote transports need a host name or address (an optional user and
  port); the query may hold only the parameters of `PEER_PARAMETERS` for that transport, each
  once, joined by `&`, with plain values (libvirt also splits on `;` and decodes `%XX`, so
  neither may appear anywhere);
- a *local* URI (the agent's own `--libvirt-uri`, set on its host) may also be
  `qemu+unix:///system?socket=/abs/path`, libvirt's in-process `test:///default` /
  `test:///abs/path.xml`, or that test host served by a libvirtd,
  `test+unix:///abs/path.xml[?socket=/abs/path]` (benches and tests);
- a migration data URI is `tcp://HOST[:PORT]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address

PEER_PARAMETERS: dict[str, frozenset[str]] = {
    "": frozenset(),
    "unix": frozenset(),
    "tcp": frozenset(),
    "tls": frozenset({"no_verify", "pkipath", "tls_priority"}),
    "ssh": frozenset({"keyfile", "no_tty", "no_verify", "proxy", "mode"}),
    "libssh": frozenset(
        {"keyfile", "known_hosts", "known_hosts_verify", "sshauth", "no_verify", "proxy", "mode"}
    ),
    "libssh2": frozenset(
        {"keyfile", "known_hosts", "known_hosts_verify", "sshauth", "no_verify", "proxy", "mode"}
    ),
}
"""Transport (after `qemu+`) -> the query parameters a peer URI may carry."""
REMOTE_TRANSPORTS = frozenset({"tcp", "tls", "ssh", "libssh", "libssh2"})
_CHOICES = {
    "no_verify": frozenset({"0", "1"}),
    "no_tty": frozenset({"0", "1"}),
    "proxy": frozenset({"auto", "netcat", "native"}),
    "mode": frozenset({"auto", "legacy", "direct"}),
    "known_hosts_verify": frozenset({"normal", "auto", "ignore"}),
}
_PATH_VALUED = frozenset({"keyfile", "pkipath", "known_hosts", "socket"})

_URI = re.compile(
    r"(?P<scheme>[a-z0-9]+)(\+(?P<transport>[a-z0-9]+))?://"
    r"((?P<user>[a-z_][a-z0-9_.-]{0,31})@)?(?P<host>[^/:?\[\]]*|\[[0-9a-fA-F:.]+\])"
    r"(:(?P<port>[0-9]{1,5}))?(?P<path>/[^?]*)(\?(?P<query>.*))?"
)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_MIGRATE_URI = re.compile(r"tcp://(?P<host>[^/:?\[\]]+|\[[0-9a-fA-F:.]+\])(:(?P<port>[0-9]{1,5}))?")
_PARAMETER = re.compile(r"(?P<name>[a-z_]{1,32})=(?P<value>[A-Za-z0-9._/:+,-]{0,256})")
_ABSOLUTE_PATH = re.compile(r"(/[A-Za-z0-9._+-]+)+")
_URI_CHARACTERS = re.compile(r"[A-Za-z0-9._~:/?\[\]@&=+,-]*")
"""ASCII without `%` (no decoding tricks), `;` (libvirt's other separator), `#`, quotes, space."""


class LibvirtUriError(ValueError):
    """A libvirt URI kvmctl refuses to open or hand to libvirtd."""


@dataclass(frozen=True)
class LibvirtUri:
    """An accepted URI, taken apart."""

    scheme: str
    transport: str
    user: str | None
    host: str
    port: int | None
    path: str
    parameters: dict[str, str]


def check_peer_uri(uri: str) -> str:
    """`uri` if a peer may migrate to it (spec or status `libvirtUri`), else LibvirtUriError."""
    parse_libvirt_uri(uri, local=False)
    return uri


def check_local_uri(uri: str) -> str:
    """`uri` if an agent may connect to it as its own host, else LibvirtUriError."""
    parse_libvirt_uri(uri, local=True)
    return uri


def peer_uri_or_none(uri: str) -> str | None:
    """`uri` if it is a valid peer URI, else None (a local-only URI is no use to peers)."""
    try:
        return check_peer_uri(uri)
    except LibvirtUriError:
        return None


def check_migrate_uri(uri: str) -> str:
    """`uri` if it is a migration data URI `tcp://HOST[:PORT]`, else LibvirtUriError."""
    match = _MIGRATE_URI.fullmatch(uri)
    if match is None or not _valid_host(match["host"]) or not _valid_port(match["port"]):
        raise LibvirtUriError(f"migration URI {uri!r}: expected tcp://HOST[:PORT]")
    return uri


def parse_libvirt_uri(uri: str, *, local: bool) -> LibvirtUri:
    """The parts of an allowed URI; LibvirtUriError saying what is wrong otherwise."""
    where = f"libvirt URI {uri!r}"
    if not uri.isascii() or not _URI_CHARACTERS.fullmatch(uri):
        raise LibvirtUriError(
            f"{where}: only letters, digits and ._~:/?[]@&=+,- are allowed (no %, ;, # or spaces)"
        )
    if local and uri.startswith(("test://", "test+unix://")):
        scheme, _, rest = uri.partition("://")
        test_path, _, query = rest.partition("?")
        if _test_path(test_path):
            transport = scheme.removeprefix("test").removeprefix("+")
            parameters = _parameters(where, query or None, transport, local=True)
            return LibvirtUri("test", transport, None, "", None, test_path, parameters)
    match = _URI.fullmatch(uri)
    if match is None or match["scheme"] != "qemu":
        raise LibvirtUriError(f"{where}: expected qemu[+TRANSPORT]://[HOST]/system")
    transport = match["transport"] or ""
    if transport not in PEER_PARAMETERS:
        allowed = ", ".join(f"qemu+{name}" for name in sorted(PEER_PARAMETERS) if name)
        raise LibvirtUriError(
            f"{where}: transport {transport!r} is not allowed (use qemu, {allowed})"
        )
    host, user, port = match["host"], match["user"], match["port"]
    if transport in REMOTE_TRANSPORTS:
        if not _valid_host(host) or not _valid_port(port):
            raise LibvirtUriError(f"{where}: qemu+{transport} needs a valid host name or address")
    elif host or user or port:
        raise LibvirtUriError(f"{where}: a local transport takes no host, user or port")
    if match["path"] != "/system":
        raise LibvirtUriError(f"{where}: the path must be /system (the system daemon)")
    parameters = _parameters(where, match["query"], transport, local=local)
    return LibvirtUri(
        "qemu", transport, user, host, None if port is None else int(port), "/system", parameters
    )


def _parameters(where: str, query: str | None, transport: str, *, local: bool) -> dict[str, str]:
    allowed = PEER_PARAMETERS[transport]
    if local and transport == "unix":
        allowed = allowed | {"socket"}
    parameters: dict[str, str] = {}
    for part in [] if query is None else query.split("&"):
        match = _PARAMETER.fullmatch(part)
        if match is None:
            raise LibvirtUriError(f"{where}: query part {part!r} is not NAME=VALUE")
        name, value = match["name"], match["value"]
        if name not in allowed:
            shown = ", ".join(sorted(allowed)) or "none"
            raise LibvirtUriError(
                f"{where}: parameter {name!r} is not allowed for this transport (allowed: {shown})"
            )
        if name in parameters:
            raise LibvirtUriError(f"{where}: parameter {name!r} is given twice")
        if name in _CHOICES and value not in _CHOICES[name]:
            choices = ", ".join(sorted(_CHOICES[name]))
            raise LibvirtUriError(f"{where}: {name}={value!r} is not one of {choices}")
        if name in _PATH_VALUED and not _absolute_path(value):
            raise LibvirtUriError(f"{where}: {name} must be an absolute path without '..'")
        parameters[name] = value
    return parameters


def _test_path(path: str) -> bool:
    """libvirt's in-process test driver: its default host or a host described by an XML file."""
    return path == "/default" or (_absolute_path(path) and path.endswith(".xml"))


def _absolute_path(path: str) -> bool:
    return bool(_ABSOLUTE_PATH.fullmatch(path)) and ".." not in path.split("/")


def _valid_host(host: str) -> bool:
    if host.startswith("["):
        try:
            return isinstance(ip_address(host[1:-1]), IPv6Address)
        except ValueError:
            return False
    return len(host) <= 253 and bool(_HOSTNAME.fullmatch(host))


def _valid_port(port: str | None) -> bool:
    return port is None or 1 <= int(port) <= 65535
