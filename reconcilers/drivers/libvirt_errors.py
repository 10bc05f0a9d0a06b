"""The libvirt driver's error types, and how a libvirt error maps onto them.

The type tells the caller what to do: `LibvirtUnavailable` (retry after reconnecting),
`DomainNotFound`, `DomainStateConflict` (the domain is not in a state that allows the action),
`InvalidDefinition` (libvirt refused the XML: terminal), `MigrationError`.
"""

from __future__ import annotations

from typing import Any

import libvirt


class LibvirtError(Exception):
    """A libvirt call failed; the message says what, on which host and domain, and why."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        """libvirt's error code (`VIR_ERR_*`), when libvirt reported one."""


class LibvirtUnavailable(LibvirtError):
    """The libvirt daemon cannot be reached or the connection is gone: reconnect and retry."""


class DomainNotFound(LibvirtError):
    """No domain of that name is defined on this host."""


class DomainStateConflict(LibvirtError):
    """The action does not fit the domain's state (starting a running domain, for example)."""


class InvalidDefinition(LibvirtError):
    """libvirt refused a domain definition: retrying the same XML will not help."""


class InvalidUri(LibvirtError):
    """A libvirt URI outside the allow-list (libvirt_uri.py): nothing was opened."""


class MigrationError(LibvirtError):
    """A live migration failed or was refused. The domain normally keeps running on the
    source; when the cause is a lost connection to the source, look at both hosts again."""


def wrap_error(error: Any, context: str) -> LibvirtError:
    """The kvmctl exception for a libvirt.libvirtError raised while doing `context`."""
    code = error.get_error_code()
    message = f"{context}: {error.get_error_message() or error}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(message, code)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN) or (
        error.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
    ):
        return LibvirtUnavailable(message, code)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DomainStateConflict(message, code)
    if code in (
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_ERR_XML_DETAIL,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    ):
        return InvalidDefinition(message, code)
    return LibvirtError(message, code)
