"""Live migration of a running domain, peer to peer, with progress, stall detection and abort.

`MigrationCalls` is one of the bases of `LibvirtHost` (libvirt_host.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from crds.libvirt_uri import LibvirtUriError, check_migrate_uri, check_peer_uri

from .libvirt_connection import LibvirtConnection
from .libvirt_errors import LibvirtError, MigrationError

log = logging.getLogger(__name__)

ABORTED_JOB_GRACE = 10.0
"""Seconds to wait for a migration job to end once libvirt accepted its abort."""

_MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
)


@dataclass(frozen=True)
class MigrationProgress:
    """A running migration's job statistics, as the source host reports them."""

    data_total_bytes: int
    data_processed_bytes: int
    data_remaining_bytes: int
    elapsed_ms: int

    @property
    def percent(self) -> float:
        """Share of the data sent so far (memory is resent when dirtied: it may go back)."""
        if self.data_total_bytes <= 0:
            return 0.0
        done = self.data_total_bytes - self.data_remaining_bytes
        return 100.0 * done / self.data_total_bytes


def _consume_result(job: asyncio.Future[Any]) -> None:
    """Retrieve a left-behind job's outcome, so asyncio does not report it as never retrieved."""
    if not job.cancelled():
        job.exception()


class MigrationCalls(LibvirtConnection):
    """The migration calls of a libvirt connection."""

    async def migrate(
        self,
        name: str,
        dest_uri: str,
        *,
        migrate_uri: str,
        max_downtime_ms: int,
        bandwidth_mibps: int | None = None,
        progress: Callable[[MigrationProgress], None] | None = None,
        poll_interval: float = 0.5,
        stall_timeout: float = 15.0,
    ) -> None:
        """Live-migrate a running domain, peer to peer, to the host at `dest_uri`.

        `dest_uri` is the destination's libvirt URI as the *source daemon* reaches it
        (`qemu+tcp://10.0.0.2/system`); `migrate_uri` is where QEMU sends the memory
        (`tcp://10.0.0.2`). The definition moves with the domain (persistent on the
        destination, undefined here). `progress` is called every `poll_interval` seconds while
        the job runs. Raises DomainNotFound, or MigrationError (the domain normally keeps
        running here; also, before anything starts, for a URI outside the allow-list of
        libvirt_uri.py). Cancelling the calling task aborts the migration job, and so does a job
        that moved no data for `stall_timeout` seconds: an unreachable target can otherwise hold
        it for minutes (a TCP connect to a silent peer).
        """
        context = f"migrate domain {name!r} to {dest_uri}"
        # Both come from the target's agent (untrusted), and the source daemon opens them as root.
        try:
            check_peer_uri(dest_uri)
            check_migrate_uri(migrate_uri)
        except LibvirtUriError as error:
            raise MigrationError(f"{context} refused: {error}") from None
        domain = await self._call(f"look up domain {name!r}", lambda: self._domain(name))
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: migrate_uri}
        if bandwidth_mibps is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mibps
        try:
            # Since libvirt 1.2.9 the limit may be set before the job starts.
            await self._call(
                f"{context}: set max downtime {max_downtime_ms} ms",
                lambda: domain.migrateSetMaxDowntime(max_downtime_ms, 0),
            )
        except LibvirtError as error:
            raise MigrationError(str(error), error.code) from error
        job = asyncio.ensure_future(
            self._call(context, lambda: domain.migrateToURI3(dest_uri, params, _MIGRATE_FLAGS))
        )
        loop = asyncio.get_running_loop()
        moved, last_move = -1, loop.time()
        try:
            while not (await asyncio.wait({job}, timeout=poll_interval))[0]:
                report = await self._job_progress(domain)
                if report is not None and report.data_processed_bytes > moved:
                    moved, last_move = report.data_processed_bytes, loop.time()
                if report is not None and progress is not None:
                    progress(report)
                if loop.time() - last_move > stall_timeout:
                    if await self._abort(domain, job, name):
                        return  # it completed just before the abort
                    raise MigrationError(
                        f"{context}: no data moved for {stall_timeout:.0f} s; aborted "
                        "(is the target reachable on its migration address?)"
                    )
        except asyncio.CancelledError:
            log.warning("%s: cancelled, aborting the migration job", context)
            await self._abort(domain, job, name)
            raise
        try:
            job.result()
        except LibvirtError as error:
            raise MigrationError(str(error), error.code) from error

    async def _abort(self, domain: Any, job: asyncio.Future[Any], name: str) -> bool:
        """Abort the migration job and wait for it to end; True if it had completed anyway.

        Once libvirt accepted the abort, the migration can no longer complete (libvirt checks
        the abort flag before QEMU starts sending), so the wait is bounded: a peer-to-peer
        connect to a silent target only ends with TCP's own timeout, about two minutes, and
        the domain keeps running here meanwhile. If the abort was refused (the job may just
        have ended) the outcome is unknown, so wait for the job whatever it takes.
        """
        try:
            await self._call(f"abort migration of domain {name!r}", domain.abortJob)
        except LibvirtError as error:
            log.info("aborting the migration of %s: %s; waiting for the job", name, error)
            await asyncio.wait({job})
        else:
            await asyncio.wait({job}, timeout=ABORTED_JOB_GRACE)
        if not job.done():
            log.warning(
                "migration of %s aborted; libvirt ends its job when the connection attempt "
                "gives up",
                name,
            )
            job.add_done_callback(_consume_result)
            return False
        return job.exception() is None

    async def _job_progress(self, domain: Any) -> MigrationProgress | None:
        """The running job's statistics; None between jobs or if they cannot be read."""
        try:
            stats = await self._call("read migration job statistics", domain.jobStats)
        except LibvirtError as error:
            log.debug("no migration progress: %s", error)
            return None
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        return MigrationProgress(
            data_total_bytes=int(stats.get(libvirt.VIR_DOMAIN_JOB_DATA_TOTAL, 0)),
            data_processed_bytes=int(stats.get(libvirt.VIR_DOMAIN_JOB_DATA_PROCESSED, 0)),
            data_remaining_bytes=int(stats.get(libvirt.VIR_DOMAIN_JOB_DATA_REMAINING, 0)),
            elapsed_ms=int(stats.get(libvirt.VIR_DOMAIN_JOB_TIME_ELAPSED, 0)),
        )
