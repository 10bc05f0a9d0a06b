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

import argparse
import asyncio
import logging
import re
import sys
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

from controller.ha.guest_requests import (
    USER_PREFIX,
    GuestAction,
    GuestResult,
    encode_request,
    new_request,
    parse_result,
    parse_status,
    request_key,
    result_key,
    status_key,
    status_prefix,
)
from controller.ha.requests import RequestFormatError
from controller.runtime import quiet_grpc  # noqa: F401  (first: before gRPC loads)
from controller.runtime.config import ConfigError, resolve
from controller.runtime.store import Store, StoreError
from crds.meta import ObjectMeta

log = logging.getLogger("fence_kvmctl")

AGENT_NAME = "fence_kvmctl"
VERSION = "0.1.0"
POLL_INTERVAL = 0.25
ANSWER_MARGIN = 15.0
"""How much longer than power_timeout to wait for the controller's answer."""
EXIT_SUCCESS, EXIT_FAILURE, EXIT_OFF = 0, 1, 2

Action = Literal[
    "on", "off", "reboot", "status", "list", "list-status", "monitor", "metadata", "validate-all"
]
ACTIONS: tuple[Action, ...] = (
    "on",
    "off",
    "reboot",
    "status",
    "list",
    "list-status",
    "monitor",
    "metadata",
    "validate-all",
)
PLUG_ACTIONS = frozenset({"on", "off", "reboot", "status"})
IGNORED_STDIN_KEYS = frozenset({"nodename"})
"""Keys Pacemaker adds to every request; fence-agents ignore them too."""
PowerState = Literal["on", "off"]


class FenceError(Exception):
    """A failure with a message fit for the cluster's log (exit 1)."""


@dataclass(frozen=True)
class Parameter:
    """One option, as named on stdin (`name`) and on the command line (`long`, `short`)."""

    name: str
    long: str
    description: str
    content: Literal["string", "boolean", "second"] = "string"
    default: str | None = None
    short: str | None = None
    required: bool = False
    deprecated: bool = False
    obsoletes: str | None = None
    metavar: str = ""

    @property
    def getopt(self) -> str:
        value = f"={self.metavar}" if self.metavar else ""
        short = f"-{self.short}, " if self.short else ""
        return f"{short}--{self.long}{value}"


PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "action",
        "action",
        "Fencing action",
        default="reboot",
        short="o",
        required=True,
        metavar="[action]",
    ),
    Parameter(
        "plug",
        "plug",
        "Name of the VirtualMachine to fence",
        short="n",
        required=True,
        obsoletes="port",
        metavar="[name]",
    ),
    Parameter(
        "port",
        "plug",
        "Name of the VirtualMachine to fence",
        short="n",
        required=True,
        deprecated=True,
        metavar="[name]",
    ),
    Parameter(
        "etcd",
        "etcd",
        "etcd endpoints host:port, comma separated (default: KVMCTL_ETCD, the kvmctl config "
        "file, 127.0.0.1:2379)",
        metavar="[endpoints]",
    ),
    Parameter(
        "prefix", "prefix", "kvmctl's key prefix in etcd", default="/kvmctl", metavar="[prefix]"
    ),
    Parameter(
        "guest_cluster",
        "guest-cluster",
        "Guest cluster of the VMs (their fence.kvmctl.io/guest-cluster label; default: from the "
        "client certificate's user fence-NAME)",
        metavar="[name]",
    ),
    Parameter("cacert", "cacert", "CA certificate of etcd (TLS)", metavar="[file]"),
    Parameter("cert", "cert", "Client certificate for etcd (mutual TLS)", metavar="[file]"),
    Parameter("key", "key", "Client key for etcd (mutual TLS)", metavar="[file]"),
    Parameter(
        "power_timeout",
        "power-timeout",
        "Wait X seconds for the VM to be confirmed off or on",
        content="second",
        default="60",
        metavar="[seconds]",
    ),
    Parameter(
        "delay",
        "delay",
        "Wait X seconds before fencing is started",
        content="second",
        default="0",
        metavar="[seconds]",
    ),
    Parameter("verbose", "verbose", "Verbose mode", content="boolean", short="v"),
    Parameter(
        "version", "version", "Display version information and exit", content="boolean", short="V"
    ),
    Parameter("help", "help", "Display help and exit", content="boolean", short="h"),
)
_BY_NAME = {parameter.name: parameter for parameter in PARAMETERS}
_TRUE, _FALSE = ("1", "yes", "on", "true"), ("0", "no", "off", "false")


@dataclass(frozen=True)
class Options:
    action: Action
    plug: str | None
    etcd: str | None
    prefix: str
    guest_cluster: str | None
    cacert: str | None
    cert: str | None
    key: str | None
    power_timeout: float
    delay: float
    verbose: bool
    version: bool
    help: bool


