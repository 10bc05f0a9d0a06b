"""Fault injection on a whole kvmctl cluster, and the two-copies checker.

Built on `e2e.harness.cluster.Cluster` (used by the chaos tests, the failover benchmark and the
soak):

- `ChaosCluster` adds what the plain cluster lacks: a timing profile given to etcd, every agent and
  every controller (`DEFAULT_PROFILE`, `TUNED_PROFILE`); a 3-member etcd; a watchdog stand-in per
  host (`e2e/harness/watchdog.py`) fed by the host's agent (`--watchdog`); controllers on chosen
  hosts only; and the faults `kill_agent`, `stop_agent`, `kill_controller`, `kill_etcd_member`. Its
  `restore` also restarts an agent or controller that was killed on a host that stayed up.
- `TwoCopiesChecker` is a thread sampling every host's qemu processes (one scan of /proc per
  sample, every 100 ms by default). It records every sample in which one VM has a qemu process
  on two hosts at once (an `Overlap`), and when each VM's qemu first appeared on a host
  (`first_seen`), which the benchmark uses to time failovers.
- Object builders shared by the tests, bench and soak: `ipmi_node`, `guest_vm`, `ipmi_secret`.

Everything is synchronous like the harness; async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.fencing import FENCING_USAGE, USAGE_LABEL
from controller.ha.environment import HaTimings
from controller.runtime import layout_keys
from controller.runtime.leader_record import ElectionTiming, current_leader
from controller.runtime.store import Store
from crds import ClusterNode, ObjectMeta, Secret, VirtualMachine
from crds.clusternode import ClusterNodeSpec
from crds.secret import SecretSpec
from crds.virtualmachine import VirtualMachineSpec
from e2e.guest.build import KERNEL_CMDLINE, GuestImage
from e2e.harness.cluster import DEFAULT_PREFIX, Cluster, ClusterError
from e2e.harness.etcd import EtcdMember
from e2e.harness.frozen import Frozen, alive
from e2e.harness.hosts import LabError, SimulatedHost, qemu_guest_name, wait_until

ELECTION_NAME = "controller"
"""The election every `kvmctl controller` campaigns in."""
IPMI_SECRET = "ipmi"


@dataclass(frozen=True)
class TimingProfile:
    """HA timings given alike to etcd, every agent and every controller."""

    name: str
    lease_ttl: int
    renew_interval: float
    self_fence_margin: float
    recovery_grace: float
    watchdog_timeout: float
    election_ttl: int
    etcd_args: tuple[str, ...] = ()

    def agent_args(self) -> list[str]:
        return [
            "--lease-ttl", str(self.lease_ttl),
            "--renew-interval", str(self.renew_interval),
            "--self-fence-margin", str(self.self_fence_margin),
        ]  # fmt: skip

    def controller_args(self) -> list[str]:
        return [
            "--lease-ttl", str(self.lease_ttl),
            "--renew-interval", str(self.renew_interval),
            "--self-fence-margin", str(self.self_fence_margin),
            "--recovery-grace", str(self.recovery_grace),
            "--watchdog-timeout", str(self.watchdog_timeout),
            "--election-ttl", str(self.election_ttl),
        ]  # fmt: skip


ETCD_MEMBER_CONFIG = Path(__file__).resolve().parents[2] / "deploy/etcd/etcd-member.env.example"


SHIPPED_RAFT_SETTINGS = ("ETCD_HEARTBEAT_INTERVAL", "ETCD_ELECTION_TIMEOUT", "ETCD_PRE_VOTE")


def shipped_etcd_timers(config: Path = ETCD_MEMBER_CONFIG) -> tuple[str, ...]:
    """The etcd flags for the heartbeat interval, election timeout and pre-vote that deploy/etcd
    ships, so the default profile runs etcd as a user following the docs does."""
    flags: list[str] = []
    for line in config.read_text().splitlines():
        name, _, value = line.partition("=")
        if name in SHIPPED_RAFT_SETTINGS:
            flag = name.removeprefix("ETCD_").lower().replace("_", "-")
            flags.append(f"--{flag}={value.strip().strip(chr(34))}")
    if len(flags) != len(SHIPPED_RAFT_SETTINGS):
        raise ValueError(f"{config}: not every one of {', '.join(SHIPPED_RAFT_SETTINGS)}")
    return tuple(flags)


_DEFAULTS = HaTimings()
DEFAULT_PROFILE = TimingProfile(
    "default",
    lease_ttl=int(_DEFAULTS.lease_ttl),
    renew_interval=_DEFAULTS.renew_interval,
    self_fence_margin=_DEFAULTS.self_fence_margin,
    recovery_grace=_DEFAULTS.recovery_grace,
    watchdog_timeout=_DEFAULTS.watchdog_timeout,
    election_ttl=ElectionTiming().ttl,
    etcd_args=shipped_etcd_timers(),
)
"""kvmctl's defaults (HaTimings, ElectionTiming) on the etcd settings deploy/etcd ships (100 ms
heartbeat, 500 ms election timeout, pre-vote; etcd 3.4's own: 1000 ms, no pre-vote)."""
TUNED_PROFILE = TimingProfile(
    "tuned",
    lease_ttl=1,
    renew_interval=0.25,
    self_fence_margin=0.25,
    recovery_grace=0.5,
    watchdog_timeout=0.5,
    election_ttl=4,
    etcd_args=("--heartbeat-interval=50", "--election-timeout=500"),
)
"""1 s leases (etcd's minimum needs its faster timers) and a shorter leader election (4 s: with
`kvmctl controller --election-ttl` the renew deadline stays 3.5 s, so 2 or 3 are refused)."""
PROFILES = {profile.name: profile for profile in (DEFAULT_PROFILE, TUNED_PROFILE)}


