"""The host agent's decisions, pure: what to do with a VM's domain, when starting is allowed,
when a node found Fenced must be cleaned.

The real agent (`reconcilers/virtualmachine/`, `controller/agent.py`, `controller/ha/agent_side.py`)
and the HA simulator (`controller/ha/sim_agents.py`) both call these functions, so the property
test and the golden scenarios exercise the rules that ship. The self-fence deadline and the
watchdog feed rule are in `controller/runtime/self_fence.py` (the heartbeat sits in the runtime
layer, which may not import this package). Nothing here reads a clock, a store or libvirt:
times are seconds on whatever clock the caller passes as `now`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from crds.clusternode import NodeHealth
from crds.virtualmachine import GuestAgentCheck, HealthSpec, RestartPolicy, WatchdogCheck

FENCING_HEALTH: frozenset[NodeHealth] = frozenset({"Fencing", "Fenced"})
"""While its node is in one of these states, an agent starts nothing (the controller may be
powering it off, or has declared it off)."""

DomainAction = Literal[
    "leave",  # a migration to or from this node owns the domain: neither start nor destroy
    "destroy",  # runs here but is not placed here: destroy at once (never two copies)
    "forget",  # neither placed nor running here: release what this node still holds for it
    "stop",  # placed here, runState is not started: shut down (then destroy)
    "keep",  # placed here and running: adopt it, report it running
    "reset",  # placed here, running, failed a health check, under the restart limit: reset it
    "wait",  # should run here but starting is not allowed now (`start_blocker`)
    "start",  # should run here and has not: start it
    "restart",  # ran here and stopped unexpectedly, under the restart limit: restart in place
    "give_up",  # stopped unexpectedly or unresponsive, at the restart limit: destroy, Crashed
    "stay_down",  # gave up here before: left down until the controller restarts or moves it
]


@dataclass(frozen=True, slots=True)
class DomainFacts:
    """What the agent of one node knows about one VM when it decides."""

    placed_here: bool
    wanted: bool
    """The VM's runState is `started`."""
    running: bool
    """libvirt reports a guest of this VM on this node (a qemu process exists)."""
    migration_owns: bool
    """A migration of the VM to or from this node is in flight."""
    ran_here: bool
    """The VM's status says it was Running on this node (so a stopped guest crashed)."""
    gave_up_here: bool
    """`RestartLimitReached` is set for this node."""
    restarts: Sequence[float]
    """When the VM was restarted in place (seconds on the caller's clock)."""
    policy: RestartPolicy
    now: float
    start_blocker: str | None
    """Why starting is not allowed now (`start_blocker`), or None."""
    unresponsive: str | None = None
    """Which health check the running guest failed, or which watchdog stopped the guest that is
    down now (`WATCHDOG_STOPS`: a guest failure, not a crash), or None."""
    self_fence_victim: bool = False
    """This agent's own self-fence destroyed the guest (since then not started again): not a
    crash, so starting it again is not counted by the restart policy."""


def recent_restarts(restarts: Sequence[float], policy: RestartPolicy, now: float) -> list[float]:
    """The restarts that still count against the policy's window."""
    return [moment for moment in restarts if moment > now - policy.window_seconds]


def decide_domain(facts: DomainFacts) -> DomainAction:
    """What the agent does with the VM's domain on its node now (one step; see `DomainAction`)."""
    if facts.migration_owns:
        return "leave"
    if not facts.placed_here:
        return "destroy" if facts.running else "forget"
    if not facts.wanted:
        return "stop"
    if facts.running:
        if facts.unresponsive is None:
            return "keep"
        return "give_up" if _at_limit(facts) else "reset"
    if facts.start_blocker is not None:
        return "wait"
    if facts.gave_up_here:
        return "stay_down"
    if not facts.ran_here or facts.self_fence_victim:
        return "start"
    return "give_up" if _at_limit(facts) else "restart"


def _at_limit(facts: DomainFacts) -> bool:
    recent = recent_restarts(facts.restarts, facts.policy, facts.now)
    return len(recent) >= facts.policy.max_restarts


def start_blocker(lease_valid: bool, self_fenced: bool, health: NodeHealth | None) -> str | None:
    """Why the agent may not start domains now, or None: it starts only while its heartbeat
    lease is surely held, after any self-fence was recovered from, and while its node is not
    being fenced (any other health, Online or not, allows it)."""
    if not lease_valid:
        return "no valid heartbeat lease"
    if self_fenced:
        return "self-fenced: waiting for the heartbeat lease to come back"
    if health in FENCING_HEALTH:
        return f"node is {health}"
    return None


def must_clean_after_fence(
    health: NodeHealth | None, confirmed_at: object | None, cleaned: object | None
) -> bool:
    """Whether an agent that finds its node in `health`, fenced at `confirmed_at`, must destroy
    every domain now: Fenced, and not yet cleaned after this very fence (`cleaned`)."""
    return health == "Fenced" and confirmed_at is not None and confirmed_at != cleaned


