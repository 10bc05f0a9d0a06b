"""`make deb`'s package installed into a fresh Debian root: the commands run, the units verify.

The root is Debian 12 made by debootstrap (minbase plus what the package depends on, and
systemd for systemd-analyze), bootstrapped once into .run/debian-root/ as a tarball and
unpacked anew for every test, so each install starts from a root that never saw kvmctl.
Commands run chrooted in a private mount and PID namespace with its own /proc; kvmctl there
talks to the test's real etcd on loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ROOT_TARBALL = REPO / ".run" / "debian-root" / "bookworm-minbase.tar"
ROOT_PACKAGES = "python3.11,libvirt0,systemd"
"""What the package depends on (python3.11, libvirt0), and systemd-analyze."""
UNITS = sorted(unit.name for unit in (REPO / "deploy" / "systemd").glob("*.service"))
"""The agent, controller and dashboard units, every one shipped and verified."""


def _run(argv: list[str], timeout: float = 900.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _checked(argv: list[str], timeout: float = 900.0) -> str:
    result = _run(argv, timeout)
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def deb() -> Path:
    """The package, built from this checkout by the same script as `make deb`."""
    built = _checked(["bash", str(REPO / "scripts" / "build-deb.sh")]).strip().splitlines()[-1]
    path = REPO / built
    assert path.suffix == ".deb" and path.exists(), built
    return path


def _root_tarball() -> Path:
    if ROOT_TARBALL.exists():
        return ROOT_TARBALL
    assert shutil.which("debootstrap"), "debootstrap missing: run `make install`"
    ROOT_TARBALL.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT_TARBALL.parent) as work:
        root = Path(work) / "root"
        _checked(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={ROOT_PACKAGES}",
                "bookworm",
                str(root),
            ],
            timeout=1800,
        )
        partial = Path(work) / "root.tar"
        _checked(["tar", "-C", str(root), "-cf", str(partial), "."])
        partial.rename(ROOT_TARBALL)
    return ROOT_TARBALL


@pytest.fixture
def debian_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    root.mkdir()
    _checked(["tar", "-C", str(root), "-xf", str(_root_tarball())])
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _in_root(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run `argv` chrooted into `root` (own mount and PID namespaces, a fresh /proc: unshare
    mounts it after changing root)."""
    return _run(
        ["unshare", "--mount", "--pid", "--fork", "--root", str(root), "--mount-proc", "--wd", "/",
         *argv],
        timeout=300,
    )  # fmt: skip


def _ok(root: Path, *argv: str) -> str:
    result = _in_root(root, *argv)
    assert result.returncode == 0, f"{argv} in the root: exit {result.returncode}\n{result.stderr}"
    return result.stdout


def test_package_installs_and_runs_in_a_fresh_debian_root(
    deb: Path, debian_root: Path, etcd_endpoints: list[str]
) -> None:
    assert not (debian_root / "opt" / "kvmctl").exists()
    shutil.copy(deb, debian_root / "tmp" / deb.name)
    _ok(debian_root, "dpkg", "-i", f"/tmp/{deb.name}")

    version = _ok(debian_root, "kvmctl", "--etcd", etcd_endpoints[0], "version")
    assert "Client Version: 0.1.0" in version and "etcd Version:" in version, version

    metadata = _ok(debian_root, "/usr/sbin/fence_kvmctl", "-o", "metadata")
    assert '<resource-agent name="fence_kvmctl"' in metadata, metadata[:300]

    # libvirt-python's extension, compiled at build time, loads against the root's libvirt0.
    _ok(debian_root, "/opt/kvmctl/bin/python3", "-c", "import libvirt")

    units = [f"/lib/systemd/system/{unit}" for unit in UNITS]
    verify = _in_root(debian_root, "systemd-analyze", "verify", *units)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    _ok(debian_root, "dpkg", "--purge", "kvmctl")
    assert not (debian_root / "opt" / "kvmctl").exists()
    assert not (debian_root / "usr" / "sbin" / "fence_kvmctl").is_symlink()


def test_units_in_the_package_are_the_repository_units(deb: Path, tmp_path: Path) -> None:
    _checked(["dpkg-deb", "-x", str(deb), str(tmp_path)])
    assert set(UNITS) >= {
        "kvmctl-agent.service",
        "kvmctl-controller.service",
        "kvmctl-dashboard.service",
    }
    for unit in UNITS:
        shipped = (tmp_path / "lib" / "systemd" / "system" / unit).read_bytes()
        assert shipped == (REPO / "deploy" / "systemd" / unit).read_bytes()
    assert os.readlink(tmp_path / "usr" / "sbin" / "fence_kvmctl") == "/opt/kvmctl/bin/fence_kvmctl"
    completion = tmp_path / "usr" / "share" / "bash-completion" / "completions" / "kvmctl"
    assert "complete -F _kvmctl kvmctl" in completion.read_text()
    docs = tmp_path / "usr" / "share" / "doc" / "kvmctl"
    assert {"README.md", "operations.md", "copyright"} <= {path.name for path in docs.iterdir()}
    for script in (tmp_path / "opt" / "kvmctl" / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            first = script.read_bytes().split(b"\n", 1)[0]
            assert re.fullmatch(rb"#!/opt/kvmctl/bin/python3(\.\d+)?", first), (script.name, first)
