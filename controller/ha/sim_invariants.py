"""The simulator's qemu processes (`QemuTable`, with a journal of what changed) and the two
invariants checked on every tick: a VM never runs on two hosts at once, and no two VMs run on
one disk (unless both have it readonly).

The checks are incremental: each tick only the VMs whose processes or fields changed are
looked at again (and, for disks, the VMs sharing a disk with one of them), which gives exactly
what checking every VM would (`Invariants.full` does that, for tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from controller.exclusive import Claims
from crds.virtualmachine import VirtualMachineSpec

from .sim_model import Qemu

_CLAIMS = Claims(macs=False)
Pair = tuple[str, str]
"""Two VMs on one disk: the one that comes first by name, then the other."""


class QemuTable:
    """Which qemu process of which VM exists on which host.

    Every change is reported to `touched(host, vm)` and journaled for the invariant checks;
    the processes still starting are indexed so that a tick looks only at them."""

    def __init__(self, touched: Callable[[str, str], None]) -> None:
        self._by_host: dict[str, dict[str, Qemu]] = {}
        self._by_vm: dict[str, dict[str, Qemu]] = {}
        self._names: dict[str, frozenset[str]] = {}
        self.starting: set[tuple[str, str]] = set()
        self.changed: set[str] = set()
        """VMs whose processes changed since the invariants last looked."""
        self._touched = touched

    def on(self, host: str) -> Mapping[str, Qemu]:
        return self._by_host.get(host, {})

    def hosts_of(self, vm: str) -> Mapping[str, Qemu]:
        return self._by_vm.get(vm, {})

    def get(self, host: str, vm: str) -> Qemu | None:
        return self._by_host.get(host, {}).get(vm)

    def names(self, host: str) -> frozenset[str]:
        """The VMs with a process on `host` (what its agent reports)."""
        names = self._names.get(host)
        if names is None:
            names = self._names[host] = frozenset(self.on(host))
        return names

    def set(self, host: str, vm: str, qemu: Qemu) -> None:
        self._by_host.setdefault(host, {})[vm] = qemu
        self._by_vm.setdefault(vm, {})[host] = qemu
        if qemu.phase == "starting":
            self.starting.add((host, vm))
        else:
            self.starting.discard((host, vm))
        self._changed(host, vm)

    def remove(self, host: str, vm: str) -> None:
        del self._by_host[host][vm]
        del self._by_vm[vm][host]
        self.starting.discard((host, vm))
        self._changed(host, vm)

    def clear(self, host: str) -> list[str]:
        """Remove every process on `host`; the VMs they were of, sorted."""
        names = sorted(self.on(host))
        for vm in names:
            self.remove(host, vm)
        return names

    def _changed(self, host: str, vm: str) -> None:
        self._names.pop(host, None)
        self.changed.add(vm)
        self._touched(host, vm)


class Invariants:
    """The invariant checks over the VMs' processes (`executing(vm)`: the hosts where a guest
    of `vm` runs or is about to, sorted); `report(text)` records a violation."""

    def __init__(
        self,
        specs: Callable[[str], VirtualMachineSpec],
        order: Mapping[str, int],
        executing: Callable[[str], list[str]],
        report: Callable[[str], None],
    ) -> None:
        self._spec = specs
        self._order = order
        self._executing = executing
        self._report = report
        self.doubled: set[str] = set()
        """VMs running on two hosts or more (reported once each time it starts)."""
        self.sharing: set[Pair] = set()
        """Pairs of VMs running on one disk (reported once each time it starts)."""
        self._holders: dict[str, dict[str, bool]] = {}
        """Disk -> the running VMs using it, and whether each has it readonly."""
        self._claimed: dict[str, list[tuple[str, bool]]] = {}

    def check(self, changed: Iterable[str]) -> None:
        """Check again the VMs in `changed` (and those sharing a disk with one of them)."""
        names = sorted((n for n in set(changed) if n in self._order), key=self._order.__getitem__)
        for name in names:
            self._check_copies(name)
        affected: set[str] = set()
        for name in names:
            affected.add(name)
            for resource, shared in self._claimed.get(name, []):
                affected.update(self._sharers(resource, shared))
            self._unclaim(name)
            if self._executing(name):
                self._claim(name)
                for resource, shared in self._claimed[name]:
                    affected.update(self._sharers(resource, shared))
        for name in sorted(affected):
            self._check_disks(name)

    def _check_copies(self, name: str) -> None:
        hosts = self._executing(name)
        if len(hosts) > 1 and name not in self.doubled:
            self._report(f"{name} runs on {', '.join(hosts)} at once")
        if len(hosts) > 1:
            self.doubled.add(name)
        else:
            self.doubled.discard(name)

    def _sharers(self, resource: str, shared: bool) -> list[str]:
        holders = self._holders.get(resource, {})
        return [other for other, their in holders.items() if not (shared and their)]

    def _claim(self, name: str) -> None:
        claims = _CLAIMS.resources(self._spec(name))
        self._claimed[name] = claims
        for resource, shared in claims:
            self._holders.setdefault(resource, {})[name] = shared

    def _unclaim(self, name: str) -> None:
        for resource, _ in self._claimed.pop(name, []):
            holders = self._holders[resource]
            holders.pop(name, None)
            if not holders:
                del self._holders[resource]

    def _check_disks(self, name: str) -> None:
        """`name`'s pair: the first of its disks that a VM before it by name uses too."""
        known = {pair for pair in self.sharing if pair[1] == name}
        self.sharing -= known
        for resource, shared in self._claimed.get(name, []):
            holders = self._holders[resource]
            for other in sorted(holders):
                if other < name and not (shared and holders[other]):
                    self.sharing.add((other, name))
                    if (other, name) not in known:
                        self._report(f"{other} and {name} both run on {resource}")
                    return

    def full(self) -> tuple[set[str], set[Pair]]:
        """Every VM checked from scratch: the VMs on two hosts and the pairs on one disk."""
        doubled = {name for name in self._order if len(self._executing(name)) > 1}
        claims = Claims(macs=False)
        sharing: set[Pair] = set()
        for name in sorted(n for n in self._order if self._executing(n)):
            spec = self._spec(name)
            clash = claims.clash(name, spec)
            if clash is not None:
                sharing.add((clash.other, name))
            claims.add(name, spec)
        return doubled, sharing
