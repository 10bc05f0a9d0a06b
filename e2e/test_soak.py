"""The short chaos soak of `make test`: `bench.soak` for 3 minutes (issue 8 item 4, issue 11
item 5).

In the `three-hosts` topology (an etcd member and a controller on every KVM host): power cuts of
a random host, of etcd's leader's host and of the leading controller's host, network cuts, agent
kills and hangs, leader kills, an etcd member's kill and its disk loss (replaced, it must rejoin),
and a power cut while another host's agent hangs, with the two-copies checker running
throughout. No wall-clock figure is asserted (failover times are only reported); what must hold:
no VM ever ran on two hosts, no object was lost, and every VM ran again after every fault.
"""

from __future__ import annotations

import pytest

from bench.soak import soak
from e2e.harness.chaos import DEFAULT_PROFILE

SOAK_MINUTES = 3.0


@pytest.mark.slow
@pytest.mark.timeout(SOAK_MINUTES * 60 + 600)
async def test_three_minute_chaos_soak_runs_nothing_twice_and_loses_nothing() -> None:
    report = await soak(SOAK_MINUTES, DEFAULT_PROFILE, seed=17)
    summary = report.summary()
    assert report.errors == [], summary
    assert report.two_copies_samples == 0, summary
    assert report.lost_objects == [], summary
    assert sum(report.faults.values()) >= 3, summary