def restarted_message(node: str, count: int, policy: RestartPolicy) -> str:
    """The Warning `VMRestarted` of a restart in place."""
    return (
        f"domain stopped unexpectedly on {node}; restarted in place "
        f"({count} of {policy.max_restarts} in {policy.window_seconds} s)"
    )


def gave_up_message(
    node: str, count: int, policy: RestartPolicy, cause: str = "domain stopped unexpectedly"
) -> str:
    """The Warning `RestartLimitReached` (and the Ready message) when the agent gives up;
    `cause` is the failed health check's reason for a guest left unresponsive."""
    return (
        f"{cause} on {node}: {count} restarts within "
        f"{policy.window_seconds} s reached the limit of {policy.max_restarts}; left down"
    )


# -- guest health (`VirtualMachine.spec.health`) ---------------------------------------------


WATCHDOG_TIMEOUT_SECONDS = 30.0
"""The i6300esb driver's default timeout (Linux `i6300esb.heartbeat`): the guest sets the
real one; the simulator assumes this."""


WATCHDOG_STOPS = frozenset({"poweroff", "shutdown"})
"""The watchdog actions (libvirt's names) after which the guest is down: the domain that stops
then failed its watchdog check (restarted as `GuestUnresponsive`, not as a crash)."""


def first_failing_check(health: HealthSpec) -> tuple[float, str, bool] | None:
    """The simulator's model of a hang: seconds until the first check fails, its reason, and
    whether QEMU then stops the guest (a watchdog action in `WATCHDOG_STOPS`); None without
    checks: a hung guest is never noticed."""
    checks = []
    if health.guest_agent is not None:
        agent = health.guest_agent
        after = float(agent.interval_seconds * agent.failures)
        checks.append((after, guest_agent_reason(agent), False))
    if health.watchdog is not None:
        action = health.watchdog.action
        reason = watchdog_reason(health.watchdog, action)
        checks.append((WATCHDOG_TIMEOUT_SECONDS, reason, action in WATCHDOG_STOPS))
    return min(checks, default=None)


@dataclass(frozen=True, slots=True)
class PingTrack:
    """The guest-agent check of one running domain: armed by the guest's first answer."""

    armed: bool = False
    missed: int = 0
    """Unanswered pings in a row since the last answer."""


def after_ping(track: PingTrack, answered: bool, check: GuestAgentCheck) -> tuple[PingTrack, bool]:
    """The track after one ping, and whether the guest is now unresponsive (after which the
    track is disarmed again: a reset guest is checked once it answers anew)."""
    if answered:
        return PingTrack(armed=True), False
    if not track.armed:
        return track, False
    missed = track.missed + 1
    if missed >= check.failures:
        return PingTrack(), True
    return PingTrack(armed=True, missed=missed), False


def watchdog_reason(check: WatchdogCheck, action: str) -> str:
    """What `GuestUnresponsive` says when the watchdog device fired (`action` as libvirt
    reports it)."""
    return f"watchdog {check.model} fired (action {action})"


def guest_agent_reason(check: GuestAgentCheck) -> str:
    """What `GuestUnresponsive` says when the guest agent stopped answering."""
    return (
        f"guest agent did not answer {check.failures} guest-pings in a row "
        f"({check.interval_seconds} s apart)"
    )


def unresponsive_message(
    reason: str,
    node: str,
    action: DomainAction,
    count: int,
    policy: RestartPolicy,
    destroyed: bool = True,
) -> str:
    """The Warning `GuestUnresponsive`: which check failed and what the agent did about it
    (`action` is `reset`, `restart` after a watchdog poweroff, or `give_up`, which `destroyed`
    the running guest or left the stopped one down)."""
    if action == "give_up":
        done = "destroyed and left down" if destroyed else "left down"
        return (
            f"{reason} on {node}: {count} restarts within {policy.window_seconds} s reached "
            f"the limit of {policy.max_restarts}; {done}"
        )
    done = "reset in place" if action == "reset" else "restarted in place"
    return (
        f"{reason} on {node}; {done} ({count} of {policy.max_restarts} "
        f"in {policy.window_seconds} s)"
    )


def failure_warnings(
    facts: DomainFacts, action: DomainAction, node: str, count: int
) -> list[tuple[str, str]]:
    """The Warnings (reason, message), in order, of a `restart`, `reset` or `give_up` decided on
    `facts`, `count` restarts now in the window: `VMRestarted` for a crash, `GuestUnresponsive`
    naming the failed check; a give-up ends with `RestartLimitReached` (the Ready message)."""
    policy, failed = facts.policy, facts.unresponsive
    warnings = []
    if failed is not None:
        message = unresponsive_message(failed, node, action, count, policy, facts.running)
        warnings.append(("GuestUnresponsive", message))
    elif action == "restart":
        warnings.append(("VMRestarted", restarted_message(node, count, policy)))
    if action == "give_up":
        causes = () if failed is None else (failed,)
        warnings.append(("RestartLimitReached", gave_up_message(node, count, policy, *causes)))
    return warnings
