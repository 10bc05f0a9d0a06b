"""Guest health of the VMs running on this host (`spec.health`, docs/ha.md "Guest health").

What the agent remembers between reconciles (a level-triggered reconcile cannot see either):
per running VM the guest-agent ping track of the shared rule (`after_ping`, armed by the first
answer) and when it last pinged; and watchdog firings libvirt reported and that were not
counted yet. The reconciler asks `check` on every reconcile of a running VM and acts on the
failed check it names (`decide_domain` with `unresponsive`); of a VM whose domain is down it
asks `stopped_by` whether its watchdog stopped it (`WATCHDOG_STOPS`), kept until it is started
again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.ha.agent_rules import (
    WATCHDOG_STOPS,
    PingTrack,
    after_ping,
    guest_agent_reason,
    watchdog_reason,
)
from crds import VirtualMachine
from reconcilers.drivers.libvirt import LibvirtHost


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `check` found: the failed check's reason (None: healthy or not checked), whether
    QEMU already reset the guest itself (a watchdog with action `reset`), and the seconds until
    the next ping is due (None: no guest-agent check)."""

    unresponsive: str | None = None
    reset_by_qemu: bool = False
    next_ping: float | None = None


@dataclass(frozen=True, slots=True)
class _Pinged:
    track: PingTrack
    at: float
    """`clock()` when the last ping was sent."""
    sent: int
    """Pings sent since the domain was (re)started."""


class GuestHealth:
    """The health-check memory of one agent, by VM name."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._pings: dict[str, _Pinged] = {}
        self._fired: dict[str, str] = {}
        """VM name -> action of a watchdog firing not counted yet."""

    def watchdog_fired(self, name: str, action: str) -> None:
        """libvirt reported that the watchdog of domain `name` fired and QEMU took `action`."""
        self._fired[name] = action

    def pinged(self, name: str) -> tuple[PingTrack, int] | None:
        """The ping track of VM `name` and the pings sent since its (re)start, if any."""
        pinged = self._pings.get(name)
        return None if pinged is None else (pinged.track, pinged.sent)

    def stopped_by(self, vm: VirtualMachine) -> str | None:
        """The reason of a watchdog firing that stopped the domain of `vm` (it is down, or
        going down), if one did since its last start."""
        action, watchdog = self._fired.get(vm.metadata.name), vm.spec.health.watchdog
        if action not in WATCHDOG_STOPS or watchdog is None:
            return None
        return watchdog_reason(watchdog, action)

    def forget(self, name: str) -> None:
        """The domain was (re)started or stopped: its next check starts afresh, unarmed."""
        self._pings.pop(name, None)
        self._fired.pop(name, None)

    async def check(self, host: LibvirtHost, vm: VirtualMachine) -> Verdict:
        """Count a watchdog reset if one fired, else ping the guest agent if a ping is due (not
        while a watchdog firing powers the guest off)."""
        name, health = vm.metadata.name, vm.spec.health
        check = health.guest_agent
        pause = None if check is None else float(check.interval_seconds)
        if self.stopped_by(vm) is not None:  # going down: its lifecycle event brings the change
            return Verdict(next_ping=pause)
        action = self._fired.pop(name, None)
        if action is not None and health.watchdog is not None and action == "reset":
            self._pings.pop(name, None)  # the guest rebooted: armed again by its next answer
            fired = watchdog_reason(health.watchdog, action)
            return Verdict(fired, reset_by_qemu=True, next_ping=pause)
        if check is None:
            self._pings.pop(name, None)
            return Verdict()
        pinged = self._pings.get(name)
        started = self.clock()
        if pinged is not None and started - pinged.at < check.interval_seconds:
            return Verdict(next_ping=check.interval_seconds - (started - pinged.at))
        answered = await host.guest_ping(name, check.interval_seconds)
        track, unresponsive = after_ping(pinged.track if pinged else PingTrack(), answered, check)
        self._pings[name] = _Pinged(track, started, pinged.sent + 1 if pinged else 1)
        reason = guest_agent_reason(check) if unresponsive else None
        waited = self.clock() - started
        return Verdict(reason, next_ping=max(0.0, check.interval_seconds - waited))
