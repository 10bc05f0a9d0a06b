"""What a fence agent may be run with: the admin's allow-list and the agent's own `-o metadata`.

Fence devices come from ClusterNodes, which manifest authors write, and the controller runs them
as root. So nothing a device says may choose what runs:

- the agent must be on the controller's allow-list (`kvmctl controller --fence-agents`, set by
  whoever runs the controller: the admin); `fence_manual` stands for `kvmctl fence ack` and is
  never run;
- every parameter must be one the agent declares in its metadata, with a value of the declared
  type; `action`, `help`, `usage` and `version` are kvmctl's to choose;
- exec-like parameters (a program, script, file or shell options to use: `ssh_path`,
  `password_script`, `ssh_options`, `debug_file`, `cmd_prompt`...: by name, by the metadata's
  `[path]`-style placeholder or by its description) are refused unless the admin allowed that
  exact agent and parameter (`--fence-allow-parameter fence_virsh:identity_file`);
- plain values are single words of `A-Z a-z 0-9 . _ : @ / % + , = [ ] -`, not starting with `-`:
  many agents paste values into a command line split on spaces, and ssh takes `-o...` as options;
- no value, secrets included, carries a control character or line break: the agent reads
  `key=value` lines on stdin.

`FencePolicy.invocation` applies all of it; it is the only way the runner builds an agent's argv
and standard input.
"""

from __future__ import annotations

import difflib
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

from crds.fence_syntax import (
    AGENT_NAME,
    PARAMETER_NAME,
    RESERVED_PARAMETERS,
    plain_value_problem,
    value_problem,
)

FenceAction = Literal["off", "on", "reboot", "status", "monitor", "list", "metadata"]
FENCE_ACTIONS: frozenset[str] = frozenset(get_args(FenceAction))

REDACTED = "[redacted]"

DEFAULT_AGENTS: frozenset[str] = frozenset(
    {
        "fence_apc",
        "fence_apc_snmp",
        "fence_bladecenter",
        "fence_cisco_ucs",
        "fence_drac5",
        "fence_eaton_snmp",
        "fence_hpblade",
        "fence_ibmblade",
        "fence_idrac",
        "fence_ilo",
        "fence_ilo2",
        "fence_ilo3",
        "fence_ilo3_ssh",
        "fence_ilo4",
        "fence_ilo4_ssh",
        "fence_ilo5",
        "fence_ilo5_ssh",
        "fence_ilo_moonshot",
        "fence_ilo_mp",
        "fence_ilo_ssh",
        "fence_imm",
        "fence_ipdu",
        "fence_ipmilan",
        "fence_ipmilanplus",
        "fence_redfish",
        "fence_rsa",
        "fence_virsh",
        "fence_wti",
        "fence_xvm",
    }
)
"""Power fencing through BMCs, blade centers and PDUs. Not fence_dummy (tests only: allow it
explicitly), nor agents that run local programs or cloud CLIs by design."""
MANUAL_AGENTS: frozenset[str] = frozenset({"fence_manual", "fence_ack_manual"})
"""Stand for the operator's `kvmctl fence ack NODE`: accepted, never run."""
EXEC_LIKE_NAME = re.compile(
    r".*_(path|cmd|command|script|file|options|prompt)"
    r"|exec|runonfail|runonwarn|openrc|kubeconfig|debug|logfile"
)
"""Parameter names that say a program, script, file or shell options to use (`fullmatch`)."""
_EXEC_LIKE_PLACEHOLDER = re.compile(
    r"=\[?(path|script|command|file|filename|debugfile|options|prompt|openrc|kubeconfig)\]?\s*$"
)
_EXEC_LIKE_DESCRIPTION = re.compile(
    r"\b(binary|script to run|command to execute|path to|to (given )?file|file path)\b",
    re.IGNORECASE,
)
_BOOLEAN_VALUES = frozenset({"0", "1", "yes", "no", "on", "off", "true", "false"})


class FenceConfigError(ValueError):
    """A fence device or action that can never work as written (a user error, not an outage)."""


def check_action(action: str) -> None:
    if action not in FENCE_ACTIONS:
        raise FenceConfigError(
            f"fence action {action!r} is unknown: use one of {', '.join(sorted(FENCE_ACTIONS))}"
        )


def _check_parameter(agent: str, name: str, value: str, *, secret: bool) -> None:
    where = f"fence device {agent}, parameter {name!r}"
    if not PARAMETER_NAME.fullmatch(name):
        raise FenceConfigError(f"{where}: names are lower-case letters, digits and '_'")
    if name in RESERVED_PARAMETERS:
        raise FenceConfigError(f"{where}: chosen per call by kvmctl, not set on the device")
    problem = value_problem(value)
    if problem:
        shown = "the secret value" if secret else f"value {value!r}"
        raise FenceConfigError(f"{where}: {shown} {problem}")


