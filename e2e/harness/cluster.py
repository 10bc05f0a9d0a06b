"""A whole kvmctl cluster on one machine: etcd, simulated KVM hosts, a storage host, BMCs.

`Cluster` builds on `e2e.harness.lab.Lab`:

- etcd, in one of two places: by default a local etcd outside the hosts, which they reach on the lab
  gateway (`lab.start_etcd()`); with `etcd_hosts`, one member inside each of those hosts
  (`e2e.harness.host_etcd`), as users run it: a host's power cut kills its member, a power-on
  rejoins it as the same member. `e2e.harness.topology` names the two shapes users run (`reference`,
  `three-hosts`);
- KVM hosts (default host1..host3), each running `kvmctl agent --domain-type qemu` and, once
  the CLI has it, `kvmctl controller` (the controllers elect one leader among themselves); with
  etcd inside the hosts, every host runs a controller, the storage host included;
- a storage host whose agent starts tgtd (`--tgtd-portal`), so IscsiTarget objects bound to it
  are served from inside its namespace;
- one simulated IPMI BMC (`e2e.harness.bmc_process`) per KVM host, listening on the lab
  gateway: powering the chassis off SIGKILLs that host's namespace init, so `fence_ipmilan` run
  by a controller on another host really pulls the power;
- optionally a shared disk: a loop device every agent may use for LVM metadata (this kernel has
  no device-mapper: LVM runs with activation off in a private lvm.conf that sees only it);
- on each KVM host a veth pair `eth1`/`eth2`, free NICs for Bond objects to enslave (the host's
  `eth0` carries the cluster network).

Failure injection for chaos tests: `kill_host` (pull the power), `cut_network`, `restore`
(plug the cable back in, or power the host on again with its agent, controller and BMC).

In-process use: `with Cluster() as cluster: ...` removes everything on exit. The demo outlives
its Python process instead: `detach(state_file)` records every PID (with its start time, so a
reused PID is never signalled), namespace, link, loop device and directory, and
`e2e.harness.detached.teardown_detached(state_file)` removes them later from another process.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from e2e.harness.bmc_process import BmcEndpoint, BmcProcess
from e2e.harness.detached import DetachedState, detach_loop, record_process
from e2e.harness.etcd import EtcdCluster
from e2e.harness.host_etcd import HostEtcd
from e2e.harness.host_support import LabError, route_inside
from e2e.harness.hosts import SimulatedHost
from e2e.harness.lab import Lab

DEFAULT_PREFIX = "/kvmctl"
KVMCTL = str(Path(sys.executable).parent / "kvmctl")
ISCSI_PORT = 3260
TGTD_CONTROL_PORT = 4001
"""tgtd's `-C` port on the storage host; its /run is private, so no other tgtd can collide."""
BOND_SLAVES = ("eth1", "eth2")
"""A veth pair created in every KVM host: NICs a Bond may enslave without cutting eth0."""
START_TIMEOUT = 60.0


class ClusterError(RuntimeError):
    """Part of the cluster could not be started, driven or removed."""


