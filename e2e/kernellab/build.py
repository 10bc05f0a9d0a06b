"""Build (and cache) what the kernel lab boots: Debian's generic kernel and a busybox initramfs.

Everything lands in e2e/kernellab/build/ (gitignored). The kernel package is fetched once with
`apt-get download`; later runs reuse the unpacked tree. `python -m e2e.kernellab.build` builds
without booting.
"""

from __future__ import annotations

import asyncio
import bz2
import fcntl
import lzma
import os
import re
import shutil
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KERNELLAB_DIR = Path(__file__).resolve().parent
BUILD_DIR = KERNELLAB_DIR / "build"
REPO_DIR = KERNELLAB_DIR.parent.parent
GUEST_INIT = KERNELLAB_DIR / "guest_init.py"
REPO_TAG = "repo"
"""9p mount tag of the read-only share of the repository (overlaid writable in the guest)."""
BUSYBOX = Path("/bin/busybox")
META_PACKAGE = "linux-image-amd64"
"""Debian's meta package; it depends on the current generic `linux-image-6.1.0-NN-amd64`."""

BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
"""Modules stage 1 loads (with their dependencies) to reach the host filesystem."""

OUTPUT_TAG = "kernellab"
"""9p mount tag of the writable share that carries the job in and the results out."""
GUEST_OUTPUT_DIR = "/run/kernellab"


class LabBuildError(Exception):
    """A step of the lab build failed; the message names the step."""


@dataclass(frozen=True)
class LabImage:
    """A bootable lab: uncompressed kernel, initramfs, and the modules tree on the host."""

    release: str
    vmlinux: Path
    initramfs: Path
    modules_dir: Path


