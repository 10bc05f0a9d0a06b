"""The leader's side of fencing for clusters inside VMs: it carries out `fence_kvmctl`'s
requests, for the VMs of the requesting guest cluster only (documents:
controller/ha/guest_requests.py, keys: controller/runtime/layout_keys.py).

A request at `requests/guest-fence/C/VM` concerns VM only if it is labelled
`fence.kvmctl.io/guest-cluster: C` (checked again in the compare-and-swap that writes it); else,
or when it is malformed, the answer is `refused`. Then:

- off: `spec.runState: stopped` (a `disabled` VM stays disabled) with
  `spec.shutdownTimeoutSeconds: 0`, so the host agent destroys the domain at once instead of
  asking the guest to shut down; the timeout it replaced is kept in the annotation
  `fence.kvmctl.io/shutdown-timeout-seconds`. The answer is `off` only once the VM is confirmed
  off: its host's agent wrote it Stopped (or Crashed), or listed the domains running there
  without it after the request (`{prefix}/reports/{node}`: the HA controller unplaces a stopped
  VM, and the agent writes no status for a VM placed elsewhere), or it never ran, or kvmctl
  fenced the host it last ran on and placed it nowhere else; `failed` after the request's timeout.
- on: `runState: started` and the saved timeout restored; `on` once it runs.

Every write (the VM, answers, published states) carries the term's fencing token: a deposed
leader writes nothing. The answer and the deletion of the request are one transaction that
also compares the request, so a newer request is never answered with an older outcome; a newer
request (or its deletion) cancels the work on the older one.

The power state of every VM of a guest cluster is published at
`results/guest-fence/C/status/VM` (`on`, `off` or `unknown`) whenever it, its last host or that
host's report changes, for fence_kvmctl's status and list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from controller.migrations import Term
from controller.runtime import layout_keys
from controller.runtime.informer import SharedInformers
from controller.runtime.manager import LeaderTask
from controller.runtime.prefix_cache import PrefixCache
from controller.runtime.store import (
    Conflict,
    Delete,
    KeyCompare,
    NotFound,
    Operation,
    Put,
    Store,
    StoreError,
)
from controller.runtime.tasks import cancel_and_wait
from crds import VirtualMachine

from . import guest_requests as keys
from .guest_power import (
    describe,
    guest_cluster,
    observe,
    off_confirmed,
    power_state,
    revision,
    start,
    stop_now,
)
from .guest_requests import GuestResult, PowerStatus
from .requests import RequestFormatError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25
PUBLISH_INTERVAL = 0.5
"""At most one publication of power states per interval."""
RETRY_DELAY = 1.0


class Refused(Exception):
    """Not this guest cluster's to fence."""


class Failed(Exception):
    """The action did not complete; the message says how far it got."""


class Deposed(Exception):
    """A write was refused by the fencing token: this term is over."""


class GuestFenceController:
    """Leader-only: serves guest clusters' fence requests and publishes their VMs' power."""

    def __init__(self, store: Store, informers: SharedInformers) -> None:
        self.store = store
        self.informers = informers
        self.vms = informers.informer("VirtualMachine")
        self._changed = asyncio.Event()
        for kind in ("VirtualMachine", "ClusterNode"):
            informers.informer(kind).add_handler(lambda _type, _obj: self._changed.set())

    def leader_task(self) -> LeaderTask:
        return LeaderTask("guest-fence", self.run)

    async def run(self, token: int, guard: list[Any]) -> None:
        """One term, until cancelled."""
        await self.informers.wait_for_sync()
        await _Service(self, Term(token, guard)).run()
        log.error("guest fencing of token %d stopped: deposed; waiting for the term to end", token)
        await asyncio.Event().wait()  # the elector cancels this term within its renew period


