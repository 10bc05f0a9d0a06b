"""Run fence agents (Debian fence-agents: fence_ipmilan, fence_dummy...) by their standard protocol.

The agent gets `key=value` lines on stdin (`action=...` plus the device's parameters) and answers
with its exit code: 0 success (or "on" for `status`), 2 "off" for `status`, 1 failure.
Secrets (passwords) only ever travel on the agent's stdin; they are redacted from every message,
log line, exception and repr this module produces, the agent's own stderr included.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import os
import re
import signal
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

log = logging.getLogger(__name__)

FenceAction = Literal["off", "on", "reboot", "status", "monitor", "list", "metadata"]
FENCE_ACTIONS: frozenset[str] = frozenset(get_args(FenceAction))

EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_STATUS_OFF = 2

AGENT_DIR = Path("/usr/sbin")
REDACTED = "[redacted]"
MESSAGE_LIMIT = 300

_AGENT_NAME = re.compile(r"fence_[a-z0-9_]+")
_PARAMETER_NAME = re.compile(r"[a-z][a-z0-9_]*")
_FORBIDDEN_CHARACTERS = ("\n", "\r", "\0")
_BOOLEAN_VALUES = frozenset({"0", "1", "yes", "no", "on", "off", "true", "false"})
# fencing.py log lines look like "2024-01-01 10:00:00,123 ERROR: Failed: ..." or "ERROR:root:...".
_PROBLEM_LEVELS = ("ERROR", "CRITICAL", "WARNING")
_LOG_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )?(?P<level>[A-Z]+)(:root)?: ?")


class FenceConfigError(ValueError):
    """A fence device or action that can never work as written (a user error, not an outage)."""


def _check_parameter(agent: str, name: str, value: str, *, secret: bool) -> None:
    where = f"fence device {agent}, parameter {name!r}"
    if not _PARAMETER_NAME.fullmatch(name):
        raise FenceConfigError(f"{where}: names are lower-case letters, digits and '_'")
    if name == "action":
        raise FenceConfigError(f"{where}: the action is chosen per call, not set on the device")
    shown = "the secret value" if secret else f"value {value!r}"
    if any(character in value for character in _FORBIDDEN_CHARACTERS):
        raise FenceConfigError(
            f"{where}: {shown} contains a newline, carriage return or NUL, which would inject "
            "extra lines into the agent's input"
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise FenceConfigError(
            f"{where}: {shown} contains a lone surrogate, which cannot be sent as UTF-8"
        ) from None
    if value != value.strip():
        raise FenceConfigError(
            f"{where}: {shown} has leading or trailing whitespace, which the agent would strip"
        )


@dataclass(frozen=True)
class FenceDevice:
    """One fence device: an agent from fence-agents and the parameters it is run with.

    `secret_parameters` (passwords) never appear in repr(), str(), logs or errors.
    """

    agent: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    secret_parameters: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not _AGENT_NAME.fullmatch(self.agent):
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
class FenceOutcome:
    """What one agent call (or an off-and-confirm sequence) came to.

    `exit_code` is the agent's (0 success/on, 2 off, 1 failure), None when the agent was killed
    after its timeout. `message` is short, redacted, and says what happened.
    """

    agent: str
    action: str
    exit_code: int | None
    message: str
    timed_out: bool = False

    @property
    def succeeded(self) -> bool:
        return self.exit_code == EXIT_SUCCESS

    @property
    def reports_off(self) -> bool:
        """A `status` call that says the power is off."""
        return self.exit_code == EXIT_STATUS_OFF


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
            )
        actions = frozenset(action.get("name", "") for action in root.iterfind("actions/action"))
        return cls(
            agent=agent,
            description=root.get("shortdesc", ""),
            parameters=parameters,
            actions=actions,
        )

    def validate(self, device: FenceDevice) -> None:
        """Raise FenceConfigError naming the first parameter of `device` this agent rejects."""
        given = {**device.parameters, **device.secret_parameters}
        for name, value in given.items():
            parameter = self.parameters.get(name)
            where = f"fence device {self.agent}, parameter {name!r}"
            if parameter is None:
                close = difflib.get_close_matches(name, list(self.parameters), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise FenceConfigError(f"{where}: unknown to {self.agent}{hint}")
            shown = "the secret value" if name in device.secret_parameters else repr(value)
            problem = _type_problem(parameter, value)
            if problem:
                raise FenceConfigError(f"{where}: {shown} {problem}")
        for parameter in self.parameters.values():
            if (
                parameter.required
                and parameter.name != "action"
                and not self._given(parameter, given)
            ):
                raise FenceConfigError(
                    f"fence device {self.agent}: required parameter {parameter.name!r} is missing"
                )

    def _given(self, parameter: AgentParameter, given: Mapping[str, str]) -> bool:
        aliases = {parameter.name}
        if parameter.obsoletes:
            aliases.add(parameter.obsoletes)
        aliases |= {p.name for p in self.parameters.values() if p.obsoletes == parameter.name}
        return any(alias in given for alias in aliases)


def _type_problem(parameter: AgentParameter, value: str) -> str | None:
    """Why `value` does not fit `parameter`'s declared type, or None."""
    if parameter.type == "boolean" and value.lower() not in _BOOLEAN_VALUES:
        return "is not a boolean (use 1 or 0)"
    if parameter.type == "integer" and not re.fullmatch(r"-?\d+", value):
        return "is not an integer"
    if parameter.type == "second":
        try:
            float(value)
        except ValueError:
            return "is not a number of seconds"
    if parameter.type == "select" and parameter.choices and value not in parameter.choices:
        return f"is not one of {', '.join(parameter.choices)}"
    return None


