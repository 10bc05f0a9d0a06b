"""Build (once) the tiny TCG test guest: a Debian kernel plus a busybox initramfs.

The default image runs Debian's cloud kernel, from the package that `linux-image-cloud-amd64`
depends on, fetched with `apt-get download` (the only network access) and unpacked with `dpkg -x`;
the modules `init.sh` needs are kept too (ACPI button and evdev, virtio-serial). Debian's
qemu-ga comes the same way from `qemu-guest-agent` (the candidate version). The initramfs is a
newc cpio archive written here with the standard library: busybox-static, `init.sh` as `/init`,
qemu-ga with the libraries and loader `ldd` resolves for it on this host (at their paths), the
`GUEST_SCRIPTS` in `/bin`, the modules with `/lib/modules/order` (their load order) and a
`/dev/console` node. Its `/init` powers off on the ACPI power button, runs qemu-ga if the domain
has its channel, and prints `tick N` on ttyS0 every 100 ms.

The cloud kernel has no i6300esb driver: `ensure_watchdog_guest_image` boots the same `init.sh` on
the kernel lab's generic kernel (e2e/kernellab/build.py builds it) with its i6300esb module.

Everything lands in `e2e/guest/build/` and is rebuilt only when missing; the initramfs name carries
a hash of its inputs (qemu-ga's package version too), so editing `init.sh` gives a new file.

    python -m e2e.guest.build     # prints the kernel and initrd paths of both images
"""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import hashlib
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from e2e.kernellab import build as kernellab

GUEST_DIR = Path(__file__).resolve().parent
BUILD_DIR = GUEST_DIR / "build"
INIT_SCRIPT = GUEST_DIR / "init.sh"
BUSYBOX = Path("/bin/busybox")
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
QEMU_GA_PACKAGE = "qemu-guest-agent"
QEMU_GA = "usr/sbin/qemu-ga"
"""Where qemu-ga is, in its package and in the initramfs (with the libraries it loads)."""
GUEST_SCRIPTS = ("kvmctl-hang-agent", "kvmctl-starve-watchdog")
"""Scripts of this directory put into the guest's /bin, for the tests to guest-exec."""
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"
DEFAULT_MEMORY_MIB = 96
WATCHDOG_GUEST_MEMORY_MIB = 128
"""The generic kernel is bigger: at 96 MiB it ran out of memory unpacking the initramfs now and
then (one boot in a few, since qemu-ga and its libraries are in it)."""
GUEST_MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/char/virtio_console.ko",
    "drivers/acpi/button.ko",
    "drivers/input/evdev.ko",
)
"""The cloud kernel's modules init.sh loads, in this order: virtio-serial for the guest agent's
port, the ACPI button and evdev so that libvirt's shutdown() powers the guest off."""
WATCHDOG_GUEST_MODULES = ("virtio_pci", "virtio_console", "i6300esb", "button", "evdev")
"""The same and the i6300esb driver, from the generic kernel (loaded with their dependencies)."""


class GuestBuildError(RuntimeError):
    """The guest image could not be built; the message says which step failed."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: kernel and initramfs paths for libvirt's direct kernel boot."""

    kernel: Path
    initrd: Path

    def domain_xml(
        self,
        name: str,
        serial_log: Path,
        *,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        domain_type: str = "qemu",
        domain_uuid: str | None = None,
        bridge: str | None = None,
    ) -> str:
        """Libvirt XML for one guest; its serial console is appended to `serial_log`.

        The log path must be the same on every host the guest may migrate to (the lab's hosts
        share the filesystem), so one file shows the counter before and after a migration.
        With `bridge`, the guest gets a virtio NIC on that bridge (a tap device on the host).
        """
        domain = ET.Element("domain", type=domain_type)
        ET.SubElement(domain, "name").text = name
        ET.SubElement(domain, "uuid").text = domain_uuid or str(uuid.uuid4())
        ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mib)
        ET.SubElement(domain, "vcpu").text = "1"
        os_element = ET.SubElement(domain, "os")
        ET.SubElement(os_element, "type", arch="x86_64", machine="pc").text = "hvm"
        ET.SubElement(os_element, "kernel").text = str(self.kernel)
        ET.SubElement(os_element, "initrd").text = str(self.initrd)
        ET.SubElement(os_element, "cmdline").text = KERNEL_CMDLINE
        features = ET.SubElement(domain, "features")
        ET.SubElement(features, "acpi")  # without it libvirt passes -no-acpi: no power button
        if domain_type == "qemu":
            ET.SubElement(ET.SubElement(features, "tcg"), "tb-cache", unit="MiB").text = "16"
        ET.SubElement(domain, "on_poweroff").text = "destroy"
        ET.SubElement(domain, "on_reboot").text = "restart"
        ET.SubElement(domain, "on_crash").text = "destroy"
        devices = ET.SubElement(domain, "devices")
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(serial_log), append="on")
        ET.SubElement(serial, "target", port="0")
        if bridge is not None:
            interface = ET.SubElement(devices, "interface", type="bridge")
            ET.SubElement(interface, "source", bridge=bridge)
            ET.SubElement(interface, "model", type="virtio")
        ET.SubElement(devices, "memballoon", model="none")
        return ET.tostring(domain, encoding="unicode")