class Cluster:
    """etcd, KVM hosts with agents (and controllers), a storage host with tgtd, BMCs.

    `etcd_hosts`: run one etcd member inside each of these hosts instead of the etcd outside
    (`etcd_members` is for the etcd outside only); `etcd_args` go to either.
    """

    def __init__(
        self,
        kvm_hosts: Sequence[str] = ("host1", "host2", "host3"),
        storage_host: str | None = "storage",
        *,
        controllers: bool = True,
        shared_disk_mib: int | None = None,
        prefix: str = DEFAULT_PREFIX,
        agent_args: Sequence[str] = (),
        etcd_members: int = 1,
        etcd_args: Sequence[str] = (),
        etcd_hosts: Sequence[str] = (),
    ) -> None:
        self.kvm_hosts = list(kvm_hosts)
        self.storage_host = storage_host
        self.lab = Lab([*self.kvm_hosts, *([storage_host] if storage_host else [])])
        self.etcd_hosts = list(etcd_hosts)
        unknown = sorted(set(self.etcd_hosts) - set(self.lab.hosts))
        if unknown or len(set(self.etcd_hosts)) != len(self.etcd_hosts):
            raise ClusterError(f"etcd_hosts must be distinct hosts of the cluster: {etcd_hosts}")
        if self.etcd_hosts and etcd_members != 1:
            raise ClusterError("etcd_members is for the etcd outside the hosts, not etcd_hosts")
        self.prefix = prefix
        self.serial_dir = self.lab.root / "serial"
        self.lvm_system_dir = self.lab.root / "lvm"
        self.bmc_password = secrets.token_urlsafe(12)
        self.shared_disk: str | None = None
        """The loop device standing for shared storage, when `shared_disk_mib` was given."""
        self.agents: dict[str, int] = {}
        """Host name -> root-namespace PID of its `kvmctl agent`."""
        self.controllers: dict[str, int] = {}
        """Host name -> root-namespace PID of its `kvmctl controller`."""
        self.etcd: EtcdCluster | None = None
        """The etcd outside the hosts (None with `etcd_hosts`)."""
        self.host_etcd: HostEtcd | None = None
        """The members inside the hosts (with `etcd_hosts`)."""
        self._want_controllers = controllers
        self._shared_disk_mib = shared_disk_mib
        self._agent_args = list(agent_args)
        self._etcd_members = etcd_members
        self._etcd_args = list(etcd_args)
        self._bmcs: dict[str, BmcProcess] = {}
        self._detached = False

    # Addresses and access.

    def host(self, name: str) -> SimulatedHost:
        return self.lab[name]

    @property
    def etcd_endpoints(self) -> list[str]:
        """etcd as reached from the root namespace (tests, the CLI)."""
        if self.host_etcd is not None:
            return self.host_etcd.endpoints
        if self.etcd is None:
            raise ClusterError("the cluster is not started")
        return self.etcd.endpoints

    @property
    def host_etcd_endpoints(self) -> list[str]:
        """etcd as reached from inside the hosts."""
        if self.host_etcd is not None:
            return self.host_etcd.endpoints
        if self.etcd is None:
            raise ClusterError("the cluster is not started")
        return self.lab.host_etcd_endpoints(self.etcd)

    def runs_controller(self, name: str) -> bool:
        """Whether host `name` runs `kvmctl controller`: every KVM host, and with etcd inside
        the hosts every host (the storage host too)."""
        wanted = name in self.kvm_hosts or bool(self.etcd_hosts)
        return wanted and self._want_controllers and controller_available()

    def kvmctl_env(self) -> dict[str, str]:
        """Environment for `kvmctl` commands run from the root namespace."""
        return {"KVMCTL_ETCD": ",".join(self.etcd_endpoints), "KVMCTL_PREFIX": self.prefix}

    @property
    def tgtd_portal(self) -> str:
        """The iSCSI portal tgtd serves on the storage host."""
        if self.storage_host is None:
            raise ClusterError("this cluster has no storage host")
        return f"{self.lab[self.storage_host].address}:{ISCSI_PORT}"

    def bmc(self, host: str) -> BmcEndpoint:
        return self._bmcs[host].endpoint

    def qemu_guests(self, host: str) -> dict[str, int]:
        """Guest name -> qemu PID of the guests running on `host`."""
        return self.lab[host].qemu_guests()

    def serial_log(self, vm: str) -> Path:
        """The guest's console, appended to across hosts and boots."""
        return self.serial_dir / f"{vm}.log"

    # Life cycle.

    def start(self) -> Self:
        try:
            self.lab.start()
            if self.etcd_hosts:
                self.host_etcd = HostEtcd(
                    [self.lab[name] for name in self.etcd_hosts],
                    self._etcd_args,
                    token=f"kvmctl-{self.lab.lab_id}",
                )
                self.host_etcd.start()
            else:
                self.etcd = self.lab.start_etcd(self._etcd_members, self._etcd_args)
            self.serial_dir.mkdir()
            self._write_lvm_conf()
            for name in self.kvm_hosts:
                self._add_bond_slaves(self.lab[name])
                self._start_bmc(name)
            for name in self.lab.hosts:
                self._start_daemons(name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove everything the cluster started. Idempotent; not after `detach`."""
        if self._detached:
            return
        failures = []
        while self._bmcs:
            self._bmcs.popitem()[1].stop()
        try:
            # Hosts (with everything inside: SIGKILL of each init also kills its etcd member,
            # so no 3.4 leader lingers after its peers), etcd outside, links, namespaces, dirs.
            self.lab.cleanup()
        except LabError as error:
            failures.append(str(error))
        if self.host_etcd is not None:
            self.host_etcd.remove_data()
        if self.shared_disk is not None:
            problem = detach_loop(self.shared_disk)
            if problem:
                failures.append(problem)
            self.shared_disk = None
        if failures:
            raise ClusterError("; ".join(failures))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Failure injection.

    def kill_host(self, name: str) -> None:
        """Pull the power: every process of the host dies at once (agent, controller, guests)."""
        host = self.lab[name]
        host.kill()
        host.wait_dead()
        self.agents.pop(name, None)
        self.controllers.pop(name, None)
        if self.host_etcd is not None:
            self.host_etcd.forget(name)

    def restart_controller(self, name: str) -> None:
        """Stop the host's controller (SIGTERM: a leader resigns, so another takes over at
        once) and start a new one, which joins as a follower."""
        host = self.lab[name]
        pid = self.controllers.pop(name)
        os.kill(pid, signal.SIGTERM)
        try:
            host.wait_exit(pid, START_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            host.wait_exit(pid, START_TIMEOUT)
        self._spawn_controller(host)

    def cut_network(self, name: str) -> None:
        """Unplug the host's cable; it keeps running, cut off from etcd and its peers."""
        self.lab[name].cut_network()

    def restore(self, name: str) -> None:
        """Undo a failure: plug the cable back in, or power the host on again if it is off."""
        host = self.lab[name]
        host.restore_network()
        if host.is_running():
            return
        host.wait_dead()  # reaps what is left of the previous power-on
        host.start()
        if name in self._bmcs:
            self._restart_bmc(name)
        if self.host_etcd is not None and name in self.etcd_hosts:
            self.host_etcd.start_member(name)  # from its data dir: the same member again
        self._start_daemons(name)

    # Detaching (the demo).

    def detach(self, state_file: Path) -> DetachedState:
        """Leave everything running after this process exits; record it in `state_file`."""
        state = DetachedState(etcd_endpoints=self.etcd_endpoints, prefix=self.prefix)
        for bmc_host, bmc in self._bmcs.items():
            state.processes.append(
                record_process(f"BMC of {bmc_host}", bmc.process.pid, signal.SIGTERM)
            )
        if self.host_etcd is not None:  # they die with their hosts; SIGKILL: no leader lingers
            for member_host, pid in self.host_etcd.pids.items():
                state.processes.append(
                    record_process(f"etcd on {member_host}", pid, signal.SIGKILL)
                )
        for name, host in self.lab.hosts.items():
            if host.is_running():
                state.processes.append(
                    record_process(f"host {name}", host.init_pid, signal.SIGKILL)
                )
        etcd_root = self.host_etcd.root if self.host_etcd is not None else None
        if self.etcd is not None:
            etcd_root = self.etcd.root
            for member in self.etcd.members:
                if member.process is not None and member.process.poll() is None:
                    state.processes.append(
                        record_process(f"etcd {member.name}", member.process.pid, signal.SIGTERM)
                    )
        state.network_namespaces = [host.netns for host in self.lab.hosts.values()]
        state.links = [host.uplink for host in self.lab.hosts.values()] + [self.lab.bridge]
        state.loop_devices = [self.shared_disk] if self.shared_disk else []
        state.directories = [str(self.lab.root), *([str(etcd_root)] if etcd_root else [])]
        state.save(state_file)
        self._detached = True
        return state

    # Internals.

    def _write_lvm_conf(self) -> None:
        """A private lvm.conf: no activation (no device-mapper here), only the shared disk."""
        self.lvm_system_dir.mkdir()
        accepted = ""
        if self._shared_disk_mib is not None:
            image = self.lab.root / "shared-disk.img"
            with open(image, "wb") as file:
                file.truncate(self._shared_disk_mib << 20)
            self.shared_disk = _run(["losetup", "--find", "--show", str(image)]).strip()
            accepted = f'"a|^{self.shared_disk}$|", '
        (self.lvm_system_dir / "lvm.conf").write_text(
            "global { activation = 0 }\n"
            f"devices {{ obtain_device_list_from_udev = 0 use_devicesfile = 0 "
            f'global_filter = [ {accepted}"r|.*|" ] }}\n'
            "backup { backup = 0 archive = 0 }\n"
        )

    def _add_bond_slaves(self, host: SimulatedHost) -> None:
        with route_inside(host.netns) as inside:
            first, second = BOND_SLAVES
            inside.link("add", ifname=first, kind="veth", peer={"ifname": second})

    def _start_daemons(self, name: str) -> None:
        host = self.lab[name]
        self.agents[name] = host.spawn(self._agent_argv(name), log_path=host.dir / "agent.log")
        if self.runs_controller(name):
            self._spawn_controller(host)

    def _spawn_controller(self, host: SimulatedHost) -> None:
        self.controllers[host.name] = host.spawn(
            self._controller_argv(host.name), log_path=host.dir / "controller.log"
        )

    def _global_args(self) -> list[str]:
        return [KVMCTL, "--etcd", ",".join(self.host_etcd_endpoints), "--prefix", self.prefix]

    def _agent_argv(self, name: str) -> list[str]:
        argv = [
            *self._global_args(), "agent", "--node", name,
            "--libvirt-uri", "qemu:///system", "--domain-type", "qemu",
            "--serial-log-dir", str(self.serial_dir),
            "--lvm-system-dir", str(self.lvm_system_dir),
        ]  # fmt: skip
        if self.shared_disk is not None:
            argv += ["--lvm-device", self.shared_disk]
        if name == self.storage_host:
            argv += [
                "--tgtd-portal",
                self.tgtd_portal,
                "--tgtd-control-port",
                str(TGTD_CONTROL_PORT),
            ]
        return argv + self._agent_args

    def _controller_argv(self, name: str) -> list[str]:
        """In the field topology (etcd inside the hosts) `--node` makes each controller hear
        (and send) the direct heartbeats on the host's cluster address, UDP 7480 across the lab
        bridge, and run the standby watch. Lab clusters (etcd outside the hosts) keep the
        lease-only detection their chaos tests were written for."""
        argv = [*self._global_args(), "controller", "--identity", name]
        return argv + (["--node", name] if self.host_etcd is not None else [])

    def _start_bmc(self, name: str, port: int = 0) -> None:
        password_file = self.lab.root / "bmc-password"
        if not password_file.exists():
            password_file.touch(mode=0o600)
            password_file.write_text(self.bmc_password)
        self._bmcs[name] = BmcProcess.start(
            name, self.lab[name].init_pid, self.lab.gateway_address, password_file, port
        )

    def _restart_bmc(self, name: str) -> None:
        """A new BMC on the same port, powering the host's new init off (fencing parameters
        naming the port stay valid)."""
        bmc = self._bmcs.pop(name)
        bmc.stop()
        self._start_bmc(name, bmc.endpoint.port)


def controller_available() -> bool:
    """True once the CLI has `kvmctl controller` (a colleague's work in progress)."""
    result = subprocess.run(
        [KVMCTL, "controller", "--help"], capture_output=True, check=False, timeout=60
    )
    return result.returncode == 0


def _run(argv: Sequence[str]) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise ClusterError(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout
