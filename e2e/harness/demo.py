"""`make demo`: the reference cluster in one command, as a guided tour.

    python -m e2e.harness.demo up    # start, apply the reference setup, migrate, fail over
    python -m e2e.harness.demo down  # remove everything `up` started

`up` starts an `e2e.harness.cluster.Cluster` in the reference topology (`e2e.harness.topology`:
host1 and host2 run the VMs, a storage host serves iSCSI; each of the three runs an etcd member, an
agent and a controller; one IPMI BMC per KVM host), applies deploy/examples/demo/ (templates filled
in with the lab's addresses), waits for the four VMs, live-migrates vm1, pulls the power of the host
running vm1 (whatever etcd or controller role it holds: the tour says which) and streams the
failover's events until every VM runs again. The cluster keeps running afterwards, detached from
this process; its PIDs, namespaces, links and directories are recorded in .run/demo/cluster.json (or
`--run-dir DIR`) for `down`. `up` removes a previous demo first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import string
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

from controller.cli.status_checks import ALL_NODES_LOST, NO_LEADER
from controller.runtime.store import Store, StoreError, Unavailable
from crds import Event, IscsiTarget, VirtualMachine, VolumeGroup
from e2e.guest.build import KERNEL_CMDLINE, ensure_guest_image
from e2e.guest.console import read_ticks, tick_gaps
from e2e.harness import polling
from e2e.harness.cluster import KVMCTL, Cluster, controller_available
from e2e.harness.detached import teardown_detached
from e2e.harness.hosts import REPO_ROOT
from e2e.harness.topology import REFERENCE, roles, topology_cluster

DEFAULT_RUN_DIR = REPO_ROOT / ".run" / "demo"
STATE_FILE_NAME = "cluster.json"
TEMPLATES = REPO_ROOT / "deploy" / "examples" / "demo"
KVM_HOSTS = REFERENCE.kvm_hosts
VMS = ("vm1", "vm2", "vm3", "vm4")
VM_MANIFEST = "40-vms.yaml"
LUN_MIB = 64
SHARED_DISK_MIB = 256
DEADLINE = 150.0
"""Generous: the machine has two cores and may be busy with other work."""

T = TypeVar("T")


class DemoError(RuntimeError):
    """A step of the tour did not reach its goal; the message says which."""


eventually = partial(
    polling.eventually, timeout=DEADLINE, interval=0.2, error=DemoError, retry_on=(Unavailable,)
)
"""Reads ride out etcd's election when the killed host held etcd's leader."""


class Tour:
    """Prints the tour: numbered steps with elapsed time, commands as they are run."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.bold = sys.stdout.isatty()

    def step(self, title: str) -> None:
        elapsed = time.monotonic() - self.started
        text = f"==> [{elapsed:5.1f}s] {title}"
        print(f"\n\033[1m{text}\033[0m" if self.bold else f"\n{text}", flush=True)

    def note(self, text: str) -> None:
        print(f"    {text}", flush=True)


