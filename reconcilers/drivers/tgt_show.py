"""The targets tgtd reports (`Target`, `Lun`, `Session`) and the parser of `tgtadm --op show
--mode target` that builds them; import them from `reconcilers.drivers.tgt`."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .tgt_errors import TgtError

_INDENT = 4
"""tgtadm indents each level of its `show` output by four spaces."""


@dataclass(frozen=True)
class Lun:
    """One logical unit of a target. LUN 0 is the controller tgtd adds to every target."""

    number: int
    type: str
    """`disk` for backing-store LUNs, `controller` for LUN 0."""
    size_mb: int
    """Size as tgtd reports it: decimal megabytes, rounded (tgtadm shows nothing finer)."""
    block_size: int
    backing_store_type: str
    """`rdwr`, `aio`, ... or `null` for LUN 0."""
    backing_store_path: str | None
    online: bool
    readonly: bool


@dataclass(frozen=True)
class Session:
    """One connected initiator (an I_T nexus) and the addresses of its connections."""

    nexus_id: int
    initiator: str
    alias: str | None
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One iSCSI target as `tgtadm --op show --mode target` reports it."""

    tid: int
    iqn: str
    state: str
    luns: tuple[Lun, ...]
    sessions: tuple[Session, ...]
    accounts: tuple[str, ...]
    """Incoming CHAP users bound to the target."""
    outgoing_account: str | None
    """The user the target authenticates itself as (mutual CHAP), if any."""
    acl_addresses: tuple[str, ...]
    """Initiator addresses or networks allowed in, or `ALL`."""
    acl_initiator_names: tuple[str, ...]
    """Initiator names (IQNs) allowed in."""


def _is_address(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return entry == "ALL"
    return True


@dataclass
class _SessionBuilder:
    """Mutable collector for one I_T nexus while its lines are parsed."""

    nexus_id: int
    initiator: str = ""
    alias: str | None = None
    addresses: list[str] = field(default_factory=list)

    def build(self) -> Session:
        return Session(self.nexus_id, self.initiator, self.alias, tuple(self.addresses))


@dataclass
class _TargetBuilder:
    """Mutable collector for one target while its `show` block is parsed."""

    tid: int
    iqn: str
    state: str = ""
    luns: list[dict[str, str]] = field(default_factory=list)
    sessions: list[_SessionBuilder] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    outgoing_account: str | None = None
    acl: list[str] = field(default_factory=list)

    def build(self) -> Target:
        return Target(
            tid=self.tid,
            iqn=self.iqn,
            state=self.state,
            luns=tuple(_lun(fields) for fields in self.luns),
            sessions=tuple(session.build() for session in self.sessions),
            accounts=tuple(self.accounts),
            outgoing_account=self.outgoing_account,
            acl_addresses=tuple(entry for entry in self.acl if _is_address(entry)),
            acl_initiator_names=tuple(entry for entry in self.acl if not _is_address(entry)),
        )


_TARGET_LINE = re.compile(r"Target (\d+): (\S+)$")
_INITIATOR_LINE = re.compile(r"Initiator: (\S+) alias: (.*)$")
_SIZE_LINE = re.compile(r"(\d+) MB, Block size: (\d+)$")
_OUTGOING = " (outgoing)"


def parse_targets(output: str) -> list[Target]:
    """Targets from the text of `tgtadm --op show --mode target`."""
    targets: list[_TargetBuilder] = []
    section = ""
    for raw in output.splitlines():
        line = raw.strip()
        if not line:
            continue
        level = (len(raw) - len(raw.lstrip(" "))) // _INDENT
        if level == 0:
            match = _TARGET_LINE.match(line)
            if match is None:
                raise TgtError(f"unexpected line in tgtadm's target list: {line!r}")
            targets.append(_TargetBuilder(tid=int(match[1]), iqn=match[2]))
            continue
        if not targets:
            raise TgtError(f"unexpected line before the first target: {line!r}")
        target = targets[-1]
        if level == 1:
            section = line
        elif section == "System information:" and line.startswith("State: "):
            target.state = line.removeprefix("State: ")
        elif section == "I_T nexus information:":
            _parse_nexus_line(target, line)
        elif section == "LUN information:":
            if line.startswith("LUN: "):
                target.luns.append({})
            key, _, value = line.partition(": ")
            target.luns[-1][key] = value
        elif section == "Account information:":
            if line.endswith(_OUTGOING):
                target.outgoing_account = line.removesuffix(_OUTGOING)
            else:
                target.accounts.append(line)
        elif section == "ACL information:":
            target.acl.append(line)
    return [target.build() for target in targets]


def _parse_nexus_line(target: _TargetBuilder, line: str) -> None:
    if line.startswith("I_T nexus: "):
        target.sessions.append(_SessionBuilder(nexus_id=int(line.removeprefix("I_T nexus: "))))
        return
    session = target.sessions[-1]
    initiator = _INITIATOR_LINE.match(line)
    if initiator is not None:
        session.initiator = initiator[1]
        session.alias = None if initiator[2] == "none" else initiator[2]
    elif line.startswith("IP Address: "):
        session.addresses.append(line.removeprefix("IP Address: "))


def _lun(fields: dict[str, str]) -> Lun:
    size = _SIZE_LINE.match(fields.get("Size", ""))
    if size is None:
        raise TgtError(f"unexpected LUN size in tgtadm's output: {fields.get('Size')!r}")
    path = fields.get("Backing store path", "None")
    return Lun(
        number=int(fields["LUN"]),
        type=fields.get("Type", ""),
        size_mb=int(size[1]),
        block_size=int(size[2]),
        backing_store_type=fields.get("Backing store type", ""),
        backing_store_path=None if path == "None" else path,
        online=fields.get("Online") == "Yes",
        readonly=fields.get("Readonly") == "Yes",
    )
