"""The fence-agent driver against real fence-agents: fence_dummy, and fence_ipmilan (ipmitool)
talking IPMI lanplus over loopback to a simulated BMC (pyghmi, e2e/harness/bmc.py) in a child
process."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from e2e.harness.bmc import REPO_ROOT, BmcProcess
from reconcilers.drivers.fence import EXIT_FAILURE, EXIT_STATUS_OFF, EXIT_SUCCESS, FenceRunner
from reconcilers.drivers.fence_policy import (
    DEFAULT_AGENTS,
    FenceConfigError,
    FenceDevice,
    FencePolicy,
)

TIMEOUT = 60.0  # generous: the machine is small and shared
TEST_POLICY = FencePolicy(
    agents=DEFAULT_AGENTS | {"fence_dummy"},
    allowed_parameters=frozenset({("fence_dummy", "status_file")}),
)
"""What a test controller allows: fence_dummy too, and its status file (a path it writes)."""


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (to prove an agent's helpers are gone)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture
def runner() -> FenceRunner:
    return FenceRunner(policy=TEST_POLICY)


@pytest.fixture
def password() -> str:
    return f"pw-{secrets.token_hex(8)}"


@pytest.fixture
async def host() -> AsyncIterator[asyncio.subprocess.Process]:
    """A process standing for the simulated host the BMC powers."""
    process = await asyncio.create_subprocess_exec("sleep", "600")
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def is_dead(process: asyncio.subprocess.Process) -> bool:
    """True once the process has exited, reaped or not (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{process.pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
async def bmc(password: str, host: asyncio.subprocess.Process) -> AsyncIterator[BmcProcess]:
    """A powered-on simulated BMC whose power-off hook SIGKILLs `host`."""
    async with BmcProcess(
        "admin", password, on_off_command=["kill", "-KILL", str(host.pid)]
    ) as started:
        yield started


def ipmi_device(bmc: BmcProcess, password: str, **extra: str) -> FenceDevice:
    return FenceDevice(
        agent="fence_ipmilan",
        parameters={
            "ip": "127.0.0.1",
            "ipport": str(bmc.port),
            "username": bmc.user,
            "lanplus": "1",
            **extra,
        },
        secret_parameters={"password": password},
    )


# --- device validation: no paths, no shell strings, no injected input lines ---


@pytest.mark.parametrize(
    "agent",
    ["/usr/sbin/fence_dummy", "../fence_dummy", "fence_dummy; reboot", "fence_", "Fence_dummy", ""],
)
def test_agent_names_must_be_plain_fence_names(agent: str) -> None:
    with pytest.raises(FenceConfigError, match="invalid"):
        FenceDevice(agent=agent)


async def test_unknown_agent_is_a_clear_error() -> None:
    runner = FenceRunner(policy=FencePolicy(agents=frozenset({"fence_nosuchagent"})))
    with pytest.raises(FenceConfigError, match="fence_nosuchagent not found in /usr/sbin"):
        await runner.status(FenceDevice(agent="fence_nosuchagent"), TIMEOUT)


def test_newline_in_a_value_is_refused() -> None:
    with pytest.raises(FenceConfigError, match=r"parameter 'status_file'.*inject"):
        FenceDevice(agent="fence_dummy", parameters={"status_file": "/tmp/x\naction=on"})
    with pytest.raises(FenceConfigError, match="inject"):
        FenceDevice(agent="fence_dummy", parameters={"type": "file\r"})


def test_newline_in_a_secret_is_refused_without_showing_it() -> None:
    with pytest.raises(FenceConfigError, match="parameter 'password'") as caught:
        FenceDevice(agent="fence_ipmilan", secret_parameters={"password": "hunter2\naction=on"})
    assert "hunter2" not in str(caught.value)


async def test_injected_action_is_refused(runner: FenceRunner, tmp_path: Path) -> None:
    device = FenceDevice(agent="fence_dummy", parameters={"status_file": str(tmp_path / "s")})
    with pytest.raises(FenceConfigError, match="unknown"):
        await runner.run(device, "status\naction=off", TIMEOUT)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


def test_action_parameter_and_duplicates_are_refused() -> None:
    with pytest.raises(FenceConfigError, match="chosen per call"):
        FenceDevice(agent="fence_dummy", parameters={"action": "off"})
    with pytest.raises(FenceConfigError, match="both as a plain and as a secret"):
        FenceDevice(
            agent="fence_ipmilan", parameters={"password": "a"}, secret_parameters={"password": "b"}
        )


def test_secrets_never_in_repr_or_str() -> None:
    device = FenceDevice(
        agent="fence_ipmilan", parameters={"ip": "10.0.0.1"}, secret_parameters={"password": "s3"}
    )
    assert "s3" not in repr(device) and "s3" not in str(device)
    assert "10.0.0.1" in repr(device) and "password" in repr(device)
    with pytest.raises(TypeError):
        device.parameters["type"] = "file\naction=on"  # type: ignore[index]


# --- fence_dummy: success, failure and status paths ---


async def test_dummy_off_on_and_status(runner: FenceRunner, tmp_path: Path) -> None:
    device = FenceDevice(agent="fence_dummy", parameters={"status_file": str(tmp_path / "power")})
    assert (await runner.status(device, TIMEOUT)).exit_code == EXIT_STATUS_OFF  # no file: off
    on = await runner.on(device, TIMEOUT)
    assert on.succeeded, on
    status = await runner.status(device, TIMEOUT)
    assert status.exit_code == EXIT_SUCCESS and "ON" in status.message
    fenced = await runner.power_off_and_confirm(device, TIMEOUT)
    assert fenced.succeeded and fenced.action == "off", fenced
    assert "confirmed" in fenced.message
    assert (await runner.status(device, TIMEOUT)).reports_off


async def test_dummy_failing_device_fails(runner: FenceRunner) -> None:
    device = FenceDevice(agent="fence_dummy", parameters={"type": "fail", "power_timeout": "1"})
    outcome = await runner.power_off_and_confirm(device, TIMEOUT)
    assert outcome.exit_code == EXIT_FAILURE and not outcome.timed_out
    assert "Failed: Timed out waiting to power OFF" in outcome.message


# --- fence_ipmilan against the simulated BMC ---


async def test_ipmilan_status_off_then_on(
    runner: FenceRunner, bmc: BmcProcess, password: str, host: asyncio.subprocess.Process
) -> None:
    device = ipmi_device(bmc, password)
    status = await runner.status(device, TIMEOUT)
    assert status.exit_code == EXIT_SUCCESS, status
    assert "Status: ON" in status.message

    fenced = await runner.power_off_and_confirm(device, TIMEOUT)
    assert fenced.succeeded, fenced
    assert is_dead(host), "the BMC acknowledged power off before the host was dead"
    assert (await runner.status(device, TIMEOUT)).reports_off

    on = await runner.on(device, TIMEOUT)
    assert on.succeeded, on
    assert (await runner.status(device, TIMEOUT)).exit_code == EXIT_SUCCESS


async def test_ipmilan_wrong_password_fails_redacted(
    runner: FenceRunner,
    bmc: BmcProcess,
    password: str,
    host: asyncio.subprocess.Process,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    device = ipmi_device(bmc, wrong, verbose="1")
    with caplog.at_level(logging.DEBUG):
        outcome = await runner.power_off_and_confirm(device, TIMEOUT)
    assert outcome.exit_code == EXIT_FAILURE, outcome
    assert "Unable to obtain correct plug status" in outcome.message
    for secret in (wrong, password):
        assert secret not in outcome.message
        assert secret not in repr(outcome)
        assert secret not in caplog.text
        assert secret not in bmc.stderr_path.read_text()
    assert "fence_ipmilan" in caplog.text
    assert not is_dead(host)


async def test_an_unknown_parameter_is_refused_before_the_agent_runs(
    runner: FenceRunner, tmp_path: Path
) -> None:
    """fencing.py would ignore it (and echo the line, secrets included, on stderr)."""
    power = tmp_path / "power"
    device = FenceDevice("fence_dummy", {"status_file": str(power)}, {"pass_word": "pw-1"})
    with pytest.raises(FenceConfigError, match="'pass_word': unknown to fence_dummy") as caught:
        await runner.on(device, TIMEOUT)
    assert "pw-1" not in str(caught.value)
    assert not power.exists(), "the agent ran"


async def test_the_agents_own_output_is_redacted(runner: FenceRunner, tmp_path: Path) -> None:
    """fence_dummy's traceback for an unwritable status file quotes the (secret) path."""
    secret_path = str(tmp_path / "missing-dir" / f"pw-{secrets.token_hex(8)}")
    device = FenceDevice("fence_dummy", {}, {"status_file": secret_path})
    outcome = await runner.on(device, TIMEOUT)
    assert outcome.exit_code == EXIT_FAILURE
    assert "[redacted]" in outcome.message
    assert secret_path not in outcome.message and secret_path not in repr(outcome)


async def test_ipmilan_timeout_kills_the_agent(runner: FenceRunner, password: str) -> None:
    port = free_udp_port()  # nothing answers: ipmitool would retry for many seconds
    device = FenceDevice(
        agent="fence_ipmilan",
        parameters={"ip": "127.0.0.1", "ipport": str(port), "username": "admin", "lanplus": "1"},
        secret_parameters={"password": password},
    )
    started = time.monotonic()
    outcome = await runner.power_off_and_confirm(device, timeout=2.0)
    assert time.monotonic() - started < TIMEOUT
    assert outcome.timed_out and outcome.exit_code is None and not outcome.succeeded
    assert "timed out after 2 s" in outcome.message
    # SIGKILL of the agent's process group is delivered at once; exiting takes a moment.
    deadline = time.monotonic() + TIMEOUT
    while processes_mentioning(f"-p {port} "):
        assert time.monotonic() < deadline, "agent or ipmitool left running"
        await asyncio.sleep(0.05)


async def test_ipmilan_metadata(runner: FenceRunner, password: str) -> None:
    metadata = await runner.metadata("fence_ipmilan")
    assert {"ip", "username", "password", "ipport", "lanplus"} <= metadata.parameters.keys()
    assert metadata.parameters["ipport"].type == "integer"
    assert metadata.parameters["ipport"].default == "623"
    assert metadata.parameters["lanplus"].type == "boolean"
    assert "md5" in metadata.parameters["auth"].choices
    assert metadata.parameters["ipaddr"].deprecated
    assert {"on", "off", "status", "monitor"} <= metadata.actions

    good = FenceDevice(
        agent="fence_ipmilan",
        parameters={"ip": "10.0.0.1", "ipport": "623", "username": "admin", "lanplus": "1"},
        secret_parameters={"password": password},
    )
    await runner.validate(good)

    typo = FenceDevice(agent="fence_ipmilan", parameters={"usernme": "admin"})
    with pytest.raises(FenceConfigError, match=r"'usernme': unknown.*did you mean username"):
        await runner.validate(typo)
    with pytest.raises(FenceConfigError, match="'ipport': 'x623' is not an integer"):
        await runner.validate(FenceDevice(agent="fence_ipmilan", parameters={"ipport": "x623"}))
    with pytest.raises(FenceConfigError, match="'auth': 'sha1' is not one of md5"):
        await runner.validate(FenceDevice(agent="fence_ipmilan", parameters={"auth": "sha1"}))
    bad_secret = FenceDevice(agent="fence_ipmilan", secret_parameters={"lanplus": "maybe"})
    with pytest.raises(FenceConfigError, match="the secret value is not a boolean") as caught:
        await runner.validate(bad_secret)
    assert "maybe" not in str(caught.value)


async def test_dummy_metadata_validates_a_device(runner: FenceRunner, tmp_path: Path) -> None:
    await runner.validate(
        FenceDevice(agent="fence_dummy", parameters={"status_file": str(tmp_path / "s")})
    )
    with pytest.raises(FenceConfigError, match="'ip': unknown to fence_dummy"):
        await runner.validate(FenceDevice(agent="fence_dummy", parameters={"ip": "10.0.0.1"}))


def test_bmc_cli_reports_a_missing_password_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "e2e.harness.bmc",
            "--user",
            "u",
            "--password-file",
            str(tmp_path / "no"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot read --password-file" in result.stderr
    assert "Traceback" not in result.stderr


async def test_power_off_skips_the_agents_own_wait_unless_the_device_sets_it() -> None:
    runner = FenceRunner()
    plain = FenceDevice("fence_ipmilan", {"ip": "127.0.0.1"}, {"password": "x"})
    assert (await runner._without_power_wait(plain, 30)).parameters["power_wait"] == "0"
    chosen = FenceDevice("fence_ipmilan", {"ip": "127.0.0.1", "power_wait": "5"}, {})
    assert (await runner._without_power_wait(chosen, 30)).parameters["power_wait"] == "5"
    manual = FenceDevice("fence_manual", {}, {})
    assert "power_wait" not in (await runner._without_power_wait(manual, 30)).parameters
