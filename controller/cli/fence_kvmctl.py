"""fence_kvmctl: a fence agent for clusters running inside kvmctl VirtualMachines.

It speaks the standard fence-agent protocol (the one of Debian's `fence-agents`, used by
Pacemaker's stonithd and by rgmanager): options as `key=value` lines on stdin when there are no
command-line arguments, else as options (`-o off -n vm1 --etcd 10.0.0.1:2379`); `-o metadata`
prints the agent's XML description. Exit codes: 0 success (and "on" for `status`), 2 "off" for
`status`, 1 failure. The plug is the VirtualMachine's name; it is reached through etcd, wherever
the VM runs.

It acts for one guest cluster C (the `guest_cluster` option, or the `fence-C` user of its
client certificate; both given, they must agree) and only through kvmctl's leading controller
(controller/ha/guest_fence.py), which carries out requests for VMs labelled
`fence.kvmctl.io/guest-cluster: C` only and refuses the rest:

- off / on: writes `{prefix}/requests/guest-fence/C/VM` and waits for the controller's answer
  at `{prefix}/results/guest-fence/C/VM`. "off" is answered only once kvmctl confirms the domain
  gone (the host agent destroys it at once, no guest shutdown); "on" once it runs. Without an
  answer within power_timeout (plus a margin) the request is withdrawn and the action fails.
- reboot: off, then on; success once off is confirmed (as fence-agents do).
- status: the power state the controller publishes at
  `{prefix}/results/guest-fence/C/status/VM`: "on", "off", or a failure when it cannot tell.
- list / list-status: the VMs of C (those published states); monitor: they can be read;
  validate-all: options parse.

etcd credentials (`kvmctl admin rbac apply --guest-clusters C`, user `fence-C`): read
`{prefix}/revision-probe`, readwrite `{prefix}/requests/guest-fence/C/`, read
`{prefix}/results/guest-fence/C/`; nothing else (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from controller.cli.fence_options import ACTIONS as ACTIONS
from controller.cli.fence_options import (
    AGENT_NAME,
    ANSWER_MARGIN,
    EXIT_FAILURE,
    EXIT_OFF,
    EXIT_SUCCESS,
    POLL_INTERVAL,
    VERSION,
    PowerState,
    metadata_xml,
    parse_argv,
    parse_stdin,
    usage,
)
from controller.cli.fence_options import FenceError as FenceError
from controller.cli.fence_options import Options as Options
from controller.cli.fence_options import options_from as options_from
from controller.ha.guest_requests import (
    USER_PREFIX,
    GuestAction,
    GuestResult,
    encode_request,
    new_request,
    parse_result,
    parse_status,
)
from controller.ha.requests import RequestFormatError
from controller.runtime import (
    layout_keys,
    quiet_grpc,  # noqa: F401  (first: before gRPC loads)
)
from controller.runtime.config import ConfigError, resolve
from controller.runtime.store import Delete, KeyCompare, Store, StoreError

log = logging.getLogger("fence_kvmctl")


# -- asking kvmctl's controller --------------------------------------------------------------


def cluster_of(option: str | None, user: str | None) -> str:
    """The guest cluster: the `guest_cluster` option, else the certificate's `fence-C` user.

    When both name one, they must agree: a request under another cluster's keys would only be
    refused by etcd, after a fence that looked configured.
    """
    from_certificate = (
        user.removeprefix(USER_PREFIX) if user and user.startswith(USER_PREFIX) else None
    )
    if option is not None and from_certificate is not None and option != from_certificate:
        raise FenceError(
            f"guest_cluster {option!r} does not match the client certificate "
            f"(user {user}, guest cluster {from_certificate!r})"
        )
    cluster = option or from_certificate
    if cluster is None:
        raise FenceError(
            "no guest cluster: give guest_cluster=NAME or a client certificate for user "
            f"{USER_PREFIX}NAME"
        )
    return cluster


class Fencer:
    """One guest cluster's requests to kvmctl's controller, and the power states it publishes."""

    def __init__(self, store: Store, cluster: str) -> None:
        self.store = store
        self.cluster = cluster

    def _key(self, relative: str) -> str:
        return layout_keys.absolute(self.store.prefix, relative)

    async def _get(self, key: str) -> bytes | None:
        kv = await self.store.keys.get(key)
        return None if kv is None else kv.value

    async def power(self, name: str, action: GuestAction, timeout: float) -> None:
        """Ask for `action` and wait for the answer; FenceError unless it was carried out."""
        request = new_request(action, timeout)
        key = self._key(layout_keys.guest_fence_request(self.cluster, name))
        raw = encode_request(request)
        await self.store.keys.put(key, raw)
        log.info("%s: asked kvmctl for %s (request %s)", name, action, request.id)
        result = await self._answer(name, request.id, timeout + ANSWER_MARGIN)
        if result is None:
            await self.store.keys.transaction(
                [KeyCompare.value(key, raw)], [Delete(key)], action="delete"
            )
            raise FenceError(
                f"{name}: no answer from kvmctl's controller within {timeout + ANSWER_MARGIN:g} s "
                "(request withdrawn; is a controller leading?)"
            )
        if result.state != action:
            raise FenceError(f"{name}: {action} {result.state}: {result.message}")

    async def _answer(self, name: str, request_id: str, timeout: float) -> GuestResult | None:
        key = self._key(layout_keys.guest_fence_result(self.cluster, name))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            value = await self._get(key)
            if value is not None:
                try:
                    result = parse_result(key, value)
                except RequestFormatError as error:
                    raise FenceError(str(error)) from None
                if result.id == request_id:
                    return result
            await asyncio.sleep(POLL_INTERVAL)
        return None

    async def status(self, name: str) -> PowerState:
        key = self._key(layout_keys.guest_power_state(self.cluster, name))
        value = await self._get(key)
        if value is None:
            raise FenceError(
                f"VirtualMachine {name} is not in guest cluster {self.cluster} "
                "(or kvmctl's controller has not published its power state)"
            )
        try:
            status = parse_status(key, value)
        except RequestFormatError as error:
            raise FenceError(str(error)) from None
        if status.state == "unknown":
            raise FenceError(f"power state of {name} unknown: {status.message}")
        return status.state

    async def list(self) -> list[tuple[str, str]]:
        """(VM, published state) of every VM of the guest cluster, by name."""
        prefix = self._key(layout_keys.guest_power_states(self.cluster))
        reply = await self.store.keys.get_prefix(prefix)
        listed = []
        for kv in reply:
            key = kv.key.decode(errors="replace")
            try:
                listed.append((key[len(prefix) :], parse_status(key, kv.value).state))
            except RequestFormatError as error:
                raise FenceError(str(error)) from None
        return sorted(listed)


# -- running an action -----------------------------------------------------------------------


async def run(options: Options, out: TextIO) -> int:
    """Carry out `options.action` against etcd; the exit code."""
    try:
        settings = resolve(
            etcd=options.etcd,
            prefix=options.prefix,
            cacert=options.cacert,
            cert=options.cert,
            key=options.key,
        )
    except ConfigError as error:
        raise FenceError(str(error)) from None
    async with settings.store() as store:
        fencer = Fencer(store, cluster_of(options.guest_cluster, store.user))
        if options.action in ("off", "reboot") and options.delay:
            log.info("waiting %g s before fencing", options.delay)
            await asyncio.sleep(options.delay)
        return await _act(fencer, options, out)


async def _act(fencer: Fencer, options: Options, out: TextIO) -> int:
    action, plug, timeout = options.action, options.plug, options.power_timeout
    if action in ("list", "list-status"):
        for name, state in await fencer.list():
            suffix = f",{state.upper()}" if action == "list-status" else ""
            print(f"{name},{suffix}", file=out)
        return EXIT_SUCCESS
    if action == "monitor":
        await fencer.list()  # etcd answers, and this credential reads its cluster's states
        return EXIT_SUCCESS
    assert plug is not None  # options_from requires it for the remaining actions
    if action == "status":
        state = await fencer.status(plug)
        print(f"Status: {state.upper()}", file=out)
        return EXIT_SUCCESS if state == "on" else EXIT_OFF
    if action == "on":
        await fencer.power(plug, "on", timeout)
        print("Success: Powered ON", file=out)
        return EXIT_SUCCESS
    await fencer.power(plug, "off", timeout)  # also when it looks off: pin runState at stopped
    if action == "off":
        print("Success: Powered OFF", file=out)
        return EXIT_SUCCESS
    try:
        await fencer.power(plug, "on", timeout)
    except FenceError as error:  # fenced all the same: off was confirmed
        log.error("reboot of %s: powered off, but not on again: %s", plug, error)
    print("Success: Rebooted", file=out)
    return EXIT_SUCCESS


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> int:
    """Entry point: options from the command line, or from stdin when there are none."""
    argv = sys.argv[1:] if argv is None else argv
    out = out or sys.stdout
    try:
        values = parse_argv(argv) if argv else parse_stdin((stdin or sys.stdin).read())
        options = options_from(values)
    except FenceError as error:
        print(f"Failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.WARNING,
        format=f"%(asctime)s {AGENT_NAME} %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if options.help:
        print(usage(), end="", file=out)
        return EXIT_SUCCESS
    if options.version:
        print(VERSION, file=out)
        return EXIT_SUCCESS
    if options.action == "metadata":
        print(metadata_xml(), end="", file=out)
        return EXIT_SUCCESS
    if options.action == "validate-all":
        return EXIT_SUCCESS
    try:
        return asyncio.run(run(options, out))
    except (FenceError, StoreError) as error:
        print(f"Failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
