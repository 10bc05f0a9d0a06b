"""Parts every kind shares: object metadata, conditions, validated scalar types.

Validation is strict: unknown fields are rejected everywhere (`extra="forbid"`), names follow
DNS-1123, and every value that later reaches a key, a path, XML or a command line is checked
against a narrow pattern here, once.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic import Strict as PydanticStrict

API_GROUP = "kvmctl.io"
API_VERSION = f"{API_GROUP}/v1alpha1"

# Every pattern is used with `fullmatch` (never `match` with `$`, which accepts a trailing
# newline) and spells digits `[0-9]`: `\d` also matches Unicode digits such as U+0661.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_IQN = re.compile(
    r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9]([-a-z0-9.]*[a-z0-9])?(:[A-Za-z0-9._:-]{1,200})?"
)
_EUI = re.compile(r"eui\.[0-9A-F]{16}")
_IFNAME = re.compile(r"[!-~]{1,15}")
"""Printable ASCII: the kernel counts IFNAMSIZ in bytes."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LVM_NAME = re.compile(r"[a-zA-Z0-9+_.][a-zA-Z0-9+_.-]{0,126}")
_SIZE = re.compile(r"([0-9]{1,20})([KMGTP]?)(i?B?)")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
MAX_SIZE = 1 << 50
"""The largest Size: 1 PiB."""
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _check_name(value: str) -> str:
    if len(value) > 63:
        raise ValueError(f"name {value[:20]!r}... is longer than 63 characters")
    if not _DNS1123_LABEL.fullmatch(value):
        raise ValueError(
            f"name {value!r} must be a DNS-1123 label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def _check_subdomain(value: str) -> str:
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(value):
        raise ValueError(f"{value!r} must be a DNS-1123 subdomain (lowercase, digits, '-', '.')")
    return value


def _check_iqn(value: str) -> str:
    if not (_IQN.fullmatch(value) or _EUI.fullmatch(value)) or len(value) > 223:
        raise ValueError(
            f"{value!r} is not an iSCSI name (RFC 3720): expected iqn.YYYY-MM.reversed.domain[:id]"
        )
    return value


def _check_ifname(value: str) -> str:
    if value in (".", "..") or not _IFNAME.fullmatch(value) or any(c in value for c in "/:%"):
        raise ValueError(
            f"interface name {value!r} must be 1-15 printable ASCII characters without spaces, "
            "'/', ':' or '%'"
        )
    return value


def _check_lvm_name(value: str) -> str:
    if (
        value in (".", "..")
        or not _LVM_NAME.fullmatch(value)
        or value.startswith(("snapshot", "pvmove"))
    ):
        raise ValueError(f"LVM name {value!r} may use only letters, digits, '+', '_', '.', '-'")
    return value


def parse_size(value: str) -> int:
    """Bytes in a size such as `50G`, `512Mi`, `1TiB` (binary multiples, as LVM reads them)."""
    match = _SIZE.fullmatch(value)
    if not match:
        raise ValueError(
            f"size {value!r} must be ASCII digits with an optional unit K, M, G, T or P"
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _check_size(value: str) -> str:
    size = parse_size(value)
    if not 0 < size <= MAX_SIZE:
        raise ValueError(f"size {value!r} must be above 0 and at most 1P")
    return value


def _check_label_key(value: str) -> str:
    if len(value) > 317 or not _LABEL_KEY.fullmatch(value):
        raise ValueError(f"label key {value!r} is not a valid qualified name")
    return value


def _check_label_value(value: str) -> str:
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"label value {value!r} is not valid (63 characters, alphanumeric, -_.)")
    return value


def _check_absolute_path(value: str) -> str:
    if not value.startswith("/") or len(value) > 4096 or _CONTROL.search(value):
        raise ValueError(f"path {value!r} must be absolute, without control characters")
    if ".." in value.split("/"):
        raise ValueError(f"path {value!r} must not contain '..'")
    if value != os.path.normpath(value) or value.startswith("//"):
        raise ValueError(
            f"path {value!r} must be normalised: no '//', '/./' or trailing '/' "
            f"(write {'/' + os.path.normpath(value).lstrip('/')!r})"
        )
    return value


def _check_line(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{value!r} must not contain control characters")
    return value


def _check_mac(value: str) -> str:
    if not _MAC.fullmatch(value):
        raise ValueError(
            f"MAC address {value!r} must be six lowercase hex pairs like 52:54:00:12:34:56"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]
Subdomain = Annotated[str, AfterValidator(_check_subdomain)]
Iqn = Annotated[str, AfterValidator(_check_iqn)]
InterfaceName = Annotated[str, AfterValidator(_check_ifname)]
LvmName = Annotated[str, AfterValidator(_check_lvm_name)]
Size = Annotated[str, AfterValidator(_check_size)]
LabelKey = Annotated[str, AfterValidator(_check_label_key)]
LabelValue = Annotated[str, AfterValidator(_check_label_value)]
MacAddress = Annotated[str, AfterValidator(_check_mac)]
AbsolutePath = Annotated[str, AfterValidator(_check_absolute_path)]
Line = Annotated[str, StringConstraints(max_length=1024), AfterValidator(_check_line)]
"""Free text printed on one line (names of other things, versions): no control characters."""
Text = Annotated[str, StringConstraints(max_length=4096)]
"""Messages written by kvmctl's components; may span lines."""
Time = Annotated[datetime, PydanticStrict(False)]
"""A time: an RFC 3339 string is accepted (JSON has no time type)."""
IPAddress = (
    Annotated[IPv4Address, PydanticStrict(False)] | Annotated[IPv6Address, PydanticStrict(False)]
)
IPInterface = (
    Annotated[IPv4Interface, PydanticStrict(False)]
    | Annotated[IPv6Interface, PydanticStrict(False)]
)
"""An address with its prefix length, `10.0.0.1/24`."""


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Strict(BaseModel):
    """Base of every API type: unknown fields are errors, fields use camelCase aliases.

    Types are strict: no string or float becomes an integer, only `true`/`false` are booleans
    (`Time` and the address types, which JSON can only carry as strings, opt out). Patterns run
    on pydantic's default Rust engine, where `$` matches only at the very end.
    """

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        validate_assignment=False,
        defer_build=True,
        strict=True,
    )


class ObjectMeta(Strict):
    name: Name
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[LabelKey, Annotated[str, StringConstraints(max_length=65536)]] = Field(
        default_factory=dict
    )
    uid: Annotated[str, StringConstraints(pattern=r"^[0-9a-f-]{1,64}$")] | None = None
    generation: int | None = None
    resource_version: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")] | None = Field(
        default=None, alias="resourceVersion"
    )
    creation_timestamp: Time | None = Field(default=None, alias="creationTimestamp")
    deletion_timestamp: Time | None = Field(default=None, alias="deletionTimestamp")
    finalizers: list[
        Subdomain | Annotated[str, StringConstraints(pattern=r"^[a-z0-9.-]+/[a-z0-9-]+$")]
    ] = Field(default_factory=list)


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Strict):
    type: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=64)]
    status: ConditionStatus
    reason: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=64)]
    message: Text = ""
    last_transition_time: Time = Field(default_factory=now, alias="lastTransitionTime")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")