class ChaosCluster(Cluster):
    """A `Cluster` with a timing profile, optional 3-member etcd, watchdogs and more faults.

    The guests boot from kernel and initrd, without disks: agents run with `--no-storage`, except
    on `storage_host` (none by default), whose agent serves tgtd as in `Cluster`.
    """

    def __init__(
        self,
        kvm_hosts: Sequence[str] = ("host1", "host2", "host3"),
        *,
        profile: TimingProfile = DEFAULT_PROFILE,
        etcd_members: int = 1,
        watchdog: bool = False,
        controller_hosts: Sequence[str] | None = None,
        prefix: str = DEFAULT_PREFIX,
        etcd_hosts: Sequence[str] = (),
        storage_host: str | None = None,
    ) -> None:
        super().__init__(
            kvm_hosts,
            storage_host=storage_host,
            prefix=prefix,
            agent_args=profile.agent_args(),
            etcd_members=etcd_members,
            etcd_args=profile.etcd_args,
            etcd_hosts=etcd_hosts,
        )
        self.profile = profile
        self.etcd_members = etcd_members
        self.watchdog = watchdog
        self.controller_hosts = list(kvm_hosts if controller_hosts is None else controller_hosts)
        self._stopped_agents: dict[str, Frozen] = {}
        """Host -> its agent, stopped by `stop_agent`."""

    def stop(self) -> None:
        for name in list(self._stopped_agents):
            self.release_stopped_agent(name)
        super().stop()

    # Faults.

    def kill_agent(self, name: str) -> None:
        """SIGKILL the host's agent alone; its guests keep running."""
        os.kill(self.agents.pop(name), signal.SIGKILL)

    def stop_agent(self, name: str) -> None:
        """SIGSTOP the host's agent: it hangs, holding everything, feeding nothing.

        The agent's launcher (`nsenter`, outside the host) mirrors the stop and so cannot reap
        the agent once the host dies; a host whose init died waits for every process of its
        PID namespace to be reaped, so it would never finish dying. `restore` and `stop`
        continue the launcher (which continues the agent, if it still lives).
        """
        self._stopped_agents[name] = Frozen.freeze(self.agents[name])

    def release_stopped_agent(self, name: str) -> bool:
        """Continue the launcher of an agent stopped by `stop_agent` (see there), which
        continues the agent if it still lives; False if the agent was not stopped."""
        stopped = self._stopped_agents.pop(name, None)
        if stopped is None:
            return False
        stopped.thaw(f"agent of {name}")
        return True

    def agent_alive(self, name: str) -> bool:
        """Whether the host's agent process lives (a stopped one does; one that died with its
        host, or was killed, does not)."""
        return alive(self.agents.get(name))

    def kill_controller(self, name: str) -> None:
        """SIGKILL the controller of host `name`."""
        os.kill(self.controllers.pop(name), signal.SIGKILL)

    def kill_etcd_member(self, index: int) -> None:
        self._etcd_member(index).kill()

    def restart_etcd_member(self, index: int) -> None:
        """Start a killed member again with its data; wait until it is healthy."""
        member = self._etcd_member(index)
        member.start(state="existing")
        member.wait_healthy(60.0)

    def restore(self, name: str) -> None:
        """Power on / reconnect the host, and restart its agent or controller if they died."""
        host = self.lab[name]
        agent = self.agents.get(name)
        # A stopped agent dies only with its host: let the host finish dying.
        if self.release_stopped_agent(name) and not alive(agent):
            wait_until(lambda: not host.is_running(), 30.0, f"{name} powered off")
        super().restore(name)
        if not alive(self.agents.get(name)):
            self._spawn_agent(host)
        if name in self.controller_hosts and not alive(self.controllers.get(name)):
            self._spawn_controller(host)

    # Internals.

    def _etcd_member(self, index: int) -> EtcdMember:
        if self.etcd_hosts:
            raise ClusterError("etcd runs inside the hosts: kill or cut the host instead")
        if self.etcd is None:
            raise ClusterError("the cluster is not started")
        return self.etcd.members[index]

    def _start_daemons(self, name: str) -> None:
        host = self.lab[name]
        self._spawn_agent(host)
        if name in self.controller_hosts:
            self._spawn_controller(host)

    def _agent_argv(self, name: str) -> list[str]:
        argv = super()._agent_argv(name)
        return argv if name == self.storage_host else [*argv, "--no-storage"]

    def _spawn_agent(self, host: SimulatedHost) -> None:
        argv = self._agent_argv(host.name)
        if self.watchdog:
            host.stop_watchdog()  # the previous one watched the previous power-on's init
            fifo = host.start_watchdog(self.profile.watchdog_timeout)
            argv += ["--watchdog", str(fifo)]
        self.agents[host.name] = host.spawn(argv, log_path=host.dir / "agent.log")

    def _spawn_controller(self, host: SimulatedHost) -> None:
        argv = [*self._controller_argv(host.name), *self.profile.controller_args()]
        self.controllers[host.name] = host.spawn(argv, log_path=host.dir / "controller.log")


