"""Thin async driver over the `lvm` command: reports as JSON, one command per method.

The only code in kvmctl that runs LVM. Sizes are bytes everywhere (reports use `--units b
--nosuffix`); sizes given are rounded up to 512-byte sectors here, then to whole extents by
LVM. Deciding *what* to change is the VolumeGroup reconciler's job. A failed command raises
`LvmError` carrying the command and LVM's own reason, e.g.
`lvcreate vg_cluster/lv_vm1 failed: Volume group "vg_cluster" has insufficient free space (47
extents): 256 required.`

    lvm = Lvm(system_dir=Path("/etc/kvmctl/lvm"), devices=["/dev/sdb"])
    await lvm.lvcreate("vg_cluster", "lv_vm1", 50 * 2**30, tags=["kvmctl"])

`system_dir` selects a private lvm.conf (`LVM_SYSTEM_DIR`); `devices` limits LVM to those
devices (`--devices`), so it never touches another host's or another test's disks;
`activation=False` runs every command with `global/activation=0` (metadata only: for hosts
without device-mapper). There is deliberately no pvmove: without device-mapper it leaves a
stuck volume.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SECTOR = 512
_REPORT_OPTIONS = ("--reportformat", "json", "--units", "b", "--nosuffix")
_PV_FIELDS = "pv_name,vg_name,pv_size,pv_free,pv_attr,pv_tags,pv_uuid"
_VG_FIELDS = (
    "vg_name,vg_size,vg_free,vg_extent_size,pv_count,lv_count,vg_attr,vg_tags,vg_systemid,vg_uuid"
)
_LV_FIELDS = "vg_name,lv_name,lv_size,lv_attr,lv_tags,lv_uuid,lv_path"


class LvmError(Exception):
    """An lvm command failed. `command` names it (`lvcreate vg/lv`), `message` is LVM's reason."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(f"{command} failed: {message}")
        self.command = command
        self.message = message


@dataclass(frozen=True)
class PvReport:
    """One physical volume."""

    name: str
    """The device, e.g. /dev/sdb."""
    vg_name: str | None
    size_bytes: int
    free_bytes: int
    attr: str
    tags: tuple[str, ...]
    uuid: str


@dataclass(frozen=True)
class VgReport:
    """One volume group."""

    name: str
    size_bytes: int
    free_bytes: int
    extent_size_bytes: int
    pv_count: int
    lv_count: int
    attr: str
    tags: tuple[str, ...]
    system_id: str | None
    """The host that owns the VG (LVM system ID), None when the VG has none."""
    uuid: str


@dataclass(frozen=True)
class LvReport:
    """One logical volume."""

    vg_name: str
    name: str
    size_bytes: int
    attr: str
    tags: tuple[str, ...]
    uuid: str
    path: str
    """The device node it has when active, /dev/VG/LV."""

    @property
    def active(self) -> bool | None:
        """Whether the LV is active on this host; None when LVM cannot tell (activation off)."""
        state = self.attr[4]
        if state == "X":
            return None
        return state != "-"