@dataclass(frozen=True)
class FenceDevice:
    """One fence device: an agent from fence-agents and the parameters it is run with.

    `secret_parameters` (passwords) never appear in repr(), str(), logs or errors.
    """

    agent: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    secret_parameters: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not AGENT_NAME.fullmatch(self.agent):
            raise FenceConfigError(
                f"fence agent name {self.agent!r} is invalid: expected fence_<name> "
                "(lower-case letters, digits, '_'), not a path or a command"
            )
        for name, value in self.parameters.items():
            _check_parameter(self.agent, name, value, secret=False)
        for name, value in self.secret_parameters.items():
            _check_parameter(self.agent, name, value, secret=True)
        both = sorted(self.parameters.keys() & self.secret_parameters.keys())
        if both:
            raise FenceConfigError(
                f"fence device {self.agent}: parameter {both[0]!r} is given both as a plain "
                "and as a secret parameter"
            )
        # Read-only private copies: later changes cannot bypass the checks above.
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))
        object.__setattr__(
            self, "secret_parameters", MappingProxyType(dict(self.secret_parameters))
        )

    def __repr__(self) -> str:
        secrets = {name: REDACTED for name in self.secret_parameters}
        return (
            f"FenceDevice(agent={self.agent!r}, parameters={dict(self.parameters)!r}, "
            f"secret_parameters={secrets!r})"
        )

    __str__ = __repr__

    def redact(self, text: str) -> str:
        """`text` with every secret value replaced by [redacted]."""
        for value in sorted(self.secret_parameters.values(), key=len, reverse=True):
            if value:
                text = text.replace(value, REDACTED)
        return text

    def stdin_lines(self, action: FenceAction) -> bytes:
        """The agent's standard input for `action`."""
        lines = [f"action={action}"]
        lines += [f"{name}={value}" for name, value in self.parameters.items()]
        lines += [f"{name}={value}" for name, value in self.secret_parameters.items()]
        return "".join(f"{line}\n" for line in lines).encode()


@dataclass(frozen=True)
class AgentParameter:
    """One parameter from an agent's `-o metadata`."""

    name: str
    required: bool
    type: str
    default: str | None = None
    choices: tuple[str, ...] = ()
    deprecated: bool = False
    obsoletes: str | None = None
    description: str = ""
    getopt: str = ""
    """The command-line form, e.g. `--ssh-path=[path]`; aliases of one option share it."""

    @property
    def names_something_to_run(self) -> bool:
        """Whether the metadata says this is a program, script, file or options to use."""
        return bool(
            EXEC_LIKE_NAME.fullmatch(self.name)
            or _EXEC_LIKE_PLACEHOLDER.search(self.getopt)
            or _EXEC_LIKE_DESCRIPTION.search(self.description)
        )


@dataclass(frozen=True)
class AgentMetadata:
    """An agent's self-description: its parameters and the actions it supports."""

    agent: str
    description: str
    parameters: Mapping[str, AgentParameter]
    actions: frozenset[str]

    @classmethod
    def from_xml(cls, agent: str, xml_text: str) -> AgentMetadata:
        try:
            root = ElementTree.fromstring(xml_text)
        except ElementTree.ParseError as error:
            raise FenceConfigError(f"fence agent {agent}: unreadable metadata: {error}") from None
        parameters: dict[str, AgentParameter] = {}
        for element in root.iterfind("parameters/parameter"):
            content = element.find("content")
            getopt = element.find("getopt")
            name = element.get("name", "")
            parameters[name] = AgentParameter(
                name=name,
                required=element.get("required") == "1",
                type=content.get("type", "string") if content is not None else "string",
                default=content.get("default") if content is not None else None,
                choices=tuple(
                    option.get("value", "")
                    for option in (content.iterfind("option") if content is not None else ())
                ),
                deprecated=element.get("deprecated") == "1",
                obsoletes=element.get("obsoletes"),
                description=(element.findtext("shortdesc") or "").strip(),
                getopt=getopt.get("mixed", "") if getopt is not None else "",
            )
        actions = frozenset(action.get("name", "") for action in root.iterfind("actions/action"))
        return cls(
            agent=agent,
            description=root.get("shortdesc", ""),
            parameters=parameters,
            actions=actions,
        )

    def exec_like(self, name: str) -> bool:
        """Whether parameter `name`, or any alias of the same option, names something to run."""
        parameter = self.parameters.get(name)
        if parameter is None:
            return bool(EXEC_LIKE_NAME.fullmatch(name))
        return any(
            other.names_something_to_run
            for other in self.parameters.values()
            if other is parameter or (parameter.getopt and other.getopt == parameter.getopt)
        )

    def is_given(self, parameter: AgentParameter, given: Mapping[str, str]) -> bool:
        aliases = {parameter.name}
        if parameter.obsoletes:
            aliases.add(parameter.obsoletes)
        aliases |= {p.name for p in self.parameters.values() if p.obsoletes == parameter.name}
        return any(alias in given for alias in aliases)