class Demo:
    def __init__(self, cluster: Cluster, store: Store, tour: Tour) -> None:
        self.cluster = cluster
        self.store = store
        self.tour = tour
        self.env = {**os.environ, **cluster.kvmctl_env()}

    async def kvmctl(self, *args: str, ok: tuple[int, ...] = (0,)) -> None:
        """Run a kvmctl command from the root namespace, its output straight to the terminal;
        an exit code not in `ok` fails the demo."""
        print(f"$ kvmctl {shlex.join(args)}", flush=True)
        process = await asyncio.create_subprocess_exec(
            KVMCTL, *args, env=self.env, stdin=asyncio.subprocess.DEVNULL
        )
        if await process.wait() not in ok:
            raise DemoError(f"`kvmctl {shlex.join(args)}` exited with {process.returncode}")

    async def status(self) -> None:
        if await _has_command("status"):
            await self.kvmctl("status", ok=(0, NO_LEADER, ALL_NODES_LOST))  # shown, not judged
        else:
            await self.kvmctl("get", "clusternode")
            await self.kvmctl("get", "virtualmachine", "-o", "wide")

    async def vms(self) -> dict[str, VirtualMachine]:
        objects, _ = await self.store.list_objects("VirtualMachine")
        return {o.metadata.name: o for o in objects if isinstance(o, VirtualMachine)}

    async def running_nodes(self, avoid: str | None = None) -> dict[str, str] | None:
        """VM name -> node for every VM, once each runs (on a node other than `avoid`)."""
        nodes = {}
        for name, vm in (await self.vms()).items():
            if vm.status.state != "Running" or vm.status.node in (None, avoid):
                return None
            nodes[name] = str(vm.status.node)
        return nodes if set(nodes) == set(VMS) else None

    async def print_roles(self) -> dict[str, list[str]]:
        """Print (and return) which host holds etcd's leader and the leading controller."""

        async def elected() -> dict[str, list[str]] | None:
            held = await roles(self.cluster, self.store)
            leaders = [role for names in held.values() for role in names if "lead" in role]
            return held if len(leaders) == 2 else None

        held: dict[str, list[str]] = await eventually(elected, "an etcd and a controller leader")
        for host, names in held.items():
            self.tour.note(f"{host}: {', '.join(names)}")
        return held

    def qemu_summary(self) -> str:
        """Which qemu processes really run where (read from /proc, not from the store)."""
        parts = []
        for host in KVM_HOSTS:
            if self.cluster.host(host).is_running():
                guests = sorted(self.cluster.qemu_guests(host))
                parts.append(f"{host}: {', '.join(guests) or '-'}")
            else:
                parts.append(f"{host}: powered off")
        return "; ".join(parts)

    # The steps.

    async def apply_reference_setup(self, manifests: list[Path]) -> None:
        self.tour.step("Applying the hosts, fencing, bonds and storage (deploy/examples/demo/)")
        infrastructure = [path for path in manifests if path.name != VM_MANIFEST]
        await self.kvmctl("apply", *(f"-f={path}" for path in infrastructure))

        async def members_online() -> bool:
            objects, _ = await self.store.list_objects("ClusterNode")
            online = {o.metadata.name for o in objects if o.status.health == "Online"}
            return online >= set(KVM_HOSTS)

        await eventually(members_online, f"{', '.join(KVM_HOSTS)} Online")
        self.tour.note(
            "Every host's agent holds its heartbeat lease; the controllers elected a leader."
        )
        await self.print_roles()

        async def serving() -> bool:
            target = await self.store.try_get("IscsiTarget", "vmstore")
            ready = target.status.condition("Ready") if isinstance(target, IscsiTarget) else None
            return ready is not None and ready.status == "True"

        await eventually(serving, "IscsiTarget vmstore serving its LUNs")
        self.tour.note("The storage host's agent started tgtd and serves vmstore's four LUNs:")
        await self.kvmctl("get", "iscsitarget")

        async def vg_reported() -> bool:
            vg = await self.store.try_get("VolumeGroup", "vg-cluster")
            return isinstance(vg, VolumeGroup) and vg.status.condition("Ready") is not None

        await eventually(vg_reported, "VolumeGroup vg-cluster reconciled")
        self.tour.note(
            "vg_cluster and lv_vm1..lv_vm4 exist on a loop device all hosts see; this kernel has"
        )
        self.tour.note("no device-mapper, so LVM runs with activation off: metadata only, the")
        self.tour.note("VMs use vmstore's LUNs (libvirt iSCSI network disks) instead of the LVs.")
        await self.kvmctl("get", "volumegroup")

        async def bonds_reported() -> bool:
            objects, _ = await self.store.list_objects("Bond")
            return len(objects) == len(KVM_HOSTS) and all(
                o.status.condition("Ready") is not None for o in objects
            )

        await eventually(bonds_reported, "every Bond reconciled")
        self.tour.note("bond0 under br0 is declared on every host, but this kernel has no bonding")
        self.tour.note("driver: the agents say so (BondingUnsupported) and change nothing.")
        await self.kvmctl("get", "bond")

    async def start_vms(self, manifests: list[Path]) -> dict[str, str]:
        self.tour.step("Applying vm1..vm4 (TCG guests; failover domains kvm-node1 and kvm-node2)")
        vms = [path for path in manifests if path.name == VM_MANIFEST]
        await self.kvmctl("apply", *(f"-f={path}" for path in vms))
        nodes: dict[str, str] = await eventually(self.running_nodes, "vm1..vm4 Running")
        for vm in VMS:
            await eventually(partial(_latest_tick, self.cluster, vm), f"{vm} console ticking")
        self.tour.note(f"qemu processes: {self.qemu_summary()}")
        await self.status()
        return nodes

    async def migrate_vm1(self, nodes: dict[str, str]) -> str:
        """Migrate vm1 to the other KVM host; the host it runs on afterwards."""
        target = next(host for host in KVM_HOSTS if host != nodes["vm1"])
        self.tour.step(f"Live-migrating vm1 from {nodes['vm1']} to {target}")
        before = await eventually(lambda: _latest_tick(self.cluster, "vm1"), "vm1 ticking")
        await self.kvmctl("migrate", "vm1", "--to", target, "--wait")
        after = await eventually(
            lambda: _latest_tick(self.cluster, "vm1", above=before + 10), "vm1 ticking on"
        )
        ticks = read_ticks(self.cluster.serial_log("vm1"))
        gaps = tick_gaps(ticks)
        self.tour.note(
            f"vm1's console counter went on from tick {before} to {after} "
            + ("without a gap: the guest never stopped." if not gaps else f"(gaps: {gaps})")
        )
        self.tour.note(f"qemu processes: {self.qemu_summary()}")
        return target

    async def fail_over(self, victim: str) -> float:
        self.tour.step(f"Pulling {victim}'s power (SIGKILL of its namespace init)")
        held = (await self.print_roles())[victim]
        self.tour.note(
            f"{victim} runs vm1 and holds: {', '.join(held)}; its etcd member, agent and "
            "controller die with it."
        )
        before = await self.vms()
        lost = sorted(name for name, vm in before.items() if vm.status.node == victim)
        self.tour.note(f"VMs on {victim}: {', '.join(lost) or 'none'}. The events (what")
        self.tour.note("`kvmctl events --watch` streams), timed from the power cut, until every")
        self.tour.note("VM runs again elsewhere:")
        revision = await self.store.revision()
        killed_at = time.monotonic()
        printer = asyncio.create_task(self.print_events(revision + 1, killed_at))
        try:
            await asyncio.to_thread(self.cluster.kill_host, victim)
            await eventually(partial(self.running_nodes, avoid=victim), "every VM Running again")
            for vm in lost:
                await eventually(partial(_latest_tick, self.cluster, vm), f"{vm} ticking")
            recovered = time.monotonic() - killed_at
            await asyncio.sleep(0.5)  # let the recovery's last events reach the terminal
        finally:
            printer.cancel()
            await asyncio.gather(printer, return_exceptions=True)
        self.tour.note(f"qemu processes: {self.qemu_summary()}")
        return recovered

    async def print_events(self, revision: int, since: float) -> None:
        print(f"  {'AFTER':>7}  {'TYPE':<8} {'REASON':<22} {'OBJECT':<26} MESSAGE", flush=True)
        async for change in self.store.watch("Event", revision):
            event = change.object
            if change.type == "DELETED" or not isinstance(event, Event):
                continue
            spec = event.spec
            involved = f"{spec.involved_object.kind.lower()}/{spec.involved_object.name}"
            count = f" (x{spec.count})" if spec.count > 1 else ""
            print(
                f"  {time.monotonic() - since:6.1f}s  {spec.type:<8} {spec.reason:<22} "
                f"{involved:<26} {spec.message}{count}",
                flush=True,
            )


