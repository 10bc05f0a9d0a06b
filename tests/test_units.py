"""The systemd units in deploy/systemd/: `systemd-analyze verify` and `security` on the files as
shipped (ExecStart pointed at this checkout's kvmctl: the package test verifies the installed
path), and the settings the daemons' sd_notify support relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
INSTALLED_KVMCTL = "/opt/kvmctl/bin/kvmctl"
MAX_EXPOSURE = {
    "kvmctl-controller.service": 5.0,
    "kvmctl-agent.service": 5.0,
    "kvmctl-dashboard.service": 5.0,
}


def _analyze(*argv: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: make install (systemd)"
    return subprocess.run(
        ["systemd-analyze", *argv], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units with ExecStart at this checkout's kvmctl entry point."""
    kvmctl = Path(sys.executable).parent / "kvmctl"
    assert kvmctl.exists(), kvmctl
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        assert INSTALLED_KVMCTL in text, f"{unit.name} does not run {INSTALLED_KVMCTL}"
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_KVMCTL, str(kvmctl)))
    return tmp_path


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_unit_verifies(units: Path, name: str) -> None:
    result = _analyze("verify", str(units / name))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_security_exposure(units: Path, name: str) -> None:
    result = _analyze("security", "--offline=yes", "--no-pager", str(units / name))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE[name], result.stdout


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_notify_watchdog_and_portable_node_name(name: str) -> None:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"]
    # The node name comes from the flag's default (the short hostname), never from %H.
    assert not re.search(r"--node[ =]%", settings["ExecStart"][0])
    # libvirtd or the modular virtqemud: wanted, never required.
    assert "Requires" not in settings
    if name == "kvmctl-agent.service":
        for unit in ("libvirtd.service", "virtqemud.service"):
            assert unit in settings["Wants"][0].split() and unit in settings["After"][0].split()


FQDN_CHILD = """
import socket
socket.sethostname("Host1.example.org")
from controller.cli import build_parser
parser = build_parser()
print(parser.parse_args(["agent"]).node)
print(parser.parse_args(["controller", "--node", "--metrics-port", "9464"]).node)
print(parser.parse_args(["controller"]).node)
"""


def test_node_name_default_on_a_host_with_an_fqdn() -> None:
    """What the units rely on instead of %H: in a UTS namespace of its own, hostname an FQDN."""
    result = subprocess.run(
        ["unshare", "--uts", sys.executable, "-c", FQDN_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["host1", "host1", "None"]