async def leader_host(store: Store) -> str | None:
    """The identity (host name) of the elected controller, None while there is none."""
    leader = await current_leader(
        store.client, layout_keys.absolute(store.prefix, layout_keys.leader(ELECTION_NAME))
    )
    return None if leader is None else leader.identity


# The two-copies checker.


@dataclass(frozen=True)
class Overlap:
    """One sample in which a VM had a qemu process on more than one host."""

    vm: str
    hosts: tuple[str, ...]
    at: float
    """time.monotonic() of the sample."""


class TwoCopiesChecker:
    """Samples every host's qemu processes every `period` s; records any VM seen twice.

    Use as a context manager (a daemon thread), or `start()` / `stop()`. `violations` lists every
    overlapping sample; `where(vm)` is where the VM ran at the last sample; `first_seen(vm,
    host, since)` is when its qemu was first seen on `host` at or after `since`.
    """

    def __init__(self, cluster: Cluster, period: float = 0.1) -> None:
        self.cluster = cluster
        self.period = period
        self.violations: list[Overlap] = []
        self.samples = 0
        self._latest: dict[str, tuple[str, ...]] = {}
        self._appearances: list[tuple[float, str, str]] = []  # (time, vm, host)
        self._last_seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TwoCopiesChecker:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="two-copies checker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def __enter__(self) -> TwoCopiesChecker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def where(self, vm: str) -> tuple[str, ...]:
        """Hosts running the VM's qemu at the last sample (sorted)."""
        with self._lock:
            return self._latest.get(vm, ())

    def running(self) -> dict[str, tuple[str, ...]]:
        """Every VM seen at the last sample -> its hosts."""
        with self._lock:
            return dict(self._latest)

    def first_seen(self, vm: str, host: str, since: float) -> float | None:
        """When the VM's qemu first appeared on `host` at or after `since` (monotonic)."""
        with self._lock:
            for at, name, where in self._appearances:
                if at >= since and name == vm and where == host:
                    return at
        return None

    def last_seen(self, vm: str, host: str) -> float | None:
        """When the VM's qemu was last seen on `host` (monotonic), None if never."""
        with self._lock:
            return self._last_seen.get((vm, host))

    def appearances(self, vm: str, since: float) -> list[tuple[float, str]]:
        """(time, host) of every start of the VM's qemu on a host at or after `since`."""
        with self._lock:
            return [
                (at, host) for at, name, host in self._appearances if name == vm and at >= since
            ]

    def wait_sample(self, timeout: float = 10.0) -> None:
        """Block until at least one more sample was taken."""
        target = self.samples + 1
        deadline = time.monotonic() + timeout
        while self.samples < target:
            if time.monotonic() > deadline:
                raise TimeoutError("the two-copies checker took no sample")
            time.sleep(self.period / 4)

    def _run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            self._sample(started)
            self._stopping.wait(max(0.0, started + self.period - time.monotonic()))

    def _sample(self, at: float) -> None:
        seen = qemu_processes_by_host(self.cluster.lab.hosts.values())
        vm_hosts: dict[str, list[str]] = {}
        for host, guests in seen.items():
            for vm in guests:
                vm_hosts.setdefault(vm, []).append(host)
        latest = {vm: tuple(sorted(hosts)) for vm, hosts in vm_hosts.items()}
        with self._lock:
            for vm, hosts in latest.items():
                for host in hosts:
                    self._last_seen[(vm, host)] = at
                    if host not in self._latest.get(vm, ()):
                        self._appearances.append((at, vm, host))
                if len(hosts) > 1:
                    self.violations.append(Overlap(vm, hosts, at))
            self._latest = latest
            self.samples += 1


