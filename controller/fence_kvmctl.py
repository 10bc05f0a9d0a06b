"""fence_kvmctl: a fence agent for clusters running inside kvmctl VirtualMachines.

It speaks the standard fence-agent protocol (the one of Debian's `fence-agents`, used by
Pacemaker's stonithd and by rgmanager): options as `key=value` lines on stdin when there are no
command-line arguments, else as options (`-o off -n vm1 --etcd 10.0.0.1:2379`); `-o metadata`
prints the agent's XML description. Exit codes: 0 success (and "on" for `status`), 2 "off" for
`status`, 1 failure. The plug is the VirtualMachine's name; it is reached through etcd, wherever
the VM runs.

- off: `spec.runState: stopped` (a `disabled` VM stays disabled) with
  `spec.shutdownTimeoutSeconds: 0`, so the host agent destroys the domain at once instead of
  asking the guest to shut down; the timeout it replaced is kept in the annotation
  `fence.kvmctl.io/shutdown-timeout-seconds`. Then it waits until the VM is confirmed off:
  the agent of its host wrote it Stopped (or Crashed) in its status, or listed the domains
  running there without it after the request (`{prefix}/reports/{node}`: the HA controller
  unplaces a stopped VM, and the agent writes no status for a VM placed elsewhere), or it never
  ran, or kvmctl fenced the host it last ran on and placed it nowhere else.
- on: `runState: started` and the saved timeout restored, then wait until it runs.
- reboot: off, then on; success once off is confirmed (as fence-agents do).
- status: "on" when the VM runs (Running, Paused, Migrating), "off" as above, else a failure.
- list / list-status: every VirtualMachine; monitor: etcd answers; validate-all: options parse.

etcd credentials: read on `{prefix}/kinds/VirtualMachine/`, write on its `spec/` keys, read on
`{prefix}/kinds/ClusterNode/`, `{prefix}/reports/` and the `{prefix}/revision-probe` key
(docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

from controller import quiet_grpc  # noqa: F401  (first: before gRPC loads)
from controller.config import ConfigError, resolve
from controller.ha.requests import RequestFormatError, parse_report, report_key
from controller.store import Conflict, NotFound, Store, StoreError
from crds import ClusterNode, VirtualMachine
from crds.meta import ObjectMeta

log = logging.getLogger("fence_kvmctl")

AGENT_NAME = "fence_kvmctl"
VERSION = "0.1.0"
SAVED_TIMEOUT_ANNOTATION = "fence.kvmctl.io/shutdown-timeout-seconds"
"""The VM's own shutdownTimeoutSeconds while a fence `off` holds it at 0."""
POLL_INTERVAL = 0.25
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
    return Options(
        action=action,
        plug=plug,
        etcd=values.get("etcd") or None,
        prefix=values.get("prefix") or "/kvmctl",
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
        "through kvmctl's API in etcd. The plug is the VirtualMachine's name. Off destroys the "
        "domain at once (no guest shutdown) and waits until its host's agent confirms it."
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


# -- the VM's power state --------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """The stored VM and what kvmctl knows about the host it last ran on (`status.node`)."""

    vm: VirtualMachine
    host_health: str | None = None
    """That node's ClusterNode health; None if unknown."""
    report: tuple[int, frozenset[str]] | None = None
    """That node's agent report (`{prefix}/reports/{node}`): its etcd revision and the domains
    with a qemu process there; None if there is none."""


def power_state(seen: Observation, after: int) -> PowerState | None:
    """What kvmctl's records say about the VM's domain; None when they cannot tell.

    A VM reported running is off all the same when its host was fenced while it is placed
    elsewhere, or when its host's agent wrote a report after revision `after` without it
    (the agent does not write the status of a VM that is no longer placed on its node).
    """
    vm, status = seen.vm, seen.vm.status
    placed_on = status.placement.node if status.placement is not None else None
    if status.state in ("Running", "Paused", "Migrating"):
        if seen.host_health == "Fenced" and placed_on != status.node:
            return "off"
        if seen.report is not None:
            revision, domains = seen.report
            if revision > after and vm.metadata.name not in domains:
                return "off"
        return "on"
    if status.state in ("Stopped", "Crashed"):
        return "off"
    if placed_on is None and status.node is None:
        return "off"  # never placed, never seen running
    return None


def off_confirmed(seen: Observation, request: int, generation: int) -> bool:
    """Off, by a report that comes after our stop request (revision `request`, generation
    `generation`).

    The agent's Ready condition carries no observedGeneration yet; when it does, a report
    older than the request is not taken as a confirmation.
    """
    if seen.vm.spec.run_state == "started" or power_state(seen, request) != "off":
        return False
    ready = seen.vm.status.condition("Ready")
    observed = ready.observed_generation if ready is not None else None
    return observed is None or observed >= generation


def describe(vm: VirtualMachine) -> str:
    status = vm.status
    where = f" on {status.node}" if status.node else ""
    placed = status.placement.node if status.placement is not None else "nowhere"
    ready = status.condition("Ready")
    detail = f": {ready.message}" if ready is not None and ready.message else ""
    return f"state {status.state}{where}, placed {placed}{detail}"


def _revision(vm: VirtualMachine) -> int:
    return int(vm.metadata.resource_version or 0)


class Fencer:
    """The actions on one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def vm(self, name: str) -> VirtualMachine:
        try:
            obj = await self.store.get("VirtualMachine", name)
        except NotFound:
            raise FenceError(f"VirtualMachine {name!r} not found") from None
        assert isinstance(obj, VirtualMachine)
        return obj

    async def observe(self, vm: VirtualMachine) -> Observation:
        """`vm` with its last host's health and report; unreadable ones count as unknown."""
        node = vm.status.node
        if node is None:
            return Observation(vm)
        health = None
        try:
            obj = await self.store.get("ClusterNode", node)
            health = obj.status.health if isinstance(obj, ClusterNode) else None
        except StoreError as error:
            log.debug("cannot read ClusterNode %s: %s", node, error)
        report = None
        key = report_key(self.store.prefix, node)
        try:
            kv = await self.store.call(self.store.client.get(key.encode()))
            if kv is not None:
                report = (kv.mod_revision, parse_report(key, kv.value).domains)
        except (StoreError, RequestFormatError) as error:
            log.debug("cannot read the report of %s: %s", node, error)
        return Observation(vm, health, report)

    async def status(self, name: str) -> PowerState:
        vm = await self.vm(name)
        state = power_state(await self.observe(vm), _revision(vm))
        if state is None:
            raise FenceError(f"power state of {name} unknown: {describe(vm)}")
        return state

    async def power_off(self, name: str, timeout: float) -> None:
        before, vm = await self._write(name, _stop_now)
        # Nothing can start the VM after the revision from which it was unplaced (placement is
        # in the same key, written with compare-and-swap) or after our stop request.
        unplaced = before.status.placement is None
        request = _revision(before if unplaced else vm)
        generation = vm.metadata.generation or 0
        log.info("%s: asked for an immediate stop (revision %d)", name, _revision(vm))

        async def confirmed() -> bool:
            seen = await self.observe(await self.vm(name))
            return off_confirmed(seen, request, generation)

        await self._wait(name, confirmed, timeout, "confirmed off")

    async def power_on(self, name: str, timeout: float) -> None:
        await self._write(name, _start)

        async def running() -> bool:
            current = await self.vm(name)
            return current.spec.run_state == "started" and current.status.state == "Running"

        await self._wait(name, running, timeout, "running")

    async def list(self) -> list[VirtualMachine]:
        objects, _ = await self.store.list_objects("VirtualMachine")
        return [obj for obj in objects if isinstance(obj, VirtualMachine)]

    async def _write(
        self, name: str, change: Callable[[VirtualMachine], bool], attempts: int = 10
    ) -> tuple[VirtualMachine, VirtualMachine]:
        """Apply `change` to the VM's spec with compare-and-swap, re-reading on a conflict;
        the VM as read just before, and as written (the same when nothing changed)."""
        for _ in range(attempts):
            before = await self.vm(name)
            vm = before.model_copy(deep=True)
            if not change(vm):
                return before, before
            try:
                return before, await self.store.update(vm)
            except Conflict:
                log.debug("%s changed while writing it; reading it again", name)
        raise FenceError(f"VirtualMachine {name!r} kept changing; {attempts} writes conflicted")

    async def _wait(
        self, name: str, condition: Callable[[], Awaitable[bool]], timeout: float, what: str
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await condition():
            if loop.time() >= deadline:
                vm = await self.vm(name)
                raise FenceError(f"{name} not {what} within {timeout:g} s: {describe(vm)}")
            await asyncio.sleep(POLL_INTERVAL)


def _stop_now(vm: VirtualMachine) -> bool:
    """runState stopped (disabled stays) and no graceful shutdown; True if anything changed."""
    spec, annotations = vm.spec, vm.metadata.annotations
    if spec.run_state == "started":
        spec.run_state = "stopped"
    elif spec.shutdown_timeout_seconds == 0:
        return False
    if spec.shutdown_timeout_seconds != 0 and SAVED_TIMEOUT_ANNOTATION not in annotations:
        annotations[SAVED_TIMEOUT_ANNOTATION] = str(spec.shutdown_timeout_seconds)
    spec.shutdown_timeout_seconds = 0
    return True


def _start(vm: VirtualMachine) -> bool:
    """runState started and the saved shutdown timeout back; True if anything changed."""
    spec, annotations = vm.spec, vm.metadata.annotations
    saved = annotations.pop(SAVED_TIMEOUT_ANNOTATION, None)
    if spec.run_state == "started" and saved is None:
        return False
    spec.run_state = "started"
    if saved is not None and saved.isdigit():
        spec.shutdown_timeout_seconds = int(saved)
    return True


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
    if options.action in ("off", "reboot") and options.delay:
        log.info("waiting %g s before fencing", options.delay)
        await asyncio.sleep(options.delay)
    async with settings.store() as store:
        fencer = Fencer(store)
        return await _act(fencer, options, out)


async def _act(fencer: Fencer, options: Options, out: TextIO) -> int:
    action, plug, timeout = options.action, options.plug, options.power_timeout
    if action in ("list", "list-status"):
        for vm in await fencer.list():
            line = f"{vm.metadata.name},"
            if action == "list-status":
                state = power_state(await fencer.observe(vm), _revision(vm))
                line += f",{(state or 'unknown').upper()}"
            print(line, file=out)
        return EXIT_SUCCESS
    if action == "monitor":
        await fencer.store.revision()
        return EXIT_SUCCESS
    assert plug is not None  # options_from requires it for the remaining actions
    if action == "status":
        state = await fencer.status(plug)
        print(f"Status: {state.upper()}", file=out)
        return EXIT_SUCCESS if state == "on" else EXIT_OFF
    if action == "on":
        await fencer.power_on(plug, timeout)
        print("Success: Powered ON", file=out)
        return EXIT_SUCCESS
    await fencer.power_off(plug, timeout)  # also when it looks off: pin runState at stopped
    if action == "off":
        print("Success: Powered OFF", file=out)
        return EXIT_SUCCESS
    try:
        await fencer.power_on(plug, timeout)
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
