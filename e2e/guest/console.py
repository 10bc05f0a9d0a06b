"""Read the test guest's serial log: a boot line, then `tick N` every 100 ms."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

BOOTED_LINE = b"kvmctl-guest booted"
# Only complete lines: a half-written "tick 12" must not be read as "tick 1".
_TICK = re.compile(rb"^tick (\d+)\r?\n", re.MULTILINE)


def read_ticks(serial_log: Path) -> list[int]:
    """Every counter value in the log, in order (empty if the log does not exist yet)."""
    try:
        text = serial_log.read_bytes()
    except FileNotFoundError:
        return []
    return [int(match.group(1)) for match in _TICK.finditer(text)]


def tick_gaps(ticks: list[int]) -> list[tuple[int, int]]:
    """Neighbouring values that are not consecutive, e.g. [(41, 43)] or, after a reboot, (90, 0)."""
    return [(before, after) for before, after in itertools.pairwise(ticks) if after != before + 1]


def wait_for_tick(serial_log: Path, above: int = -1, timeout: float = 120.0) -> int:
    """Poll the log until a counter value greater than `above` shows; return the latest one."""
    deadline = time.monotonic() + timeout
    while True:
        ticks = read_ticks(serial_log)
        if ticks and ticks[-1] > above:
            return ticks[-1]
        if time.monotonic() > deadline:
            latest = ticks[-1] if ticks else "none"
            raise TimeoutError(
                f"{serial_log}: no tick above {above} within {timeout:.0f} s (latest: {latest})"
            )
        time.sleep(0.05)


def last_boot(serial_log: Path) -> bytes:
    """The log from the latest boot line on (empty before the first boot)."""
    try:
        text = serial_log.read_bytes()
    except FileNotFoundError:
        return b""
    start = text.rfind(BOOTED_LINE)
    return b"" if start == -1 else text[start:]
