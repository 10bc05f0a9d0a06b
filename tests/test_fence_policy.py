"""Fence devices cannot run a command of their choosing: the allow-list and metadata checks,
against Debian's real fence agents (the attacks are first shown to work without kvmctl)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from controller.cli import main
from reconcilers.drivers.fence import AGENT_DIR, FenceRunner
from reconcilers.drivers.fence_policy import (
    DEFAULT_AGENTS,
    FenceConfigError,
    FenceDevice,
    FencePolicy,
)

TIMEOUT = 60.0


def virsh_device(**parameters: str) -> FenceDevice:
    plain = {"ip": "127.0.0.1", "username": "root", "plug": "vm1", "login_timeout": "2"}
    return FenceDevice("fence_virsh", {**plain, **parameters}, {"password": "pw"})


def shell_writing(out: Path) -> str:
    return f"/bin/sh -c 'id > {out}'"


def test_the_ssh_path_attack_runs_a_command_without_kvmctl(tmp_path: Path) -> None:
    """The control: these very stdin lines make fence_virsh run a shell as root."""
    out = tmp_path / "out"
    device = virsh_device(ssh_path=shell_writing(out))
    subprocess.run(
        [str(AGENT_DIR / "fence_virsh")],
        input=device.stdin_lines("status"),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert out.read_text().startswith("uid=")


@pytest.mark.parametrize(
    "allowed", [frozenset(), frozenset({("fence_virsh", "ssh_path")})], ids=["default", "allowed"]
)
async def test_the_ssh_path_attack_is_refused_and_nothing_runs(
    tmp_path: Path, allowed: frozenset[tuple[str, str]]
) -> None:
    """Refused as exec-like; even where an admin allowed ssh_path, a shell string is no word."""
    out = tmp_path / "out"
    runner = FenceRunner(policy=FencePolicy(allowed_parameters=allowed))
    device = virsh_device(ssh_path=shell_writing(out))
    expected = "may use only letters" if allowed else "names a program, script, file or options"
    with pytest.raises(FenceConfigError, match=expected):
        await runner.power_off_and_confirm(device, TIMEOUT)
    with pytest.raises(FenceConfigError, match=expected):
        await runner.validate(device)
    assert not out.exists()


@pytest.mark.parametrize(
    "parameter",
    [
        {"ip": "127.0.0.1 -oProxyCommand=sh"},
        {"username": "-oProxyCommand=sh"},
        {"plug": "vm1;id"},
        {"plug": "$(id)"},
        {"ip": "127.0.0.1\tx"},
    ],
)
async def test_values_cannot_smuggle_options_or_shell(
    tmp_path: Path, parameter: dict[str, str]
) -> None:
    """fence_virsh pastes ip and username into ssh's command line and plug into a remote shell."""
    runner = FenceRunner()
    with pytest.raises(FenceConfigError, match=r"may use only letters|control character"):
        await runner.status(virsh_device(**parameter), TIMEOUT)


@pytest.mark.parametrize(
    ("agent", "parameter", "value"),
    [
        ("fence_ipmilan", "ipmitool_path", "/usr/bin/ipmitool"),
        ("fence_ipmilan", "password_script", "/tmp/x"),
        ("fence_ipmilan", "passwd_script", "/tmp/x"),
        ("fence_ipmilan", "sudo_path", "/usr/bin/sudo"),
        ("fence_ipmilan", "debug_file", "/etc/cron.d/x"),
        ("fence_ipmilan", "debug", "/etc/cron.d/x"),
        ("fence_virsh", "ssh_options", "-oProxyCommand=x"),
        ("fence_virsh", "identity_file", "/root/.ssh/id_rsa"),
        ("fence_virsh", "cmd_prompt", "x"),
        ("fence_virsh", "command_prompt", "x"),
        ("fence_apc", "telnet_path", "/usr/bin/telnet"),
    ],
)
async def test_exec_like_parameters_are_refused(agent: str, parameter: str, value: str) -> None:
    runner = FenceRunner()
    device = FenceDevice(agent, {"ip": "127.0.0.1", parameter: value})
    with pytest.raises(FenceConfigError, match=f"'{parameter}': names a program"):
        await runner.validate(device)
    secret = FenceDevice(agent, {"ip": "127.0.0.1"}, {parameter: value})
    with pytest.raises(FenceConfigError, match=f"'{parameter}': names a program"):
        await runner.validate(secret)


async def test_the_metadata_tells_exec_like_from_ordinary_parameters() -> None:
    metadata = await FenceRunner().metadata("fence_ipmilan")
    for name in ("ipmitool_path", "sudo_path", "password_script", "debug_file", "debug"):
        assert metadata.exec_like(name), name
    for name in ("ip", "ipaddr", "username", "login", "ipport", "lanplus", "verbose", "method"):
        assert not metadata.exec_like(name), name


async def test_unlisted_agents_never_run(tmp_path: Path) -> None:
    """fence_openstack sources `openrc` with a shell; fence_dummy is for tests only."""
    runner = FenceRunner()
    out = tmp_path / "out"
    openstack = FenceDevice("fence_openstack", {"openrc": str(out)})
    for device in (openstack, FenceDevice("fence_dummy", {"type": "fail"})):
        with pytest.raises(FenceConfigError, match="not on this controller's allow-list"):
            await runner.power_off_and_confirm(device, TIMEOUT)
        with pytest.raises(FenceConfigError, match="allow-list"):
            await runner.metadata(device.agent)
    assert not out.exists()


async def test_fence_manual_is_never_run_and_says_what_to_do() -> None:
    with pytest.raises(FenceConfigError, match="kvmctl fence ack NODE"):
        await FenceRunner().status(FenceDevice("fence_manual"), TIMEOUT)


@pytest.mark.parametrize("character", ["\n", "\r", "\x0b", "\x1c", "\x85", "\u2028", "\t"])
def test_control_characters_and_line_breaks_are_refused(character: str) -> None:
    with pytest.raises(FenceConfigError, match="control character"):
        FenceDevice("fence_ipmilan", {"ip": f"10.0.0.1{character}action=on"})
    with pytest.raises(FenceConfigError, match="control character") as caught:
        FenceDevice("fence_ipmilan", {}, {"password": f"pw{character}action=on"})
    assert "pw" not in str(caught.value).replace("password", "")


def test_policy_settings() -> None:
    policy = FencePolicy.from_settings(["default", "fence_dummy"], ["fence_virsh:identity_file"])
    assert policy.agents == DEFAULT_AGENTS | {"fence_dummy"}
    assert policy.allowed_parameters == {("fence_virsh", "identity_file")}
    assert "fence_dummy" not in DEFAULT_AGENTS
    for agents, pairs in ((["/bin/sh"], []), (["fence_manual"], []), (["default"], ["ssh_path"])):
        with pytest.raises(ValueError):
            FencePolicy.from_settings(agents, pairs)


def test_controller_refuses_a_bad_allow_list(capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error, before the controller connects to anything."""
    assert main(["controller", "--fence-agents", "default,/bin/sh"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kvmctl: error: fence agent '/bin/sh' is not an agent name (fence_<name>)"
    assert main(["controller", "--fence-allow-parameter", "ssh_path"]) == 2
    assert "expected AGENT:PARAMETER" in capsys.readouterr().err