# -- reading options -------------------------------------------------------------------------


_STDIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Control and format characters, surrogates (undecodable bytes), line and paragraph
separators: none belongs in a value, and each has split or hidden a line somewhere."""


def _stdin_line(number: int, raw: str) -> tuple[str, str] | None:
    """One stdin line's (parameter name, value); None for a blank line or a comment."""
    line = raw.removesuffix("\r").strip(" \t")
    if not line or line.startswith("#"):
        return None
    key, separator, value = line.partition("=")
    key, value = key.strip(" \t"), value.strip(" \t")
    if not separator:
        raise FenceError(f"stdin line {number}: expected key=value, got {line!r}")
    if not _STDIN_KEY.fullmatch(key):
        raise FenceError(f"stdin line {number}: {key!r} is not a parameter name")
    for character in value:
        if character != "\t" and unicodedata.category(character) in _REFUSED_CATEGORIES:
            raise FenceError(
                f"stdin line {number}: the value of {key} holds U+{ord(character):04X}, "
                "a control or line-break character"
            )
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return key.replace("-", "_"), value


def parse_stdin(text: str) -> dict[str, str]:
    """`key=value` lines keyed by parameter name; blank lines and `#` comments skipped.

    Lines end at `\\n` only (a trailing `\\r` is dropped): any other line break inside a
    line is a control character, refused, so no value can smuggle in another parameter. A
    parameter given twice (plug and its alias port count as one) and an unknown parameter are
    refused too: fence-agents' fencing.py ignores unknown ones, but a fence that runs with an
    option silently dropped could report a success it did not achieve.
    """
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        parsed = _stdin_line(number, raw)
        if parsed is None:
            continue
        name, value = parsed
        if name in IGNORED_STDIN_KEYS:
            continue
        if name not in _BY_NAME:
            raise FenceError(f"stdin line {number}: unknown parameter {name!r}")
        canonical = "plug" if name in ("plug", "port") else name
        if canonical in lines:
            raise FenceError(
                f"stdin line {number}: parameter {name} repeats line {lines[canonical]}"
            )
        lines[canonical] = number
        values[name] = value
    return values


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ArgumentError(message)


def parse_argv(argv: Sequence[str]) -> dict[str, str]:
    """Command-line options keyed by parameter name (deprecated aliases share an option)."""
    parser = _Parser(prog=AGENT_NAME, add_help=False, allow_abbrev=False)
    for parameter in PARAMETERS:
        if parameter.deprecated:
            continue
        flags = [f"--{parameter.long}"] + ([f"-{parameter.short}"] if parameter.short else [])
        if parameter.content == "boolean":
            parser.add_argument(*flags, dest=parameter.name, action="store_const", const="1")
        else:
            parser.add_argument(*flags, dest=parameter.name)
    try:
        namespace = parser.parse_args(list(argv))
    except _ArgumentError as error:
        raise FenceError(f"command line: {error}") from None
    return {name: value for name, value in vars(namespace).items() if value is not None}


def _seconds(values: dict[str, str], name: str) -> float:
    raw = values.get(name, _BY_NAME[name].default or "0")
    try:
        seconds = float(raw)
    except ValueError:
        raise FenceError(f"parameter {name}: {raw!r} is not a number of seconds") from None
    if not 0 <= seconds <= 86400:
        raise FenceError(f"parameter {name}: {raw!r} must be between 0 and 86400 seconds")
    return seconds


def _flag(values: dict[str, str], name: str) -> bool:
    raw = values.get(name, "0").lower()
    if raw not in _TRUE + _FALSE:
        raise FenceError(f"parameter {name}: {raw!r} is not a boolean (1/0, yes/no, on/off)")
    return raw in _TRUE


def options_from(values: dict[str, str]) -> Options:
    """Check the values and fill defaults; FenceError names the bad parameter."""
    action = values.get("action", "reboot").lower()
    if action not in ACTIONS:
        raise FenceError(f"parameter action: {action!r} is not one of {', '.join(ACTIONS)}")
    plug = values.get("plug") or values.get("port") or None
    asks_about_agent = _flag(values, "help") or _flag(values, "version")
    if plug is None and action in PLUG_ACTIONS and not asks_about_agent:
        raise FenceError(f"action {action} needs the VirtualMachine's name (plug=NAME or -n NAME)")
    if plug is not None:
        try:
            ObjectMeta(name=plug)
        except ValueError:
            raise FenceError(f"parameter plug: {plug!r} is not a VirtualMachine name") from None
    guest_cluster = values.get("guest_cluster") or None
    if guest_cluster is not None:
        try:
            ObjectMeta(name=guest_cluster)
        except ValueError:
            raise FenceError(
                f"parameter guest_cluster: {guest_cluster!r} is not a guest cluster name"
            ) from None
    return Options(
        action=action,
        plug=plug,
        etcd=values.get("etcd") or None,
        prefix=values.get("prefix") or "/kvmctl",
        guest_cluster=guest_cluster,
        cacert=values.get("cacert") or None,
        cert=values.get("cert") or None,
        key=values.get("key") or None,
        power_timeout=_seconds(values, "power_timeout"),
        delay=_seconds(values, "delay"),
        verbose=_flag(values, "verbose"),
        version=_flag(values, "version"),
        help=_flag(values, "help"),
    )


# -- metadata --------------------------------------------------------------------------------


def metadata_xml() -> str:
    """The agent's description in the fence-agents metadata format."""
    root = ET.Element(
        "resource-agent",
        name=AGENT_NAME,
        shortdesc="Fence agent for kvmctl VirtualMachines",
    )
    ET.SubElement(root, "longdesc").text = (
        "fence_kvmctl powers off, starts and queries a kvmctl VirtualMachine wherever it runs, "
        "through kvmctl's controller. The plug is the VirtualMachine's name; only the VMs of "
        "the agent's guest cluster can be fenced. Off destroys the domain at once (no guest "
        "shutdown) and waits until kvmctl confirms it."
    )
    ET.SubElement(root, "vendor-url").text = "https://github.com/kvmctl/kvmctl"
    parameters = ET.SubElement(root, "parameters")
    for parameter in PARAMETERS:
        attributes = {
            "name": parameter.name,
            "unique": "0",
            "required": "1" if parameter.required else "0",
        }
        if parameter.deprecated:
            attributes["deprecated"] = "1"
        if parameter.obsoletes:
            attributes["obsoletes"] = parameter.obsoletes
        element = ET.SubElement(parameters, "parameter", attributes)
        ET.SubElement(element, "getopt", mixed=parameter.getopt)
        content: dict[str, str] = {"type": parameter.content}
        if parameter.default is not None:
            content["default"] = parameter.default
        ET.SubElement(element, "content", content)
        ET.SubElement(element, "shortdesc", lang="en").text = parameter.description
    actions = ET.SubElement(root, "actions")
    for action in ACTIONS:
        attributes = {"name": action}
        if action == "on":
            attributes["automatic"] = "0"
        ET.SubElement(actions, "action", attributes)
    ET.indent(root, "\t")
    return '<?xml version="1.0" ?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def usage() -> str:
    lines = [f"Usage: {AGENT_NAME} [options]  (or key=value lines on stdin)", "Options:"]
    for parameter in PARAMETERS:
        if not parameter.deprecated:
            default = f" (default {parameter.default})" if parameter.default else ""
            lines.append(f"  {parameter.getopt:34} {parameter.description}{default}")
    lines.append(f"Actions: {', '.join(ACTIONS)}")
    return "\n".join(lines) + "\n"


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

    async def _get(self, key: str) -> bytes | None:
        kv = await self.store.call(self.store.client.get(key.encode()), key.encode())
        return None if kv is None else bytes(kv.value)

    async def power(self, name: str, action: GuestAction, timeout: float) -> None:
        """Ask for `action` and wait for the answer; FenceError unless it was carried out."""
        request = new_request(action, timeout)
        key = request_key(self.store.prefix, self.cluster, name)
        raw = encode_request(request)
        await self.store.call(self.store.client.put(key.encode(), raw), key.encode(), "write")
        log.info("%s: asked kvmctl for %s (request %s)", name, action, request.id)
        result = await self._answer(name, request.id, timeout + ANSWER_MARGIN)
        if result is None:
            txn = self.store.client.transactions
            withdraw = self.store.client.transaction(
                compare=[txn.value(key.encode()) == raw],
                success=[txn.delete(key.encode())],
                failure=[],
            )
            await self.store.call(withdraw, key.encode(), "delete")
            raise FenceError(
                f"{name}: no answer from kvmctl's controller within {timeout + ANSWER_MARGIN:g} s "
                "(request withdrawn; is a controller leading?)"
            )
        if result.state != action:
            raise FenceError(f"{name}: {action} {result.state}: {result.message}")

    async def _answer(self, name: str, request_id: str, timeout: float) -> GuestResult | None:
        key = result_key(self.store.prefix, self.cluster, name)
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
        key = status_key(self.store.prefix, self.cluster, name)
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
        prefix = status_prefix(self.store.prefix, self.cluster)
        reply = await self.store.call(
            self.store.client.get_prefix(prefix.encode()), prefix.encode()
        )
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
