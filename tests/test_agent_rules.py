"""The agent's pure rules, shared by the real agent and the HA simulator."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.ha.agent_rules import (
    DomainAction,
    DomainFacts,
    PingTrack,
    after_ping,
    decide_domain,
    failure_warnings,
    first_failing_check,
    must_clean_after_fence,
    start_blocker,
)
from controller.runtime.self_fence import lease_valid, may_feed_watchdog, self_fence_deadline
from crds.clusternode import NodeHealth
from crds.virtualmachine import GuestAgentCheck, HealthSpec, RestartPolicy, WatchdogCheck

RUNNING_HERE = DomainFacts(
    placed_here=True,
    wanted=True,
    running=True,
    migration_owns=False,
    ran_here=True,
    gave_up_here=False,
    restarts=(),
    policy=RestartPolicy(max_restarts=2, window_seconds=60),
    now=1000.0,
    start_blocker=None,
)
CRASHED_HERE = replace(RUNNING_HERE, running=False)
HUNG_HERE = replace(RUNNING_HERE, unresponsive="watchdog i6300esb fired (action reset)")
POWERED_OFF_HERE = replace(CRASHED_HERE, unresponsive="watchdog i6300esb fired (action poweroff)")


@pytest.mark.parametrize(
    ("facts", "action"),
    [
        (RUNNING_HERE, "keep"),
        (replace(RUNNING_HERE, migration_owns=True, placed_here=False), "leave"),
        (replace(RUNNING_HERE, placed_here=False), "destroy"),
        (replace(CRASHED_HERE, placed_here=False), "forget"),
        (replace(RUNNING_HERE, wanted=False), "stop"),
        (replace(CRASHED_HERE, ran_here=False), "start"),
        (CRASHED_HERE, "restart"),
        (replace(CRASHED_HERE, restarts=(990.0,)), "restart"),
        (replace(CRASHED_HERE, restarts=(930.0, 990.0)), "restart"),  # one is out of the window
        (replace(CRASHED_HERE, restarts=(950.0, 990.0)), "give_up"),
        (replace(CRASHED_HERE, gave_up_here=True), "stay_down"),
        (replace(CRASHED_HERE, self_fence_victim=True), "start"),  # not a crash: not counted
        (replace(CRASHED_HERE, self_fence_victim=True, restarts=(950.0, 990.0)), "start"),
        (replace(CRASHED_HERE, start_blocker="no valid heartbeat lease"), "wait"),
        (replace(RUNNING_HERE, start_blocker="node is Fencing"), "keep"),  # never killed for it
        (HUNG_HERE, "reset"),
        (replace(HUNG_HERE, restarts=(990.0,)), "reset"),
        (replace(HUNG_HERE, restarts=(950.0, 990.0)), "give_up"),  # resets did not help
        (replace(HUNG_HERE, wanted=False), "stop"),
        (replace(HUNG_HERE, placed_here=False), "destroy"),
        (POWERED_OFF_HERE, "restart"),  # its watchdog stopped it: restarted like a crash
        (replace(POWERED_OFF_HERE, restarts=(950.0, 990.0)), "give_up"),
        (replace(POWERED_OFF_HERE, gave_up_here=True), "stay_down"),
    ],
)
def test_what_the_agent_does_with_a_domain(facts: DomainFacts, action: DomainAction) -> None:
    assert decide_domain(facts) == action


def test_a_guest_its_watchdog_powered_off_is_warned_as_unresponsive_not_crashed() -> None:
    fired, window = "watchdog i6300esb fired (action poweroff) on host1", "(1 of 2 in 60 s)"
    assert failure_warnings(POWERED_OFF_HERE, "restart", "host1", 1) == [
        ("GuestUnresponsive", f"{fired}; restarted in place {window}")
    ]
    limit = "2 restarts within 60 s reached the limit of 2"
    assert failure_warnings(POWERED_OFF_HERE, "give_up", "host1", 2) == [
        ("GuestUnresponsive", f"{fired}: {limit}; left down"),  # it was down already
        ("RestartLimitReached", f"{fired}: {limit}; left down"),
    ]
    crashed = "domain stopped unexpectedly on host1"
    assert failure_warnings(CRASHED_HERE, "restart", "host1", 1) == [
        ("VMRestarted", f"{crashed}; restarted in place {window}")
    ]
    assert failure_warnings(CRASHED_HERE, "give_up", "host1", 2) == [
        ("RestartLimitReached", f"{crashed}: {limit}; left down")
    ]
    reset = "watchdog i6300esb fired (action reset) on host1"
    assert failure_warnings(HUNG_HERE, "reset", "host1", 1) == [
        ("GuestUnresponsive", f"{reset}; reset in place {window}")
    ]
    assert failure_warnings(HUNG_HERE, "give_up", "host1", 2)[0] == (
        "GuestUnresponsive",
        f"{reset}: {limit}; destroyed and left down",
    )


def test_restart_in_place_never_happens_at_a_zero_limit() -> None:
    facts = replace(CRASHED_HERE, policy=RestartPolicy(max_restarts=0))
    assert decide_domain(facts) == "give_up"


def test_a_guest_is_unresponsive_after_the_allowed_failures_once_it_answered() -> None:
    check = GuestAgentCheck(interval_seconds=1, failures=2)
    track, hung = after_ping(PingTrack(), answered=False, check=check)
    assert (track, hung) == (PingTrack(), False)  # still booting: not armed, never reset
    track, _ = after_ping(track, answered=True, check=check)
    track, hung = after_ping(track, answered=False, check=check)
    assert (track, hung) == (PingTrack(armed=True, missed=1), False)
    track, hung = after_ping(track, answered=False, check=check)
    assert (track, hung) == (PingTrack(), True)  # disarmed until the reset guest answers
    track, _ = after_ping(PingTrack(armed=True, missed=1), answered=True, check=check)
    assert track == PingTrack(armed=True)  # an answer forgives earlier misses


def test_the_first_check_to_notice_a_hang() -> None:
    agent = GuestAgentCheck(interval_seconds=2, failures=3)
    assert first_failing_check(HealthSpec()) is None
    assert first_failing_check(HealthSpec(watchdog=WatchdogCheck())) == (
        30.0,
        "watchdog i6300esb fired (action reset)",
        False,
    )
    poweroff = HealthSpec(watchdog=WatchdogCheck(action="poweroff"))
    fired = "watchdog i6300esb fired (action poweroff)"
    assert first_failing_check(poweroff) == (30.0, fired, True)  # QEMU stops the guest
    both = first_failing_check(HealthSpec(watchdog=WatchdogCheck(), guest_agent=agent))
    assert both == (6.0, "guest agent did not answer 3 guest-pings in a row (2 s apart)", False)


@pytest.mark.parametrize(
    ("valid", "self_fenced", "health", "blocked"),
    [
        (True, False, "Online", None),
        (True, False, "Unknown", None),
        (True, False, None, None),
        (True, False, "Fencing", "node is Fencing"),
        (True, False, "Fenced", "node is Fenced"),
        (False, False, "Online", "no valid heartbeat lease"),
        (True, True, "Online", "self-fenced: waiting for the heartbeat lease to come back"),
    ],
)
def test_starting_needs_a_lease_and_a_node_not_being_fenced(
    valid: bool, self_fenced: bool, health: NodeHealth | None, blocked: str | None
) -> None:
    assert start_blocker(valid, self_fenced, health) == blocked


def test_a_fenced_node_is_cleaned_once_per_fence() -> None:
    assert must_clean_after_fence("Fenced", 10.0, None)
    assert not must_clean_after_fence("Fenced", 10.0, 10.0)
    assert must_clean_after_fence("Fenced", 20.0, 10.0)
    assert not must_clean_after_fence("Fenced", None, None)
    assert not must_clean_after_fence("Online", 10.0, None)


def test_the_lease_is_trusted_until_the_self_fence_deadline() -> None:
    assert self_fence_deadline(100.0, 3, 1.0) == 102.0
    assert lease_valid(101.99, 100.0, 3, 1.0)
    assert not lease_valid(102.0, 100.0, 3, 1.0)
    assert not lease_valid(0.0, None, 3, 1.0)


@pytest.mark.parametrize(
    ("working", "enabled", "valid", "fenced", "failed", "feed"),
    [
        (True, True, True, False, False, True),
        (True, True, False, False, False, False),  # guests may run uncovered: let it reset
        (True, True, False, True, False, True),  # the self-fence destroyed them
        (True, True, False, True, True, False),  # ... unless it failed
        (False, True, True, False, False, False),  # a hung agent
        (False, False, True, False, False, False),
        (True, False, False, False, False, True),  # no self-fence: only a hang matters
    ],
)
def test_the_watchdog_feed_rule(
    working: bool, enabled: bool, valid: bool, fenced: bool, failed: bool, feed: bool
) -> None:
    assert (
        may_feed_watchdog(
            working=working,
            self_fence_enabled=enabled,
            lease_valid=valid,
            self_fenced=fenced,
            self_fence_failed=failed,
        )
        is feed
    )
