"""Thin async driver over `tgtadm`, the control tool of the user-space iSCSI target tgtd.

The only code in kvmctl that talks to tgtd. Every method is one `tgtadm` call (argument lists,
never a shell); deciding *what* to change is the IscsiTarget reconciler's job. A refused request
raises `TgtError` with tgtadm's reason, a daemon that is not running raises `TgtUnavailable`.
CHAP passwords are passed to tgtadm as arguments and never appear in errors, logs or reprs.

    adm = TgtAdm(control_port=4711)
    await adm.new_target(1, "iqn.2024-01.org.example:storage")
    await adm.add_lun(1, 1, "/dev/vg_storage/lun1")
    await adm.bind_address(1, "ALL")
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

log = logging.getLogger(__name__)

_EXIT_REFUSED = 22
"""tgtadm's exit status for a request tgtd refused (EINVAL), with a message on stderr."""
_EXIT_NOT_CONNECTED = 107
"""tgtadm's exit status when no tgtd listens on the control port (ENOTCONN)."""
_REDACTED = "***"
_INDENT = 4
"""tgtadm indents each level of its `show` output by four spaces."""


class TgtError(Exception):
    """tgtadm refused a request; the message names the request and tgtadm's reason."""


class TgtUnavailable(TgtError):
    """No tgtd answers on the control port (not running, or tgtadm is not installed)."""


class _NotConnected(TgtUnavailable):
    """tgtadm found no tgtd on the control port: the request reached nothing (safe to retry)."""


NOT_CONNECTED_RETRY = 2.0
"""Seconds a request keeps trying while no tgtd answers on the control port: a tgtd that the
agent's supervisor is (re)starting answers within that, and the request then goes through."""


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


