"""The kernel lab itself, and the lab suite (e2e/lab_tests) run in one boot of Debian's kernel."""

from __future__ import annotations

import re

import pytest

from e2e.kernellab.run import run_in_lab

LAB_SUITE = "e2e/lab_tests"
BUILD_ALLOWANCE = 1200
"""Seconds the first run on a machine may spend building the lab inside whichever test comes
first (apt-get download of Debian's kernel, depmod, initramfs): pytest's timeout counts it."""
# run_in_lab's limits for each test's own boot and command
QUICK_RUN = 300
SUITE_RUN = 1100


@pytest.mark.timeout(BUILD_ALLOWANCE + QUICK_RUN)
async def test_lab_reports_exit_status_and_output() -> None:
    argv = ["sh", "-c", "uname -r; echo lab=$KVMCTL_KERNEL_LAB; exit 3"]
    result = await run_in_lab(argv, QUICK_RUN)
    assert result.returncode == 3, result.console[-3000:]
    release, flag = result.output.split()
    assert release.endswith("-amd64")
    assert flag == "lab=1"


@pytest.mark.slow
@pytest.mark.timeout(BUILD_ALLOWANCE + SUITE_RUN)
async def test_lab_suite_passes_under_debian_kernel() -> None:
    result = await run_in_lab(
        ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", LAB_SUITE], timeout=SUITE_RUN
    )
    assert result.returncode == 0, f"{result.output}\n--- console ---\n{result.console[-3000:]}"
    summary = result.output.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary), summary
    assert not re.search(r"failed|error|skipped", summary), summary
