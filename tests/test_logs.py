"""The three log formats, as the processes write them: `kvmctl` run with stderr captured,
journald's stream detection against a real file's device and inode."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from controller.runtime.logs import (
    JournalFormatter,
    LogContext,
    ReconcileContextFilter,
    log_context,
    resolve_format,
    stderr_is_journal,
)

# A child that logs one record per level through the CLI's own logging set-up.
CHILD = """
import logging, sys
from controller.cli import build_parser
from controller.runtime.logs import configure_logging
args = build_parser().parse_args([*sys.argv[1:], "version"])
configure_logging(args.log_format, logging.DEBUG)
log = logging.getLogger("kvmctl.test")
log.debug("debug line")
log.info("info line")
log.warning("warning line")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("error line")
"""


def _run(*flags: str, env: dict[str, str] | None = None, stderr_path: Path) -> list[str]:
    with open(stderr_path, "w") as stderr:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, *flags],
            env=env,
            stderr=stderr,
            stdout=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, stderr_path.read_text()
    return stderr_path.read_text().splitlines()


def _journal_env(path: Path) -> dict[str, str]:
    path.touch()
    status = os.stat(path)
    return {**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}


def test_under_systemd_every_line_carries_its_syslog_priority(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr"
    lines = _run(env=_journal_env(stderr), stderr_path=stderr)
    assert lines[:3] == [
        "<7>DEBUG kvmctl.test: debug line",
        "<6>INFO kvmctl.test: info line",
        "<4>WARNING kvmctl.test: warning line",
    ]
    assert lines[3] == "<3>ERROR kvmctl.test: error line"
    traceback = lines[4:]
    assert traceback and all(line.startswith("<3>") for line in traceback), traceback
    assert traceback[-1] == "<3>RuntimeError: boom"


def test_journal_stream_of_another_file_means_text(tmp_path: Path) -> None:
    """systemd's variable, inherited by a process whose stderr was redirected: not the journal."""
    lines = _run(env=_journal_env(tmp_path / "other"), stderr_path=tmp_path / "stderr")
    assert lines[1].endswith(" INFO kvmctl.test: info line")
    assert lines[1][:4].isdigit()  # the text format's own timestamp
    assert not lines[1].startswith("<")


def test_json_format_is_one_object_per_line(tmp_path: Path) -> None:
    env = _journal_env(tmp_path / "stderr")  # an explicit format wins over systemd's stream
    lines = _run("--log-format", "json", env=env, stderr_path=tmp_path / "stderr")
    records = [json.loads(line) for line in lines]
    assert [(r["level"], r["message"]) for r in records] == [
        ("DEBUG", "debug line"),
        ("INFO", "info line"),
        ("WARNING", "warning line"),
        ("ERROR", "error line"),
    ]
    assert "RuntimeError: boom" in records[-1]["exception"]
    assert all(r["logger"] == "kvmctl.test" and "time" in r for r in records)


def test_text_is_the_default_elsewhere(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    lines = _run(env=env, stderr_path=tmp_path / "stderr")
    assert lines[2].endswith(" WARNING kvmctl.test: warning line")
    assert resolve_format("auto", {}) == "text"
    assert resolve_format("journal", {}) == "journal"


def test_journal_lines_keep_the_reconcile_context() -> None:
    record = logging.LogRecord("kvmctl.x", logging.WARNING, __file__, 1, "two\nlines", (), None)
    token = log_context.set(LogContext("VirtualMachine", "web1", "abc123"))
    try:
        ReconcileContextFilter().filter(record)
    finally:
        log_context.reset(token)
    assert JournalFormatter().format(record).splitlines() == [
        "<4>WARNING kvmctl.x: two",
        "<4>lines [VirtualMachine/web1 abc123]",
    ]


def test_a_stream_without_descriptor_is_not_the_journal() -> None:
    assert not stderr_is_journal({"JOURNAL_STREAM": "1:2"}, io.StringIO())
    assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"})