class TgtAdm:
    """tgtadm against the tgtd on `control_port` (None: tgtd's default control port).

    A request that gets no answer within `timeout` seconds (tgtadm blocks on a wedged tgtd)
    is abandoned and raises `TgtUnavailable`.
    """

    def __init__(
        self,
        control_port: int | None = None,
        timeout: float = 30.0,
        not_connected_retry: float = NOT_CONNECTED_RETRY,
    ) -> None:
        self.control_port = control_port
        self.timeout = timeout
        self.not_connected_retry = not_connected_retry

    def __repr__(self) -> str:
        return f"TgtAdm(control_port={self.control_port}, timeout={self.timeout})"

    async def is_running(self) -> bool:
        """Whether a tgtd answers on the control port."""
        try:
            await self._run_once("show system", ["--op", "show", "--mode", "system"])
        except TgtUnavailable:
            return False
        return True

    async def stop_daemon(self) -> None:
        """Ask tgtd to exit (`--op delete --mode system`): tgtd refuses while it has targets.

        SIGTERM alone can leave tgtd hanging; this is the clean way to stop it.
        """
        await self._run("stop tgtd", ["--op", "delete", "--mode", "system"])

    async def portals(self) -> list[str]:
        """The portals (`address:port`) tgtd listens on: it binds them before it answers, and
        silently goes without one that is taken."""
        output = await self._run("show portals", ["--op", "show", "--mode", "portal"])
        return [
            line.removeprefix("Portal:").strip().rsplit(",", 1)[0]
            for line in output.splitlines()
            if line.startswith("Portal:")
        ]

    async def show(self) -> list[Target]:
        """All targets with their LUNs, sessions, accounts and ACLs."""
        output = await self._run("show targets", ["--op", "show", "--mode", "target"])
        return parse_targets(output)

    async def new_target(self, tid: int, iqn: str) -> None:
        await self._run(
            f"new target {tid} ({iqn})",
            ["--op", "new", "--mode", "target", "--tid", str(tid), "--targetname", iqn],
        )

    async def delete_target(self, tid: int, force: bool = False) -> None:
        """Delete a target; tgtd refuses while initiators are connected unless `force`."""
        args = ["--op", "delete", "--mode", "target", "--tid", str(tid)]
        await self._run(f"delete target {tid}", [*args, "--force"] if force else args)

    async def add_lun(self, tid: int, lun: int, backing_store: str | Path) -> None:
        """Offer a file or block device as LUN `lun` (1 and up) of target `tid`."""
        args = ["--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun)]
        try:
            await self._run(
                f"add LUN {lun} to target {tid}", [*args, "--backing-store", str(backing_store)]
            )
        except TgtUnavailable:
            raise
        except TgtError as error:
            # tgtd says only "invalid request" for a missing backing store.
            if not await asyncio.to_thread(os.path.exists, backing_store):
                raise TgtError(f"{error}: backing store {backing_store} does not exist") from None
            raise

    async def delete_lun(self, tid: int, lun: int) -> None:
        await self._run(
            f"delete LUN {lun} of target {tid}",
            ["--op", "delete", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun)],
        )

    async def bind_address(self, tid: int, address: str) -> None:
        """Allow initiators from an IP address, a network (`10.0.0.0/24`) or `ALL`."""
        _check_address(address)
        await self._acl("bind", tid, "--initiator-address", address)

    async def unbind_address(self, tid: int, address: str) -> None:
        await self._acl("unbind", tid, "--initiator-address", address)

    async def bind_initiator_name(self, tid: int, name: str) -> None:
        """Allow the initiator that logs in with this name (its IQN)."""
        await self._acl("bind", tid, "--initiator-name", name)

    async def unbind_initiator_name(self, tid: int, name: str) -> None:
        await self._acl("unbind", tid, "--initiator-name", name)

    async def new_account(self, user: str, password: str) -> None:
        """Create a CHAP account; the password is redacted from any error."""
        await self._run(
            f"new account {user}",
            ["--op", "new", "--mode", "account", "--user", user, "--password", password],
            secret=password,
        )

    async def delete_account(self, user: str) -> None:
        await self._run(
            f"delete account {user}", ["--op", "delete", "--mode", "account", "--user", user]
        )

    async def bind_account(self, tid: int, user: str, outgoing: bool = False) -> None:
        """Require CHAP as `user` to log in to `tid` (or, `outgoing`, answer mutual CHAP)."""
        await self._account("bind", tid, user, outgoing)

    async def unbind_account(self, tid: int, user: str, outgoing: bool = False) -> None:
        await self._account("unbind", tid, user, outgoing)

    async def list_accounts(self) -> list[str]:
        """Names of all CHAP accounts tgtd knows, bound or not."""
        output = await self._run("show accounts", ["--op", "show", "--mode", "account"])
        return [line.strip() for line in output.splitlines() if line.startswith(" ")]

    async def _acl(self, op: str, tid: int, option: str, initiator: str) -> None:
        await self._run(
            f"{op} initiator {initiator} on target {tid}",
            ["--op", op, "--mode", "target", "--tid", str(tid), option, initiator],
        )

    async def _account(self, op: str, tid: int, user: str, outgoing: bool) -> None:
        args = ["--op", op, "--mode", "account", "--tid", str(tid), "--user", user]
        kind = "outgoing account" if outgoing else "account"
        await self._run(
            f"{op} {kind} {user} on target {tid}", [*args, "--outgoing"] if outgoing else args
        )

    async def _run(self, operation: str, args: list[str], secret: str | None = None) -> str:
        """Run one tgtadm request and return its output; `operation` names it in errors.

        While no tgtd answers on the control port, the request is tried again (backoff with
        jitter) for `not_connected_retry` seconds; any other failure is final.
        """

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.info("%s; retrying", error)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_NotConnected),
            wait=wait_random_exponential(multiplier=0.1, max=0.5),
            stop=stop_after_delay(self.not_connected_retry),
            before_sleep=log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._run_once(operation, args, secret)
        raise AssertionError("unreachable: the last attempt's error is raised")

    async def _run_once(self, operation: str, args: list[str], secret: str | None = None) -> str:
        control = [] if self.control_port is None else ["--control-port", str(self.control_port)]
        log.debug("tgtadm: %s", operation)
        try:
            process = await asyncio.create_subprocess_exec(
                "tgtadm",
                "--lld",
                "iscsi",
                *control,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise TgtUnavailable(f"{operation} failed: tgtadm is not installed") from None
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise TgtUnavailable(
                f"{operation} failed: tgtd gave no answer within {self.timeout} s"
            ) from None
        if process.returncode == 0:
            return stdout.decode(errors="replace")
        reason = _reason(stderr.decode(errors="replace") or stdout.decode(errors="replace"))
        if secret:
            reason = reason.replace(secret, _REDACTED)
        if process.returncode == _EXIT_NOT_CONNECTED:
            port = "the default control port" if self.control_port is None else self.control_port
            raise _NotConnected(f"{operation} failed: no tgtd on control port {port} ({reason})")
        if process.returncode != _EXIT_REFUSED:
            reason = f"{reason} (tgtadm exit status {process.returncode})"
        raise TgtError(f"{operation} failed: {reason}")


def _reason(output: str) -> str:
    """tgtadm's message without its `tgtadm: ` prefixes, on one line."""
    lines = [line.strip().removeprefix("tgtadm: ") for line in output.splitlines()]
    return "; ".join(line for line in lines if line) or "no message"


def _check_address(address: str) -> None:
    """tgtd accepts any string as an address ACL; refuse what can never match an initiator."""
    if address == "ALL":
        return
    try:
        ipaddress.ip_network(address, strict=False)
    except ValueError:
        raise TgtError(
            f"bind initiator {address}: not an IP address, a network such as 10.0.0.0/24, or ALL"
        ) from None


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