async def _latest_tick(cluster: Cluster, vm: str, above: int = -1) -> int | None:
    ticks = await asyncio.to_thread(read_ticks, cluster.serial_log(vm))
    return ticks[-1] if ticks and ticks[-1] > above else None


async def _has_command(name: str) -> bool:
    process = await asyncio.create_subprocess_exec(
        KVMCTL, name, "--help",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await process.wait() == 0


def render_manifests(cluster: Cluster, run_dir: Path) -> list[Path]:
    """Fill the demo templates with this cluster's addresses, ports and paths."""
    image = ensure_guest_image()
    lun_dir = run_dir / "luns"
    lun_dir.mkdir(parents=True, exist_ok=True)
    for vm in VMS:
        with open(lun_dir / f"{vm}.img", "wb") as lun:
            lun.truncate(LUN_MIB << 20)
    values = {
        "BMC_PASSWORD": cluster.bmc_password,
        "BMC_ADDRESS": cluster.lab.gateway_address,
        "BMC_USER": cluster.bmc("host1").user,
        "STORAGE_ADDRESS": cluster.host("storage").address,
        "LUN_DIR": str(lun_dir),
        "SHARED_DISK": str(cluster.shared_disk),
        "GUEST_KERNEL": str(image.kernel),
        "GUEST_INITRD": str(image.initrd),
        "GUEST_CMDLINE": KERNEL_CMDLINE,
    }
    for index, host in enumerate(KVM_HOSTS, start=1):
        values[f"HOST{index}_ADDRESS"] = cluster.host(host).address
        values[f"HOST{index}_BMC_PORT"] = str(cluster.bmc(host).port)
    destination = run_dir / "manifests"
    destination.mkdir(parents=True, exist_ok=True)
    rendered = []
    for template in sorted(TEMPLATES.glob("*.yaml")):
        text = string.Template(template.read_text()).substitute(values)
        rendered.append(destination / template.name)
        rendered[-1].write_text(text)
    return rendered


async def up(tour: Tour, run_dir: Path) -> int:
    if (run_dir / STATE_FILE_NAME).exists():
        tour.step("A previous demo is still up: removing it first")
        await asyncio.to_thread(down_quietly, run_dir)
    tour.step("Building the test guest (Debian cloud kernel + busybox initramfs; cached)")
    image = await asyncio.to_thread(ensure_guest_image)
    tour.note(f"kernel {image.kernel}")
    tour.step(
        f"Starting the reference topology: {', '.join(KVM_HOSTS)} and a storage host "
        "(namespaces, libvirtd, an etcd member, kvmctl agent"
        + (", kvmctl controller" if controller_available() else "")
        + " on each; the storage host's agent runs tgtd) and one IPMI BMC per KVM host"
    )
    cluster = topology_cluster("reference", shared_disk_mib=SHARED_DISK_MIB)
    await asyncio.to_thread(cluster.start)
    cluster.detach(run_dir / STATE_FILE_NAME)  # from here on, `down` can remove it whatever happens
    try:
        return await tour_cluster(cluster, tour, run_dir)
    except BaseException:
        print("\nThe demo failed: removing the cluster.", file=sys.stderr, flush=True)
        await asyncio.to_thread(down_quietly, run_dir)
        raise


async def tour_cluster(cluster: Cluster, tour: Tour, run_dir: Path) -> int:
    for host in cluster.lab.hosts:
        address = cluster.host(host).address
        extra = (
            f", BMC {cluster.bmc(host).address}:{cluster.bmc(host).port}/udp"
            if host in KVM_HOSTS
            else ""
        )
        tour.note(f"{host}: {address}{extra} (logs in {cluster.host(host).dir})")
    if not cluster.controllers:
        tour.note("`kvmctl controller` is not in this kvmctl yet: nothing will place the VMs.")
    manifests = await asyncio.to_thread(render_manifests, cluster, run_dir)
    async with Store(cluster.etcd_endpoints, prefix=cluster.prefix) as store:
        demo = Demo(cluster, store, tour)
        await demo.apply_reference_setup(manifests)
        nodes = await demo.start_vms(manifests)
        victim = await demo.migrate_vm1(nodes)
        recovered = await demo.fail_over(victim)
        tour.step(f"Every VM runs again, {recovered:.1f} s after {victim} lost its power")
        await demo.status()
    endpoints = ",".join(cluster.etcd_endpoints)
    tour.step("Done. The cluster keeps running; `make demo-down` removes it. Try:")
    print(f"    export KVMCTL_ETCD={endpoints} KVMCTL_PREFIX={cluster.prefix}")
    print(f"    .venv/bin/kvmctl get vm -o wide; .venv/bin/kvmctl describe clusternode {victim}")
    print("    .venv/bin/kvmctl get leader; .venv/bin/kvmctl events --watch")
    return 0


def down_quietly(run_dir: Path) -> list[str]:
    """Remove a detached demo cluster and the demo's files; the problems met."""
    state_file = run_dir / STATE_FILE_NAME
    problems = teardown_detached(state_file) if state_file.exists() else []
    shutil.rmtree(run_dir, ignore_errors=True)
    return problems


def down(run_dir: Path) -> int:
    if not (run_dir / STATE_FILE_NAME).exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        print("No demo cluster is up.")
        return 0
    problems = down_quietly(run_dir)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print("Demo cluster removed." if not problems else "Demo cluster removed, with warnings.")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.harness.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help="where the demo keeps its state, manifests and LUNs (default .run/demo)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the demo needs root (namespaces, libvirtd, loop devices)", file=sys.stderr)
        return 1
    if args.action == "down":
        return down(args.run_dir.resolve())
    try:
        return asyncio.run(up(Tour(), args.run_dir.resolve()))
    except (DemoError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
