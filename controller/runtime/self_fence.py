"""The agent's self-fence deadline and watchdog feed rule, pure (no clock, no I/O).

Shared by the real heartbeat (`controller/runtime/heartbeat.py`) and the HA simulator
(`controller/ha/sim_agents.py`), so the simulator exercises the rules that ship (docs/ha.md).
Times are seconds on one monotonic clock; `last_renewal` is when the latest successful lease
renewal was *sent* (etcd counts the TTL from when it received it, which is later).

- The lease is surely still held until `last_renewal + ttl - margin` (`self_fence_deadline`).
- Past that deadline a node whose policy relies on self-fencing destroys its VMs at once.
- The watchdog is fed while the agent works and, on a self-fencing node, while its guests are
  covered: the lease is valid, or the self-fence destroyed them. A stall (or a lapsed lease with
  guests possibly still running) stops the feeding, so the host is reset at the latest
  `watchdog_timeout` after the deadline, which the controller's recovery grace covers.
"""

from __future__ import annotations


def self_fence_deadline(last_renewal: float, ttl: float, margin: float) -> float:
    """Until when a lease renewed (sent) at `last_renewal` is surely held by etcd."""
    return last_renewal + ttl - margin


def lease_valid(now: float, last_renewal: float | None, ttl: float, margin: float) -> bool:
    """True while the latest renewal is recent enough that etcd surely holds the lease."""
    return last_renewal is not None and now < self_fence_deadline(last_renewal, ttl, margin)


def may_feed_watchdog(
    *,
    working: bool,
    self_fence_enabled: bool,
    lease_valid: bool,
    self_fenced: bool,
    self_fence_failed: bool,
) -> bool:
    """Whether the agent feeds its watchdog now.

    `working`: the agent's loops progress (a hung agent does not feed at all). On a node that
    does not self-fence the watchdog only guards against a hung agent.
    """
    if not working or self_fence_failed:
        return False
    if not self_fence_enabled:
        return True
    return lease_valid or self_fenced
