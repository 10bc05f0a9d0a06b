"""Thin async driver over `tgtadm`, the control tool of the user-space iSCSI target tgtd.

The only code in kvmctl that talks to tgtd. Every method is one `tgtadm` call (argument lists,
never a shell); deciding *what* to change is the IscsiTarget reconciler's job. A refused request
raises `TgtError` with tgtadm's reason, a daemon that is not running raises `TgtUnavailable`.
CHAP passwords are passed to tgtadm as arguments and never appear in errors, logs or reprs.
The errors are in tgt_errors, the targets and the parser of tgtadm's `show` output in tgt_show;
import them from here.

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
from pathlib import Path

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from .tgt_errors import TgtError, TgtUnavailable
from .tgt_show import Lun, Session, Target, parse_targets

__all__ = [
    "NOT_CONNECTED_RETRY",
    "Lun",
    "Session",
    "Target",
    "TgtAdm",
    "TgtError",
    "TgtUnavailable",
    "parse_targets",
]

log = logging.getLogger(__name__)

_EXIT_REFUSED = 22
"""tgtadm's exit status for a request tgtd refused (EINVAL), with a message on stderr."""
_EXIT_NOT_CONNECTED = 107
"""tgtadm's exit status when no tgtd listens on the control port (ENOTCONN)."""
_REDACTED = "***"


class _NotConnected(TgtUnavailable):
    """tgtadm found no tgtd on the control port: the request reached nothing (safe to retry)."""


NOT_CONNECTED_RETRY = 2.0
"""Seconds a request keeps trying while no tgtd answers on the control port: a tgtd that the
agent's supervisor is (re)starting answers within that, and the request then goes through."""


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
