"""Run fence agents (Debian fence-agents: fence_ipmilan, fence_dummy...) by their standard protocol.

The agent gets `key=value` lines on stdin (`action=...` plus the device's parameters) and answers
with its exit code: 0 success (or "on" for `status`), 2 "off" for `status`, 1 failure.
What may run, with which parameters, is the runner's `FencePolicy` (fence_policy.py): checked
here, right before anything executes, against the agent's own `-o metadata`.
Secrets (passwords) only ever travel on the agent's stdin; they are redacted from every message,
log line, exception and repr this module produces, the agent's own stderr included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from crds.fence_syntax import AGENT_NAME

from .fence_policy import (
    AgentMetadata,
    FenceAction,
    FenceConfigError,
    FenceDevice,
    FencePolicy,
    check_action,
)

log = logging.getLogger(__name__)

EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_STATUS_OFF = 2

AGENT_DIR = Path("/usr/sbin")
MESSAGE_LIMIT = 300

# fencing.py log lines look like "2024-01-01 10:00:00,123 ERROR: Failed: ..." or "ERROR:root:...".
_PROBLEM_LEVELS = ("ERROR", "CRITICAL", "WARNING")
_LOG_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )?(?P<level>[A-Z]+)(:root)?: ?")


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


def _summarize(device: FenceDevice, exit_code: int, stdout: bytes, stderr: bytes) -> str:
    """A short, redacted message from the agent's output.

    A failure is explained by the agent's errors and warnings (fencing.py logs them on stderr),
    anything else by its answer on stdout ("Status: OFF", "Success: Powered OFF"). Of a Python
    traceback only its last line (the exception) counts, as a problem.
    """
    problems: list[str] = []
    others: list[str] = []
    in_traceback = False
    for raw in stderr.decode(errors="replace").splitlines():
        if raw.startswith("Traceback (most recent call last)"):
            in_traceback = True
            continue
        if in_traceback and raw[:1].isspace():
            continue
        line = raw.strip()
        if in_traceback:
            in_traceback = False
            if line and line not in problems:
                problems.append(line)
            continue
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
    """Runs fence agents from `agent_dir` as asyncio subprocesses, as `policy` allows."""

    def __init__(self, agent_dir: Path = AGENT_DIR, policy: FencePolicy | None = None) -> None:
        self._agent_dir = agent_dir
        self.policy = policy or FencePolicy()
        self._metadata: dict[str, AgentMetadata] = {}

    def agent_path(self, agent: str) -> Path:
        """The agent's executable; FenceConfigError if it is not allowed, invalid or missing."""
        if not AGENT_NAME.fullmatch(agent):
            raise FenceConfigError(f"fence agent name {agent!r} is invalid: expected fence_<name>")
        self.policy.check_agent(agent)
        path = self._agent_dir / agent
        if not os.access(path, os.X_OK):
            raise FenceConfigError(
                f"fence agent {agent} not found in {self._agent_dir} (is fence-agents installed?)"
            )
        return path

    async def run(self, device: FenceDevice, action: FenceAction, timeout: float) -> FenceOutcome:
        """Run `action` on `device`; the agent is killed if it is not done after `timeout` s.

        FenceConfigError, before anything runs, if the policy or the agent's metadata refuses
        the device.
        """
        check_action(action)
        known = await self.metadata(device.agent, timeout)
        invocation = self.policy.invocation(known, device, action, self._agent_dir)
        process = await asyncio.create_subprocess_exec(
            *invocation.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LANG": "C", "LC_ALL": "C"},
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout):
                stdout, stderr = await process.communicate(invocation.stdin)
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
        """Raise FenceConfigError if the policy or the agent refuses the device's parameters."""
        self.policy.check(await self.metadata(device.agent), device)


async def _kill_process_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the agent and its helpers (ipmitool...): the session it leads, by its PID."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
