"""Fault injection on a whole kvmctl cluster, and the two-copies checker.


Built on `e2e.harness.cluster.Cluster` (used by the chaos tests, the failover benchmark and the
soak), in the `chaos_*` modules beside this one:

- `ChaosCluster` (chaos_cluster) adds what the plain cluster lacks: a timing profile given to etcd,
  every agent and every controller (`DEFAULT_PROFILE`, `TUNED_PROFILE`, in chaos_profiles); a
  3-member etcd; a watchdog stand-in per host (`e2e/harness/watchdog.py`) fed by the host's agent
  (`--watchdog`); controllers on chosen hosts only; and the faults `kill_agent`, `stop_agent`,
  `kill_controller`, `kill_etcd_member`. Its `restore` also restarts an agent or controller that
  was killed on a host that stayed up. `leader_host` names the host whose controller leads.
- `TwoCopiesChecker` (chaos_checker) is a thread sampling every host's qemu processes (one scan of
  /proc per sample, every 100 ms by default). It records every sample in which one VM has a qemu
  process on two hosts at once (an `Overlap`), and when each VM's qemu first appeared on a host
  (`first_seen`), which the benchmark uses to time failovers.
- Object builders shared by the tests, bench and soak (chaos_objects): `ipmi_node`, `guest_vm`,
  `ipmi_secret`.

Everything is synchronous like the harness; async callers use `asyncio.to_thread`. Import from
here.
"""

from e2e.harness.chaos_checker import Overlap, TwoCopiesChecker, qemu_processes_by_host
from e2e.harness.chaos_cluster import ELECTION_NAME, ChaosCluster, leader_host
from e2e.harness.chaos_objects import IPMI_SECRET, guest_vm, ipmi_node, ipmi_secret
from e2e.harness.chaos_profiles import (
    DEFAULT_PROFILE,
    ETCD_MEMBER_CONFIG,
    PROFILES,
    SHIPPED_RAFT_SETTINGS,
    TUNED_PROFILE,
    TimingProfile,
    shipped_etcd_timers,
)

__all__ = [
    "DEFAULT_PROFILE",
    "ELECTION_NAME",
    "ETCD_MEMBER_CONFIG",
    "IPMI_SECRET",
    "PROFILES",
    "SHIPPED_RAFT_SETTINGS",
    "TUNED_PROFILE",
    "ChaosCluster",
    "Overlap",
    "TimingProfile",
    "TwoCopiesChecker",
    "guest_vm",
    "ipmi_node",
    "ipmi_secret",
    "leader_host",
    "qemu_processes_by_host",
    "shipped_etcd_timers",
]