class Status(Strict):
    conditions: list[Condition] = Field(default_factory=list)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def set_condition(
        self,
        type_: str,
        status: ConditionStatus,
        reason: str,
        message: str = "",
        observed_generation: int | None = None,
    ) -> bool:
        """Set a condition; lastTransitionTime moves only when status flips. True if changed."""
        new = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            observed_generation=observed_generation,
        )
        for index, old in enumerate(self.conditions):
            if old.type != type_:
                continue
            if (old.status, old.reason, old.message, old.observed_generation) == (
                status,
                reason,
                message,
                observed_generation,
            ):
                return False
            if old.status == status:
                new.last_transition_time = old.last_transition_time
            self.conditions[index] = new
            return True
        self.conditions.append(new)
        return True

    def drop_condition(self, type_: str) -> bool:
        """Remove the condition `type_`; True if there was one."""
        before = len(self.conditions)
        self.conditions = [c for c in self.conditions if c.type != type_]
        return len(self.conditions) != before


SpecT = TypeVar("SpecT", bound=BaseModel)
StatusT = TypeVar("StatusT", bound=Status)


class Resource(Strict, Generic[SpecT, StatusT]):
    """An API object: apiVersion, kind, metadata, spec, status."""

    api_version: Literal["kvmctl.io/v1alpha1"] = Field(
        default="kvmctl.io/v1alpha1", alias="apiVersion"
    )
    kind: str
    metadata: ObjectMeta
    spec: SpecT
    status: StatusT

    def key_name(self) -> str:
        return f"{self.kind}/{self.metadata.name}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