def qemu_processes_by_host(hosts: Iterable[SimulatedHost]) -> dict[str, set[str]]:
    """Host name -> names of the guests with a live qemu process there (one scan of /proc)."""
    namespaces: dict[str, str] = {}
    for host in hosts:
        with contextlib.suppress(LabError, OSError):
            namespaces[os.readlink(f"/proc/{host.init_pid}/ns/pid")] = host.name
    seen: dict[str, set[str]] = {name: set() for name in namespaces.values()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            host_name = namespaces.get(os.readlink(f"/proc/{entry}/ns/pid"))
            if host_name is None:
                continue
            guest = _live_qemu_guest(int(entry))
        except OSError:  # gone meanwhile
            continue
        if guest is not None:
            seen[host_name].add(guest)
    return seen


def _live_qemu_guest(pid: int) -> str | None:
    """The guest name of a live (not exiting, not zombie) qemu process, else None."""
    if not alive(pid):
        return None
    return qemu_guest_name(pid) or None


# Objects.


def ipmi_secret(password: str, name: str = IPMI_SECRET) -> Secret:
    return Secret(
        metadata=ObjectMeta(name=name, labels={USAGE_LABEL: FENCING_USAGE}),
        spec=SecretSpec.model_validate({"data": {"password": password}}),
    )


def ipmi_node(
    cluster: Cluster,
    name: str,
    *,
    secret: str = IPMI_SECRET,
    self_fence: bool = False,
    power_wait: int | None = None,
) -> ClusterNode:
    """A ClusterNode fenced by fence_ipmilan through its simulated BMC (password in `secret`),
    or relying on self-fencing with `self_fence` (the method stays declared, unused)."""
    bmc = cluster.bmc(name)
    parameters = {
        "ip": bmc.address,
        "ipport": str(bmc.port),
        "username": bmc.user,
        "lanplus": "1",
    }
    if power_wait is not None:
        parameters["power_wait"] = str(power_wait)
    device = {
        "agent": "fence_ipmilan",
        "parameters": parameters,
        "secretParameters": {"password": {"name": secret, "key": "password"}},
        "timeoutSeconds": 20,
    }
    spec = {
        "addresses": {"cluster": cluster.host(name).address},
        "libvirtUri": cluster.host(name).libvirt_tcp_uri,
        "fencing": {"methods": [{"name": "ipmi", "devices": [device]}], "selfFence": self_fence},
    }
    return ClusterNode(metadata=ObjectMeta(name=name), spec=ClusterNodeSpec.model_validate(spec))


def guest_vm(
    name: str, image: GuestImage, preferred: Sequence[str], *, restricted: bool = False
) -> VirtualMachine:
    """A tiny TCG guest (96 MiB, ticks on its console) preferring `preferred` in that order."""
    nodes = [{"name": node, "priority": rank} for rank, node in enumerate(preferred, start=1)]
    spec = {
        "memoryMiB": 96,
        "boot": {
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "cmdline": KERNEL_CMDLINE,
        },
        "failoverDomain": {"ordered": True, "restricted": restricted, "nodes": nodes},
        "shutdownTimeoutSeconds": 5,
    }
    return VirtualMachine(
        metadata=ObjectMeta(name=name), spec=VirtualMachineSpec.model_validate(spec)
    )
