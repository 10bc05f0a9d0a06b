"""The daemons as real processes, their /metrics scraped over HTTP, and the metric names a PromQL
expression uses (tests/test_metrics.py).

`Daemon` runs `python -m controller.cli ...` on the test's etcd and prefix with this tree on
PYTHONPATH, its output in a log file, and stops it by its PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent.parent
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class Daemon:
    """`kvmctl ARGV...` in a process of its own; `async with` starts it and stops it."""

    def __init__(
        self, etcd: list[str], prefix: str, log: Path, *argv: str, env: dict[str, str] | None = None
    ) -> None:
        self.argv = [sys.executable, "-m", "controller.cli", *argv]
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "KVMCTL_ETCD": ",".join(etcd),
            "KVMCTL_PREFIX": prefix,
            "KVMCTL_CONFIG": "",
            **(env or {}),
        }
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Daemon:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=out
            )
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _error: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Send `sig` to the process (by its PID) and wait for it; SIGKILL if it lingers."""
        process = self.process
        if process is None or process.returncode is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                return await process.wait()
        except TimeoutError:
            process.kill()
            return await process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def output(self) -> str:
        """The end of the daemon's log, for failure messages."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: bytes = reply.read()
        return body.decode()


async def scrape(port: int, host: str = "127.0.0.1") -> list[Sample]:
    """Every sample of `GET http://HOST:PORT/metrics`, parsed by prometheus_client."""
    text = await asyncio.to_thread(_get, f"http://{host}:{port}/metrics")
    return [
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def try_scrape(port: int, host: str = "127.0.0.1") -> list[Sample] | None:
    """`scrape`, or None while nothing answers yet."""
    try:
        return await scrape(port, host)
    except OSError:
        return None


def value(samples: list[Sample], name: str, /, **labels: str) -> float | None:
    """The value of the one sample `name` whose labels include `labels`; None if none."""
    found = [s for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches several samples: {found}"
    return found[0].value if found else None


# PromQL ----------------------------------------------------------------------------------

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords).

    Label matchers, ranges, grouping label lists, strings and Grafana variables are removed
    first; what is left and not followed by `(` is a metric name.
    """
    text = _GRAFANA_VARIABLE.sub("1", expr)
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        rest = text[match.end() :].lstrip()
        word = match.group()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d.*", word) or _is_duration_or_number(text, match.start()):
            continue
        names.add(word)
    return names


def _is_duration_or_number(text: str, start: int) -> bool:
    """A name-like word right after a digit (`5m`, `1e3`) is part of a number."""
    return start > 0 and text[start - 1].isdigit()
