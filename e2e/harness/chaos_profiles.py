"""Timing profiles for a `ChaosCluster`: kvmctl's defaults on the etcd settings deploy/etcd ships,
and a tuned profile with 1 s leases; import them from `e2e.harness.chaos`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.ha.environment import HaTimings
from controller.runtime.leader_record import ElectionTiming


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