def _summarize(device: FenceDevice, exit_code: int, stdout: bytes, stderr: bytes) -> str:
    """A short, redacted message from the agent's output.

    A failure is explained by the agent's errors and warnings (fencing.py logs them on stderr),
    anything else by its answer on stdout ("Status: OFF", "Success: Powered OFF").
    """
    problems: list[str] = []
    others: list[str] = []
    for raw in stderr.decode(errors="replace").splitlines():
        line = raw.strip()
        match = _LOG_PREFIX.match(line)
        text = line[match.end() :] if match else line
        if not text or "DeprecationWarning" in text or text.startswith("from "):
            continue
        is_problem = match is not None and match.group("level") in _PROBLEM_LEVELS
        bucket = problems if is_problem else others
        if text not in bucket:
            bucket.append(text)
    answer = [line.strip() for line in stdout.decode(errors="replace").splitlines() if line.strip()]
    preference = (problems, others, answer) if exit_code == EXIT_FAILURE else (answer, problems)
    chosen = next((lines for lines in preference if lines), [])
    message = device.redact("; ".join(chosen) or f"exit code {exit_code}")
    if len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 3] + "..."
    return message


class FenceRunner:
    """Runs fence agents from `agent_dir` as asyncio subprocesses, one call at a time per call."""

    def __init__(self, agent_dir: Path = AGENT_DIR) -> None:
        self._agent_dir = agent_dir
        self._metadata: dict[str, AgentMetadata] = {}

    def agent_path(self, agent: str) -> Path:
        """The agent's executable; FenceConfigError if the name is invalid or it is missing."""
        if not _AGENT_NAME.fullmatch(agent):
            raise FenceConfigError(f"fence agent name {agent!r} is invalid: expected fence_<name>")
        path = self._agent_dir / agent
        if not os.access(path, os.X_OK):
            raise FenceConfigError(
                f"fence agent {agent} not found in {self._agent_dir} (is fence-agents installed?)"
            )
        return path

    async def run(self, device: FenceDevice, action: FenceAction, timeout: float) -> FenceOutcome:
        """Run `action` on `device`; the agent is killed if it is not done after `timeout` s."""
        if action not in FENCE_ACTIONS:
            raise FenceConfigError(
                f"fence action {action!r} is unknown: use one of {', '.join(sorted(FENCE_ACTIONS))}"
            )
        path = self.agent_path(device.agent)
        process = await asyncio.create_subprocess_exec(
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LANG": "C", "LC_ALL": "C"},
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout):
                stdout, stderr = await process.communicate(device.stdin_lines(action))
        except TimeoutError:
            await _kill_process_group(process)
            outcome = FenceOutcome(
                agent=device.agent,
                action=action,
                exit_code=None,
                message=f"{device.agent} {action} timed out after {timeout:g} s; agent killed",
                timed_out=True,
            )
        except BaseException:
            await _kill_process_group(process)
            raise
        else:
            exit_code = process.returncode
            assert exit_code is not None
            outcome = FenceOutcome(
                agent=device.agent,
                action=action,
                exit_code=exit_code,
                message=_summarize(device, exit_code, stdout, stderr),
            )
        log.info(
            "fence agent %s action %s: exit %s: %s",
            outcome.agent,
            outcome.action,
            outcome.exit_code,
            outcome.message,
        )
        return outcome

    async def status(self, device: FenceDevice, timeout: float) -> FenceOutcome:
        """Exit 0 means on, 2 means off, anything else (or a timeout) means unknown."""
        return await self.run(device, "status", timeout)

    async def on(self, device: FenceDevice, timeout: float) -> FenceOutcome:
        return await self.run(device, "on", timeout)

    async def power_off_and_confirm(self, device: FenceDevice, timeout: float) -> FenceOutcome:
        """Power off, then require `status` to report off; both within `timeout` seconds.

        Succeeds (exit code 0) only when the device confirmed the power is off. Agents that
        sleep after `off` before checking (`power_wait`, 2 s for fence_ipmilan) are told not to
        unless the device sets it: the confirming `status` call is ours, so the sleep only delays
        recovery.
        """
        deadline = time.monotonic() + timeout
        device = await self._without_power_wait(device, timeout)
        off = await self.run(device, "off", timeout)
        if not off.succeeded:
            return off
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return FenceOutcome(
                agent=device.agent,
                action="off",
                exit_code=None,
                message=f"{device.agent} off succeeded but no time was left to confirm it",
                timed_out=True,
            )
        status = await self.run(device, "status", remaining)
        if status.reports_off:
            return FenceOutcome(
                agent=device.agent,
                action="off",
                exit_code=EXIT_SUCCESS,
                message=f"powered off, confirmed by status ({status.message})",
            )
        return FenceOutcome(
            agent=device.agent,
            action="off",
            exit_code=EXIT_FAILURE if status.exit_code is not None else None,
            message=f"off reported success but status did not confirm off: {status.message}",
            timed_out=status.timed_out,
        )

    async def _without_power_wait(self, device: FenceDevice, timeout: float) -> FenceDevice:
        if "power_wait" in device.parameters or "power_wait" in device.secret_parameters:
            return device
        try:
            known = await self.metadata(device.agent, timeout)
        except (FenceConfigError, TimeoutError):
            return device  # the `off` below reports what is wrong with the agent
        if "power_wait" not in known.parameters:
            return device
        return FenceDevice(
            device.agent, {**device.parameters, "power_wait": "0"}, device.secret_parameters
        )

    async def metadata(self, agent: str, timeout: float = 30.0) -> AgentMetadata:
        """The agent's parameters and actions from `-o metadata` (cached per agent)."""
        if agent not in self._metadata:
            path = self.agent_path(agent)
            process = await asyncio.create_subprocess_exec(
                str(path),
                "-o",
                "metadata",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            try:
                async with asyncio.timeout(timeout):
                    stdout, stderr = await process.communicate()
            except TimeoutError:
                await _kill_process_group(process)
                raise TimeoutError(
                    f"fence agent {agent}: -o metadata did not answer within {timeout:g} s"
                ) from None
            except BaseException:
                await _kill_process_group(process)
                raise
            if process.returncode != EXIT_SUCCESS:
                message = stderr.decode(errors="replace").strip()[-MESSAGE_LIMIT:]
                raise FenceConfigError(
                    f"fence agent {agent}: -o metadata exited {process.returncode}: {message}"
                )
            self._metadata[agent] = AgentMetadata.from_xml(agent, stdout.decode())
        return self._metadata[agent]

    async def validate(self, device: FenceDevice) -> None:
        """Raise FenceConfigError if the agent does not accept the device's parameters."""
        (await self.metadata(device.agent)).validate(device)


async def _kill_process_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the agent and its helpers (ipmitool...): the session it leads, by its PID."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
