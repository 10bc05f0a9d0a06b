"""The documents by which a guest cluster's `fence_kvmctl` asks the controller to fence.

C is the guest cluster, VM a VirtualMachine labelled `fence.kvmctl.io/guest-cluster: C`; keys
are relative to the cluster prefix, built by `controller/runtime/layout_keys.py`:

- `requests/guest-fence/C/VM`: written by fence_kvmctl (etcd user `fence-C`),
  `{"action": "off"|"on", "id", "at", "timeout"}`; the leading controller deletes it when done;
- `results/guest-fence/C/VM`: written by the controller, `{"id", "state", "message"}`, `state`
  one of off, on (done: off only once the domain is confirmed gone), refused, failed;
- `results/guest-fence/C/status/VM`: written by the controller for every VM of C,
  `{"state": "on"|"off"|"unknown", "message"}`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast, get_args

from crds.meta import _check_name

from .requests import RequestFormatError, encode_document, parse_document

GUEST_CLUSTER_LABEL = "fence.kvmctl.io/guest-cluster"
"""The label that makes a VirtualMachine a member of a guest cluster (set by an admin)."""
USER_PREFIX = "fence-"
"""A guest cluster's etcd user (and certificate CN) is `fence-<cluster>`."""
MAX_TIMEOUT = 3600.0

GuestAction = Literal["off", "on"]
Outcome = Literal["off", "on", "refused", "failed"]
Published = Literal["on", "off", "unknown"]


def split_name(name: str) -> tuple[str, str] | None:
    """`C/VM` (a key under one of the families) as (cluster, vm); None for anything else."""
    cluster, separator, vm = name.partition("/")
    try:
        if separator and _check_name(cluster) and _check_name(vm):
            return cluster, vm
    except ValueError:
        pass
    return None


@dataclass(frozen=True)
class GuestRequest:
    action: GuestAction
    id: str
    at: datetime
    timeout: float


@dataclass(frozen=True)
class GuestResult:
    id: str
    state: Outcome
    message: str


@dataclass(frozen=True)
class PowerStatus:
    state: Published
    message: str


def _string(key: str, document: dict[str, object], field: str) -> str:
    value = document.get(field)
    if not isinstance(value, str) or not value.isascii() or not value.isprintable():
        raise RequestFormatError(f"{key}: {field} must be a printable ASCII string")
    return value


def new_request(action: GuestAction, timeout: float) -> GuestRequest:
    return GuestRequest(action, secrets.token_hex(8), datetime.now(UTC), timeout)


def encode_request(request: GuestRequest) -> bytes:
    return encode_document(
        {
            "action": request.action,
            "id": request.id,
            "at": request.at.isoformat(),
            "timeout": request.timeout,
        }
    )


def parse_request(key: str, value: bytes) -> GuestRequest:
    document = parse_document(key, value)
    action = document.get("action")
    if action not in get_args(GuestAction):
        raise RequestFormatError(f"{key}: action must be off or on, got {action!r}")
    timeout = document.get("timeout")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise RequestFormatError(f"{key}: timeout must be a number of seconds")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise RequestFormatError(f"{key}: timeout must be in (0, {MAX_TIMEOUT:g}] seconds")
    try:
        at = datetime.fromisoformat(_string(key, document, "at"))
    except ValueError as error:
        raise RequestFormatError(f"{key}: at: {error}") from None
    return GuestRequest(cast(GuestAction, action), _string(key, document, "id"), at, float(timeout))


def encode_result(result: GuestResult) -> bytes:
    return encode_document({"id": result.id, "state": result.state, "message": result.message})


def parse_result(key: str, value: bytes) -> GuestResult:
    document = parse_document(key, value)
    state = document.get("state")
    if state not in get_args(Outcome):
        raise RequestFormatError(f"{key}: unknown state {state!r}")
    message = str(document.get("message", ""))
    return GuestResult(_string(key, document, "id"), cast(Outcome, state), message)


def encode_status(status: PowerStatus) -> bytes:
    return encode_document({"state": status.state, "message": status.message})


def parse_status(key: str, value: bytes) -> PowerStatus:
    document = parse_document(key, value)
    state = document.get("state")
    if state not in get_args(Published):
        raise RequestFormatError(f"{key}: unknown state {state!r}")
    return PowerStatus(cast(Published, state), str(document.get("message", "")))