async def _run(*argv: str, cwd: Path | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise LabBuildError(
            f"{' '.join(argv)} exited {process.returncode}: {stderr.decode().strip()}"
        )
    return stdout.decode()


async def current_kernel_package() -> str:
    """The generic kernel package `linux-image-amd64` depends on now."""
    depends = await _run("apt-cache", "depends", META_PACKAGE)
    match = re.search(r"Depends: (linux-image-\d[\w.+-]*-amd64)\b", depends)
    if match is None:
        raise LabBuildError(f"apt-cache depends {META_PACKAGE} names no kernel: {depends!r}")
    return match.group(1)


async def _fetch_deb(package: str) -> Path:
    debs = BUILD_DIR / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    existing = sorted(debs.glob(f"{package}_*.deb"))
    if not existing:
        await _run("apt-get", "download", package, cwd=debs)
        existing = sorted(debs.glob(f"{package}_*.deb"))
    if not existing:
        raise LabBuildError(f"apt-get download {package} left no .deb in {debs}")
    return existing[-1]


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (what scripts/extract-vmlinux does): try
    each compression magic where it occurs and keep the first payload that is an ELF file."""
    decompressors = (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
        (b"BZh", bz2.BZ2Decompressor),
        (b"\x5d\x00\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE)),
    )
    for magic, make in decompressors:
        for offset in _occurrences(vmlinuz, magic):
            try:
                payload = make().decompress(vmlinuz[offset:])
            except (lzma.LZMAError, zlib.error, OSError, EOFError):
                continue
            if payload.startswith(b"\x7fELF"):
                return payload
    raise LabBuildError("no xz, gzip, bzip2 or lzma payload holding an ELF kernel in vmlinuz")


def _occurrences(data: bytes, needle: bytes) -> Iterator[int]:
    offset = data.find(needle)
    while offset != -1:
        yield offset
        offset = data.find(needle, offset + 1)


async def _unpack_kernel(package: str) -> tuple[str, Path, Path]:
    """dpkg -x, depmod and vmlinux extraction, once per package (a marker file records it)."""
    kernel_dir = BUILD_DIR / package
    root = kernel_dir / "root"
    vmlinux = kernel_dir / "vmlinux"
    done = kernel_dir / "complete"
    if not done.exists():
        deb = await _fetch_deb(package)
        shutil.rmtree(kernel_dir, ignore_errors=True)
        root.mkdir(parents=True)
        await _run("dpkg", "-x", str(deb), str(root))
        release = _release_of(root)
        await _run("depmod", "-b", str(root), release)
        vmlinuz = (root / "boot" / f"vmlinuz-{release}").read_bytes()
        vmlinux.write_bytes(await asyncio.to_thread(extract_vmlinux, vmlinuz))
        done.write_text(release + "\n")
    release = done.read_text().strip()
    return release, vmlinux, root / "lib" / "modules" / release


def _release_of(root: Path) -> str:
    releases = [path.name for path in (root / "lib" / "modules").iterdir()]
    if len(releases) != 1:
        raise LabBuildError(f"expected one kernel release in {root}/lib/modules, got {releases}")
    return releases[0]


def module_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files for `wanted` and everything they depend on, dependencies first
    (from modules.dep, whose lines are `path: dep1 dep2...` with deps in load-reverse order)."""
    depends: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        depends[path] = deps.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dependency in reversed(depends[path]):
            visit(dependency)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise LabBuildError(f"module {name} is not in {modules_dir}/modules.dep")
        visit(by_name[name])
    return [modules_dir / path for path in order]


def stage1_script(release: str, modules: list[Path], modules_dir: Path) -> str:
    """The initramfs /init: reach the host root over 9p, overlay it, switch_root to stage 2."""
    insmods = "\n".join(
        f"insmod /modules/{path.name} || fail 'insmod {path.name}'" for path in modules
    )
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "kernellab stage 1: $1 failed"; poweroff -f; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{insmods}
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /lower \\
    || fail 'mount host root over 9p'
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \\
    || fail 'mount overlay root'
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
# The repository gets its own share and overlay: the host root's view may not show it (a
# checkout under /tmp is hidden by the tmpfs above, and 9p does not cross host mounts).
mkdir -p /rw/repo-upper /rw/repo-work /newroot{REPO_DIR}
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose {REPO_TAG} /repo \\
    || fail 'mount the repository over 9p'
mount -t overlay -o lowerdir=/repo,upperdir=/rw/repo-upper,workdir=/rw/repo-work overlay \\
    /newroot{REPO_DIR} || fail 'mount the repository overlay'
mkdir -p /newroot{GUEST_OUTPUT_DIR}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {OUTPUT_TAG} /newroot{GUEST_OUTPUT_DIR} \\
    || fail 'mount the output share'
mkdir -p /newroot/lib/modules
rm -rf /newroot/lib/modules/{release}
ln -s {modules_dir} /newroot/lib/modules/{release}
exec switch_root /newroot /usr/bin/python3 -I -S {GUEST_INIT}
"""


class _Cpio:
    """A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._inode = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._inode += 1
        self._parts += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, stat.S_IFREG | (0o755 if executable else 0o644), data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def archive(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def build_initramfs(release: str, modules_dir: Path) -> bytes:
    modules = module_load_order(modules_dir, BOOT_MODULES)
    cpio = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "lower", "repo", "rw", "newroot", "modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), executable=True)
    for module in modules:
        cpio.file(f"modules/{module.name}", module.read_bytes())
    cpio.file("init", stage1_script(release, modules, modules_dir).encode(), executable=True)
    return cpio.archive()


async def ensure_built() -> LabImage:
    """Fetch, unpack and build whatever is missing; safe to run from parallel processes."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    lock = os.open(BUILD_DIR / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        package = await current_kernel_package()
        release, vmlinux, modules_dir = await _unpack_kernel(package)
        initramfs = BUILD_DIR / package / "initramfs.cpio"
        archive = await asyncio.to_thread(build_initramfs, release, modules_dir)
        if not initramfs.exists() or initramfs.read_bytes() != archive:
            staged = initramfs.with_suffix(".tmp")
            staged.write_bytes(archive)
            staged.replace(initramfs)
        return LabImage(release, vmlinux, initramfs, modules_dir)
    finally:
        os.close(lock)


async def _main() -> None:
    image = await ensure_built()
    print(f"kernel {image.release}\n  {image.vmlinux}\n  {image.initramfs}\n  {image.modules_dir}")


if __name__ == "__main__":
    try:
        asyncio.run(_main())
    except LabBuildError as error:
        raise SystemExit(f"kernellab build: {error}") from None