def ensure_guest_image() -> GuestImage:
    """Return the guest image, building whatever part of it is missing."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with _build_lock():
        kernel_dir = _ensure_kernel()
        modules = [kernel_dir / Path(module).name for module in GUEST_MODULES]
        return GuestImage(kernel=kernel_dir / "vmlinuz", initrd=_ensure_initrd(modules))


def ensure_watchdog_guest_image() -> GuestImage:
    """The test guest on the kernel lab's generic kernel (uncompressed: it boots faster under
    TCG), whose i6300esb driver makes a `<watchdog>` device work; builds what is missing.
    Not from a running event loop: it runs the kernel lab's asyncio build."""
    try:
        lab = asyncio.run(kernellab.ensure_built())
        modules = kernellab.module_load_order(lab.modules_dir, WATCHDOG_GUEST_MODULES)
    except kernellab.LabBuildError as error:
        raise GuestBuildError(f"building the kernel lab's kernel: {error}") from None
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with _build_lock():
        return GuestImage(kernel=lab.vmlinux, initrd=_ensure_initrd(modules))


@contextmanager
def _build_lock() -> Iterator[None]:
    """Serialise builds between concurrent test runs sharing this checkout."""
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GuestBuildError(
            f"building the test guest: `{' '.join(argv)}` exited {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


def _ensure_kernel() -> Path:
    """A directory holding `vmlinuz` and the `GUEST_MODULES`, named after the kernel version
    (one built before a module was added to the list is completed from a fresh download)."""
    names = [Path(module).name for module in GUEST_MODULES]
    existing = sorted(
        path.parent
        for path in BUILD_DIR.glob("kernel-*/vmlinuz")
        if all((path.parent / name).is_file() for name in names)
    )
    if existing:
        return existing[-1]
    package = _apt_lookup(
        ["apt-cache", "depends", KERNEL_METAPACKAGE], r"Depends:\s*(linux-image-\S+-cloud-amd64)"
    )
    with _unpacked(package) as (scratch, unpacked):
        kernels = list((unpacked / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise GuestBuildError(f"{package} holds {len(kernels)} kernels in /boot")
        version = kernels[0].name.removeprefix("vmlinuz-")
        staging = scratch / "kernel"
        staging.mkdir()
        shutil.copyfile(kernels[0], staging / "vmlinuz")
        for module in GUEST_MODULES:
            source = unpacked / "lib" / "modules" / version / "kernel" / module
            if not source.is_file():
                raise GuestBuildError(f"{package} has no module {module}")
            shutil.copyfile(source, staging / source.name)
        target = BUILD_DIR / f"kernel-{version}"
        target.mkdir(exist_ok=True)
        for staged in staging.iterdir():  # one at a time, each whole: others may be booting it
            staged.replace(target / staged.name)
        return target


def _ensure_qemu_ga() -> tuple[str, Path]:
    """Debian's qemu-ga, of the package version apt would install now, unpacked once into the
    build dir: (that version, the binary)."""
    version = _apt_lookup(["apt-cache", "policy", QEMU_GA_PACKAGE], r"Candidate:\s*(\d\S*)")
    binary = BUILD_DIR / f"qemu-ga-{version.replace(':', '_')}" / "qemu-ga"
    if not binary.is_file():
        with _unpacked(f"{QEMU_GA_PACKAGE}={version}") as (_, unpacked):
            binary.parent.mkdir(exist_ok=True)
            (unpacked / QEMU_GA).replace(binary)
    return version, binary


@contextmanager
def _unpacked(package: str) -> Iterator[tuple[Path, Path]]:
    """`package` fetched with `apt-get download` and unpacked with `dpkg -x` in a scratch dir
    of the build dir: (the scratch dir, the unpacked tree), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kvmctl-guest-deb-", dir=BUILD_DIR) as scratch_name:
        scratch = Path(scratch_name)
        # The sandbox user _apt cannot write into a private temp dir: download as root.
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=scratch)
        debs = list(scratch.glob("*.deb"))
        if len(debs) != 1:
            raise GuestBuildError(f"apt-get download {package} gave {len(debs)} .deb files")
        unpacked = scratch / "root"
        _run(["dpkg", "-x", str(debs[0]), str(unpacked)])
        yield scratch, unpacked


def _apt_lookup(argv: list[str], pattern: str) -> str:
    """The first group of `pattern` in the output of the apt-cache command `argv`."""
    for attempt in range(2):
        if attempt == 1:  # no package lists yet (fresh CI machine): fetch them once
            _run(["apt-get", "update", "-qq"])
        output = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        match = re.search(pattern, output)
        if match:
            return match.group(1)
    raise GuestBuildError(f"`{' '.join(argv)}` does not show {pattern!r}")


def _shared_libraries(binary: Path) -> dict[str, bytes]:
    """Every library `binary` loads and the dynamic loader, as ldd resolves them on this host,
    by path (relative to /)."""
    output = _run(["ldd", str(binary)])
    if "not found" in output:
        raise GuestBuildError(f"ldd {binary}: libraries missing on this host:\n{output}")
    paths = re.findall(r"^\s*(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$", output, re.MULTILINE)
    if not paths:
        raise GuestBuildError(f"ldd {binary} names no libraries:\n{output}")
    return {path.lstrip("/"): Path(path).read_bytes() for path in paths}


def _ensure_initrd(modules: list[Path]) -> Path:
    """The initramfs with `init.sh`, qemu-ga and `modules` (loaded in this order), named by a
    hash of its files and of qemu-ga's package version."""
    if not BUSYBOX.is_file():
        raise GuestBuildError(f"{BUSYBOX} is missing: install the Debian package busybox-static")
    qemu_ga_version, qemu_ga = _ensure_qemu_ga()
    files = {
        "init": INIT_SCRIPT.read_bytes(),
        "bin/busybox": BUSYBOX.read_bytes(),
        **{f"bin/{script}": (GUEST_DIR / script).read_bytes() for script in GUEST_SCRIPTS},
        QEMU_GA: qemu_ga.read_bytes(),
        **_shared_libraries(qemu_ga),
        "lib/modules/order": "".join(f"{module.name}\n" for module in modules).encode(),
        **{f"lib/modules/{module.name}": module.read_bytes() for module in modules},
    }
    digest = hashlib.sha256(qemu_ga_version.encode() + b"\0")
    for name, content in files.items():
        digest.update(name.encode() + b"\0" + content)
    target = BUILD_DIR / f"initrd-{digest.hexdigest()[:12]}.cpio.gz"
    if target.exists():
        return target
    partial = target.with_suffix(".partial")
    # Compressed, the blob the kernel holds while it unpacks takes 3.8 MB, not 8.6: the cloud
    # guest boots in 80 MiB again (an uncompressed one needed 96, the watchdog guest more).
    partial.write_bytes(gzip.compress(_initramfs(files), mtime=0))
    partial.replace(target)
    return target


def _initramfs(files: dict[str, bytes]) -> bytes:
    """A newc cpio archive: the directories, /dev/console, /bin/sh and the given files (0755)."""
    archive = _CpioWriter()
    directories = {"dev", "proc", "run", "sys", "tmp"}
    for name in files:
        directories.update(str(parent) for parent in Path(name).parents if parent != Path("."))
    for directory in sorted(directories):  # a parent sorts before its children
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, device=(5, 1))
    archive.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    for name, content in files.items():
        archive.add(name, stat.S_IFREG | 0o755, content)
    return archive.finish()


class _CpioWriter:
    """Writes the 'newc' (070701) cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._inode = 1

    def add(
        self, name: str, mode: int, data: bytes = b"", device: tuple[int, int] = (0, 0)
    ) -> None:
        encoded_name = name.encode() + b"\0"
        fields = (
            self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, device[0], device[1],
            len(encoded_name), 0,
        )  # fmt: skip
        self._inode += 1
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        self._chunks.append(_pad4(header + encoded_name))
        self._chunks.append(_pad4(data))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _pad4(chunk: bytes) -> bytes:
    return chunk + b"\0" * (-len(chunk) % 4)


def main() -> int:
    try:
        images = {"guest": ensure_guest_image(), "watchdog guest": ensure_watchdog_guest_image()}
    except GuestBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, image in images.items():
        print(f"{name} kernel: {image.kernel}")
        print(f"{name} initrd: {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
