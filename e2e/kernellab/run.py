"""Run one command inside the kernel lab: Debian's stock kernel under QEMU TCG, booting the
host's own filesystem (read-only, with a throwaway overlay) so the command sees this repository
and its venv unchanged.

    python -m e2e.kernellab.run [--timeout SECONDS] -- pytest -q e2e/lab_tests

prints the command's output and exits with its status. From Python: `await run_in_lab(argv)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from e2e.kernellab.build import (
    OUTPUT_TAG,
    REPO_DIR,
    REPO_TAG,
    LabBuildError,
    LabImage,
    ensure_built,
)

MEMORY_MIB = 768
"""LVM snapshots were OOM-killed at 128 MiB; etcd next to pytest was at 256 MiB (etcd and the
activation lab test take about 180 MiB more)."""
LAB_ENV_FLAG = "KVMCTL_KERNEL_LAB"
"""Set to 1 for commands run in the lab; e2e/lab_tests only collects its tests when it is set."""


class LabError(Exception):
    """The lab did not run the command to completion (build failed, boot failed, timeout)."""


@dataclass(frozen=True)
class LabResult:
    returncode: int
    output: str
    """The command's stdout and stderr, interleaved."""
    console: str
    """The guest's serial console (kernel messages), for diagnosing the lab itself."""


def guest_environment() -> dict[str, str]:
    venv_bin = REPO_DIR / ".venv" / "bin"
    return {
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "DM_DISABLE_UDEV": "1",
        LAB_ENV_FLAG: "1",
    }


def qemu_argv(image: LabImage, share: Path) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-machine", "pc,accel=tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(MEMORY_MIB),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{share / 'console.log'}",
        "-kernel", str(image.vmlinux),
        "-initrd", str(image.initramfs),
        "-append", "console=ttyS0 panic=-1 loglevel=4 random.trust_cpu=on",
        "-no-reboot",
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag={OUTPUT_TAG},security_model=none",
        "-virtfs",
        f"local,path={REPO_DIR},mount_tag={REPO_TAG},security_model=none,readonly=on,multidevs=remap",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip


async def run_in_lab(
    argv: list[str],
    timeout: float = 600.0,
    cwd: Path = REPO_DIR,
) -> LabResult:
    """Boot the lab, run `argv` in `cwd` with the repo's venv first on PATH, and return its exit
    status and output. Raises `LabError` if the guest never reports a status within `timeout`."""
    if not argv:
        raise LabError("no command given to run in the kernel lab")
    try:
        image = await ensure_built()
    except LabBuildError as error:
        raise LabError(f"building the kernel lab failed: {error}") from None
    share = Path(tempfile.mkdtemp(prefix="kvmctl-kernellab-"))
    try:
        job = {"argv": argv, "cwd": str(cwd), "env": guest_environment()}
        (share / "job.json").write_text(json.dumps(job))
        await _boot(image, share, timeout)
        console = _read(share / "console.log")
        returncode_file = share / "returncode"
        if not returncode_file.exists():
            raise LabError(f"the lab guest stopped without reporting a status:\n{console[-3000:]}")
        return LabResult(
            returncode=int(returncode_file.read_text()),
            output=_read(share / "output.log"),
            console=console,
        )
    finally:
        shutil.rmtree(share, ignore_errors=True)


async def _boot(image: LabImage, share: Path, time_limit: float) -> None:
    process = await asyncio.create_subprocess_exec(
        *qemu_argv(image, share),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        qemu_output, _ = await asyncio.wait_for(process.communicate(), time_limit)
    except TimeoutError:
        raise LabError(
            f"the lab did not finish within {time_limit:.0f} s:\n"
            f"{_read(share / 'console.log')[-3000:]}\n--- command output ---\n"
            f"{_read(share / 'output.log')[-3000:]}"
        ) from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if qemu_output.strip():
        # QEMU only prints on trouble (bad option, missing file): surface it.
        print(qemu_output.decode(errors="replace"), file=sys.stderr)


def _read(path: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text(errors="replace")
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.kernellab.run",
        description="Run a command under Debian's stock kernel in QEMU (the kernel lab).",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    arguments = parser.parse_args()
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    if not command:
        parser.error("give the command to run after --, e.g. -- pytest -q e2e/lab_tests")
    try:
        result = asyncio.run(run_in_lab(command, arguments.timeout))
    except LabError as error:
        raise SystemExit(f"kernellab: {error}") from None
    sys.stdout.write(result.output)
    raise SystemExit(result.returncode)


if __name__ == "__main__":
    main()
