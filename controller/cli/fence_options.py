"""fence_kvmctl's side of the fence-agent protocol: its options (stdin `key=value` lines or a
command line), checked into `Options`, and the metadata XML and usage text describing them.
The agent itself (controller/cli/fence_kvmctl.py) acts on the `Options`.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from crds.meta import ObjectMeta

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