class _Service:
    """One term's watches, request tasks and publications."""

    def __init__(self, owner: GuestFenceController, term: Term) -> None:
        self.store, self.term, self.vms = owner.store, term, owner.vms
        self.changed = owner._changed
        self.requests = PrefixCache(self.store, layout_keys.GUEST_FENCE_REQUESTS, self._request)
        self.reports = PrefixCache(self.store, layout_keys.REPORTS, self._report)
        self.results = PrefixCache(self.store, layout_keys.GUEST_FENCE_RESULTS, lambda *_: None)
        self.serving: dict[str, tuple[bytes, asyncio.Task[None]]] = {}
        self.deposed = False

    async def run(self) -> None:
        caches = (self.requests, self.reports, self.results)
        watches = [asyncio.create_task(cache.run()) for cache in caches]
        try:
            await asyncio.gather(*(cache.synced.wait() for cache in caches))
            while not self.deposed:
                self.changed.clear()
                try:
                    await self._publish()
                except Deposed:
                    self.deposed = True
                except StoreError as error:
                    log.warning("publishing guest power states failed (%s); trying again", error)
                    self.changed.set()
                await asyncio.sleep(PUBLISH_INTERVAL)
                await self.changed.wait()
        finally:
            await cancel_and_wait([*watches, *(task for _, task in self.serving.values())])

    # -- requests ---------------------------------------------------------------------------

    def _report(self, _name: str, _value: bytes | None) -> None:
        self.changed.set()

    def _request(self, name: str, value: bytes | None) -> None:
        current = self.serving.get(name)
        if current is not None and current[0] == value:
            return
        if current is not None:
            current[1].cancel()  # superseded or withdrawn
            del self.serving[name]
        if value is None or self.deposed:
            return
        task = asyncio.create_task(self._serve(name, value), name=f"guest fence {name}")
        self.serving[name] = (value, task)
        task.add_done_callback(lambda done: self._served(name, done))

    def _served(self, name: str, task: asyncio.Task[None]) -> None:
        if self.serving.get(name, (b"", None))[1] is task:
            del self.serving[name]
        if not task.cancelled() and task.exception() is not None:
            log.error("guest fence request %s: %r", name, task.exception())

    async def _serve(self, name: str, raw: bytes) -> None:
        key = self.requests.prefix + name
        try:
            parsed = keys.split_name(name)
            if parsed is None:
                log.warning("deleting %s: not a request kvmctl understands", key)
                await self._answer(key, raw, None)
                return
            cluster, vm = parsed
            request_id, message = "", ""
            state: keys.Outcome = "failed"
            status: PowerStatus | None = None
            try:
                request = keys.parse_request(key, raw)
                request_id = request.id
                log.info("guest cluster %s asks for %s of %s", cluster, request.action, vm)
                status = await self._carry_out(cluster, vm, request.action, request.timeout)
                state, message = request.action, status.message
            except (RequestFormatError, Refused) as error:
                state, message = "refused", str(error)
            except (Failed, StoreError) as error:
                message = str(error)
            log.info("guest fence %s of %s/%s: %s", request_id, cluster, vm, state)
            result = GuestResult(request_id, state, message)
            await self._answer(key, raw, (cluster, vm, result, status))
        except Deposed:
            self.deposed = True
            self.changed.set()

    async def _carry_out(
        self, cluster: str, name: str, action: keys.GuestAction, timeout: float
    ) -> PowerStatus:
        if action == "on":
            await self._write(cluster, name, start)

            async def running() -> bool:
                vm = await self._member(cluster, name)
                return vm.spec.run_state == "started" and vm.status.state == "Running"

            vm = await self._wait(cluster, name, running, timeout, "running")
            return PowerStatus("on", describe(vm))
        before, vm = await self._write(cluster, name, stop_now)
        # Nothing can start the VM after the revision from which it was unplaced (placement is
        # in the same key, written with compare-and-swap) or after our stop request.
        request = revision(before if before.status.placement is None else vm)
        generation = vm.metadata.generation or 0

        async def confirmed() -> bool:
            seen = await observe(self.store, await self._member(cluster, name))
            return off_confirmed(seen, request, generation)

        vm = await self._wait(cluster, name, confirmed, timeout, "confirmed off")
        return PowerStatus("off", describe(vm))

    async def _member(self, cluster: str, name: str) -> VirtualMachine:
        try:
            vm = await self.store.get("VirtualMachine", name)
        except NotFound:
            vm = None
        if not isinstance(vm, VirtualMachine) or guest_cluster(vm) != cluster:
            # The same words whether it exists or not: a guest learns nothing of other VMs.
            raise Refused(f"VirtualMachine {name} is not in guest cluster {cluster}")
        return vm

    async def _write(
        self, cluster: str, name: str, change: Callable[[VirtualMachine], bool], attempts: int = 10
    ) -> tuple[VirtualMachine, VirtualMachine]:
        """Apply `change` to the member VM with compare-and-swap (so its label is as checked),
        re-reading on a conflict; the VM as read just before, and as written."""
        for _ in range(attempts):
            before = await self._member(cluster, name)
            vm = before.model_copy(deep=True)
            if not change(vm):
                return before, before
            try:
                return before, await self.store.update(vm, guard=self.term.guard)
            except Conflict:
                if not await self._guarded([], []):
                    raise Deposed from None
                log.debug("%s changed while writing it; reading it again", name)
        raise Failed(f"VirtualMachine {name} kept changing; {attempts} writes conflicted")

    async def _wait(
        self,
        cluster: str,
        name: str,
        condition: Callable[[], Awaitable[bool]],
        timeout: float,
        what: str,
    ) -> VirtualMachine:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await condition():
            if loop.time() >= deadline:
                vm = await self._member(cluster, name)
                raise Failed(f"{name} not {what} within {timeout:g} s: {describe(vm)}")
            await asyncio.sleep(POLL_INTERVAL)
        return await self._member(cluster, name)

    async def _answer(
        self,
        key: str,
        raw: bytes,
        answer: tuple[str, str, GuestResult, PowerStatus | None] | None,
    ) -> None:
        """Delete the request if it is still `raw`, writing the answer (and the VM's power
        state) in the same transaction; retried until it is written or superseded."""
        operations: list[Operation] = [Delete(key)]
        if answer is not None:
            cluster, vm, result, status = answer
            result_key = self.store.raw_key(layout_keys.guest_fence_result(cluster, vm))
            operations.append(Put(result_key, keys.encode_result(result)))
            if status is not None:
                status_key = self.store.raw_key(layout_keys.guest_power_state(cluster, vm))
                operations.append(Put(status_key, keys.encode_status(status)))
        while True:
            try:
                if await self._guarded([KeyCompare.value(key, raw)], operations):
                    return
                if not await self._guarded([], []):
                    raise Deposed
                return  # withdrawn or superseded meanwhile: nobody waits for this answer
            except StoreError as error:
                log.warning("answering %s failed (%s); trying again", key, error)
                await asyncio.sleep(RETRY_DELAY)

    async def _guarded(self, compares: list[KeyCompare], operations: list[Operation]) -> bool:
        ok, _ = await self.store.keys.transaction([*self.term.guard, *compares], operations)
        return ok

    # -- power states -----------------------------------------------------------------------

    async def _publish(self) -> None:
        """Make `results/guest-fence/*/status/*` match the member VMs' power states."""
        wanted: dict[str, bytes] = {}
        for obj in self.vms.list():
            cluster = guest_cluster(obj) if isinstance(obj, VirtualMachine) else None
            if cluster is None or keys.split_name(f"{cluster}/{obj.metadata.name}") is None:
                continue
            try:
                vm = await self.store.get("VirtualMachine", obj.metadata.name)
            except NotFound:
                continue
            if not isinstance(vm, VirtualMachine) or guest_cluster(vm) != cluster:
                continue
            state = power_state(await observe(self.store, vm), revision(vm)) or "unknown"
            status = PowerStatus(state, describe(vm))
            key = layout_keys.guest_power_state(cluster, vm.metadata.name)
            wanted[key.removeprefix(layout_keys.GUEST_FENCE_RESULTS)] = keys.encode_status(status)
        published = {
            name: value
            for name, value in self.results.values.items()
            if name.count("/") == 2 and name.split("/")[1] == layout_keys.GUEST_POWER_STATES
        }
        base = self.results.prefix
        for name, value in wanted.items():
            if published.get(name) != value:
                await self._publish_one(name, [Put(f"{base}{name}", value)])
                self.results.values[name] = value
        for name in published.keys() - wanted.keys():
            await self._publish_one(name, [Delete(f"{base}{name}")])
            self.results.forget(name)

    async def _publish_one(self, name: str, operations: list[Operation]) -> None:
        if not await self._guarded([], operations):
            raise Deposed