def _type_problem(parameter: AgentParameter, value: str) -> str | None:
    """Why `value` does not fit `parameter`'s declared type, or None."""
    if parameter.type == "boolean" and value.lower() not in _BOOLEAN_VALUES:
        return "is not a boolean (use 1 or 0)"
    if parameter.type == "integer" and not re.fullmatch(r"-?[0-9]+", value):
        return "is not an integer"
    if parameter.type == "second" and not re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        return "is not a number of seconds"
    if parameter.type == "select" and parameter.choices and value not in parameter.choices:
        return f"is not one of {', '.join(parameter.choices)}"
    return None


@dataclass(frozen=True)
class Invocation:
    """Exactly what the runner executes: `argv` (the agent, no arguments) fed `stdin`."""

    argv: tuple[str, ...]
    stdin: bytes = field(repr=False)


@dataclass(frozen=True)
class FencePolicy:
    """The controller's allow-lists: agents, and the (agent, parameter) exec-like pairs allowed."""

    agents: frozenset[str] = DEFAULT_AGENTS
    allowed_parameters: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def from_settings(cls, agents: Iterable[str], allowed_parameters: Iterable[str]) -> FencePolicy:
        """From `--fence-agents` names (`default` = DEFAULT_AGENTS) and `AGENT:PARAMETER` pairs."""
        names: set[str] = set()
        for agent in agents:
            if agent == "default":
                names |= DEFAULT_AGENTS
            elif AGENT_NAME.fullmatch(agent) and agent not in MANUAL_AGENTS:
                names.add(agent)
            else:
                raise ValueError(f"fence agent {agent!r} is not an agent name (fence_<name>)")
        pairs: set[tuple[str, str]] = set()
        for pair in allowed_parameters:
            agent, _, name = pair.partition(":")
            if not (AGENT_NAME.fullmatch(agent) and PARAMETER_NAME.fullmatch(name)):
                raise ValueError(f"allowed fence parameter {pair!r}: expected AGENT:PARAMETER")
            pairs.add((agent, name))
        return cls(frozenset(names), frozenset(pairs))

    def check_agent(self, agent: str) -> None:
        """FenceConfigError unless this controller may run `agent` at all."""
        if agent in MANUAL_AGENTS:
            raise FenceConfigError(
                f"{agent} is not run: it stands for a manual acknowledgement; once the node is "
                "off, run `kvmctl fence ack NODE`"
            )
        if agent not in self.agents:
            raise FenceConfigError(
                f"fence agent {agent} is not on this controller's allow-list "
                f"(an admin adds it with `kvmctl controller --fence-agents default,{agent}`)"
            )

    def check(self, metadata: AgentMetadata, device: FenceDevice) -> None:
        """FenceConfigError naming the first thing about `device` this policy refuses."""
        self.check_agent(device.agent)
        given = {**device.parameters, **device.secret_parameters}
        for name, value in given.items():
            where = f"fence device {device.agent}, parameter {name!r}"
            parameter = metadata.parameters.get(name)
            if parameter is None:
                close = difflib.get_close_matches(name, list(metadata.parameters), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise FenceConfigError(f"{where}: unknown to {device.agent}{hint}")
            if metadata.exec_like(name) and (device.agent, name) not in self.allowed_parameters:
                raise FenceConfigError(
                    f"{where}: names a program, script, file or options for the agent to use, "
                    "which a ClusterNode may not choose (an admin may allow it with "
                    f"`kvmctl controller --fence-allow-parameter {device.agent}:{name}`)"
                )
            secret = name in device.secret_parameters
            problem = None if secret else plain_value_problem(value)
            if problem:
                raise FenceConfigError(f"{where}: value {value!r} {problem}")
            problem = _type_problem(parameter, value)
            if problem:
                shown = "the secret value" if secret else repr(value)
                raise FenceConfigError(f"{where}: {shown} {problem}")
        for parameter in metadata.parameters.values():
            if (
                parameter.required
                and parameter.name not in RESERVED_PARAMETERS
                and not metadata.is_given(parameter, given)
            ):
                raise FenceConfigError(
                    f"fence device {device.agent}: required parameter {parameter.name!r} is missing"
                )

    def invocation(
        self, metadata: AgentMetadata, device: FenceDevice, action: FenceAction, agent_dir: Path
    ) -> Invocation:
        """The argv and stdin that run `action` on `device`, or FenceConfigError."""
        check_action(action)
        if metadata.agent != device.agent:
            raise FenceConfigError(f"metadata of {metadata.agent} given for {device.agent}")
        self.check(metadata, device)
        return Invocation((str(agent_dir / device.agent),), device.stdin_lines(action))