class Lvm:
    """Runs `lvm` with an optional private configuration and device list (see module doc).

    A command that runs longer than `timeout` seconds (blocked on a lock or a dead device)
    is killed and raises `LvmError`.
    """

    def __init__(
        self,
        system_dir: Path | None = None,
        devices: Sequence[str] | None = None,
        activation: bool = True,
        timeout: float = 120.0,
    ) -> None:
        self.system_dir = system_dir
        self.devices = list(devices) if devices else None
        self.activation = activation
        self.timeout = timeout

    def __repr__(self) -> str:
        return (
            f"Lvm(system_dir={self.system_dir}, devices={self.devices}, "
            f"activation={self.activation})"
        )

    # -- reports --------------------------------------------------------------------------

    async def pvs(self) -> list[PvReport]:
        rows = await self._report("pvs", "pv", _PV_FIELDS)
        return [
            PvReport(
                name=row["pv_name"],
                vg_name=row["vg_name"] or None,
                size_bytes=int(row["pv_size"]),
                free_bytes=int(row["pv_free"]),
                attr=row["pv_attr"],
                tags=_tags(row["pv_tags"]),
                uuid=row["pv_uuid"],
            )
            for row in rows
        ]

    async def vgs(self, include_foreign: bool = False) -> list[VgReport]:
        """The VGs this host may use; `include_foreign` adds those owned by other system IDs."""
        rows = await self._report(
            "vgs", "vg", _VG_FIELDS, *(["--foreign"] if include_foreign else [])
        )
        return [
            VgReport(
                name=row["vg_name"],
                size_bytes=int(row["vg_size"]),
                free_bytes=int(row["vg_free"]),
                extent_size_bytes=int(row["vg_extent_size"]),
                pv_count=int(row["pv_count"]),
                lv_count=int(row["lv_count"]),
                attr=row["vg_attr"],
                tags=_tags(row["vg_tags"]),
                system_id=row["vg_systemid"] or None,
                uuid=row["vg_uuid"],
            )
            for row in rows
        ]

    async def lvs(self, vg: str | None = None) -> list[LvReport]:
        """The LVs of `vg` (all VGs when None); a VG that does not exist is an `LvmError`."""
        rows = await self._report("lvs", "lv", _LV_FIELDS, *([vg] if vg is not None else []))
        return [
            LvReport(
                vg_name=row["vg_name"],
                name=row["lv_name"],
                size_bytes=int(row["lv_size"]),
                attr=row["lv_attr"],
                tags=_tags(row["lv_tags"]),
                uuid=row["lv_uuid"],
                path=row["lv_path"],
            )
            for row in rows
        ]

    async def local_system_id(self) -> str | None:
        """This host's LVM system ID (from lvm.conf / lvmlocal.conf), None when it has none."""
        output = await self._run("systemid", "systemid")
        _, _, system_id = output.strip().partition("system ID:")
        return system_id.strip() or None

    # -- physical volumes and volume groups -------------------------------------------------

    async def pvcreate(self, device: str) -> None:
        await self._run(f"pvcreate {device}", "pvcreate", device)

    async def vgcreate(self, name: str, devices: Sequence[str]) -> None:
        await self._run(f"vgcreate {name}", "vgcreate", name, *devices)

    async def vgextend(self, name: str, devices: Sequence[str]) -> None:
        await self._run(f"vgextend {name}", "vgextend", name, *devices)

    async def vgremove(self, name: str) -> None:
        """Remove an empty VG. LVM refuses (and nothing changes) while it still has LVs."""
        await self._run(f"vgremove {name}", "vgremove", name)

    async def set_system_id(self, vg: str, system_id: str | None) -> None:
        """Give the VG to the host with `system_id` (None: to no host in particular).

        The VG must be accessible here (its system ID is ours or none); see `take_over`.
        Setting the ID the VG already has is a no-op.
        """
        await self._vgchange_system_id(vg, system_id or "")

    async def take_over(self, vg: str, previous_system_id: str, system_id: str) -> None:
        """Give a VG owned by another host (`previous_system_id`) to `system_id`.

        Only for a host known to be dead (fenced): LVM cannot stop it from writing afterwards.
        """
        await self._vgchange_system_id(
            vg, system_id, f"local/extra_system_ids=[{json.dumps(previous_system_id)}]"
        )

    async def _vgchange_system_id(
        self, vg: str, system_id: str, extra_config: str | None = None
    ) -> None:
        try:
            await self._run(
                f"vgchange {vg}",
                "vgchange",
                "--yes",
                "--systemid",
                system_id,
                vg,
                extra_config=extra_config,
            )
        except LvmError as error:
            # LVM refuses to set the ID a VG already has: that is the state we want.
            if "system ID is already" not in error.message:
                raise

    # -- logical volumes --------------------------------------------------------------------

    async def lvcreate(self, vg: str, name: str, size_bytes: int, tags: Sequence[str] = ()) -> None:
        """A new LV of at least `size_bytes`, left inactive (activation is a separate step)."""
        tag_options = [option for tag in tags for option in ("--addtag", tag)]
        await self._run(
            f"lvcreate {vg}/{name}",
            "lvcreate",
            "--yes",
            "--activate",
            "n",
            "--zero",
            "n",
            "--name",
            name,
            "--size",
            _size_option(size_bytes),
            *tag_options,
            vg,
        )

    async def lvextend(self, vg: str, name: str, size_bytes: int) -> None:
        """Grow an LV to `size_bytes`; LVM refuses a size that is not larger."""
        await self._run(
            f"lvextend {vg}/{name}", "lvextend", "--size", _size_option(size_bytes), f"{vg}/{name}"
        )

    async def lvremove(self, vg: str, name: str) -> None:
        await self._run(f"lvremove {vg}/{name}", "lvremove", "--yes", f"{vg}/{name}")

    async def lvchange_activate(self, vg: str, name: str, exclusive: bool) -> None:
        """Activate the LV here, `exclusive`ly (`-aey`): only a lock manager enforces that."""
        mode = "ey" if exclusive else "y"
        await self._run(f"lvchange {vg}/{name}", "lvchange", "--activate", mode, f"{vg}/{name}")

    async def lvchange_deactivate(self, vg: str, name: str) -> None:
        await self._run(f"lvchange {vg}/{name}", "lvchange", "--activate", "n", f"{vg}/{name}")

    async def add_tag(self, vg: str, name: str, tag: str) -> None:
        await self._run(f"lvchange {vg}/{name}", "lvchange", "--addtag", tag, f"{vg}/{name}")

    async def del_tag(self, vg: str, name: str, tag: str) -> None:
        await self._run(f"lvchange {vg}/{name}", "lvchange", "--deltag", tag, f"{vg}/{name}")

    # -- running lvm ------------------------------------------------------------------------

    async def _report(self, command: str, kind: str, fields: str, *args: str) -> list[Any]:
        output = await self._run(command, command, *_REPORT_OPTIONS, "--options", fields, *args)
        try:
            rows: list[Any] = json.loads(output)["report"][0][kind]
        except (ValueError, KeyError, IndexError) as error:
            raise LvmError(command, f"unreadable JSON report ({error})") from None
        return rows

    async def _run(
        self, description: str, command: str, *args: str, extra_config: str | None = None
    ) -> str:
        """Run `lvm COMMAND [options] ARGS`; its stdout, or `LvmError` named by `description`."""
        options: list[str] = []
        if self.devices:
            options += ["--devices", ",".join(self.devices)]
        config = [] if self.activation else ["global/activation=0"]
        if extra_config is not None:
            config.append(extra_config)
        if config:
            options += ["--config", " ".join(config)]
        environment = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
        if self.system_dir is not None:
            environment["LVM_SYSTEM_DIR"] = str(self.system_dir)
        log.debug("lvm %s %s", command, " ".join(args))
        try:
            process = await asyncio.create_subprocess_exec(
                "lvm",
                command,
                *options,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=environment,
            )
        except FileNotFoundError:
            raise LvmError(description, "lvm is not installed (Debian package lvm2)") from None
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise LvmError(description, f"no answer within {self.timeout} s") from None
        if process.returncode != 0:
            reason = _reason(stderr.decode(errors="replace") or stdout.decode(errors="replace"))
            raise LvmError(description, reason)
        return stdout.decode(errors="replace")


def _reason(output: str) -> str:
    """LVM's error lines on one line; its warnings only when there is nothing else."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("WARNING:")]
    return "; ".join(errors or lines) or "no message"


def _size_option(size_bytes: int) -> str:
    """`--size` in bytes, rounded up to whole sectors (LVM refuses other byte counts)."""
    sectors = -(-size_bytes // _SECTOR)
    return f"{sectors * _SECTOR}b"


def _tags(field: str) -> tuple[str, ...]:
    """LVM reports tags comma-separated (a comma is not allowed in a tag)."""
    return tuple(tag for tag in field.split(",") if tag)
