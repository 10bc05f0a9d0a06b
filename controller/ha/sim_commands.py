"""The simulator's commands: the scenarios' verbs, faults (a cut network, a killed agent, a
crashed or hung guest, a lost storage path, a failing fence device) and what an operator does
(acknowledge a fence, drain, cordon, migrate, change a VM's run state)."""

from __future__ import annotations

from dataclasses import replace

from .sim_core import SimCore
from .sim_model import SimMigration


class Commands(SimCore):
    def set_network(self, name: str, up: bool) -> None:
        self.hosts[name].network = up
        self.log(f"host/{name}", f"network {'up' if up else 'down'}")

    def kill_agent(self, name: str) -> None:
        host = self.hosts[name]
        if host.agent:
            host.agent = False
            host.self_fence_victims.clear()  # a restarted agent does not know them
            self.log(f"host/{name}", "agent killed; guests keep running")

    def start_agent(self, name: str) -> None:
        host = self.hosts[name]
        if host.powered and host.boot_done_at is None and not host.agent:
            host.agent = True
            host.last_feed = self.now()
            self._new_session(name)
            self.log(f"host/{name}", "agent started")

    def set_device(self, name: str, method: str, index: int | None, behaviour: str) -> None:
        devices = self.hosts[name].devices[method]
        for position, device in enumerate(devices):
            if index is None or position == index:
                device.behaviour = behaviour  # type: ignore[assignment]

    def ack(self, name: str) -> None:
        self.hosts[name].fence_ack_at = self.now()

    def drain(self, name: str, force: bool) -> None:
        host = self.hosts[name]
        host.spec = host.spec.model_copy(update={"cordoned": True})
        host.drain = "force" if force else "migrate"

    def cordon(self, name: str, cordoned: bool) -> None:
        host = self.hosts[name]
        host.spec = host.spec.model_copy(update={"cordoned": cordoned})
        if not cordoned:
            host.drain = None

    def request_migration(self, vm_name: str, target: str) -> None:
        vm = self.vms[vm_name]
        vm.migration = SimMigration(vm.placement or "", target, 0.0, "Pending")

    def crash(self, vm_name: str) -> None:
        vm = self.vms[vm_name]
        for host in self.hosts.values():
            qemu = self.qemu.get(host.name, vm_name)
            if host.powered and qemu is not None and qemu.phase == "running":
                self.qemu.remove(host.name, vm_name)
                self.log(f"host/{host.name}", f"{vm_name} crashed")
                self._fail_migration(vm, "the source guest crashed")
                self._lose([vm_name])

    def hang(self, vm_name: str) -> None:
        """The guest hangs: its qemu runs on, but it stops answering its health checks."""
        for host in self.hosts.values():
            qemu = self.qemu.get(host.name, vm_name)
            if host.powered and qemu is not None and qemu.phase == "running":
                self.qemu.set(host.name, vm_name, replace(qemu, hung_at=self.now()))
                self._hung[host.name].add(vm_name)
                self.log(f"host/{host.name}", f"{vm_name} hung")

    def set_storage(self, name: str, path: str, lost: bool) -> None:
        """Break (or mend) one storage path of a host; its agent reports it on its next look."""
        host = self.hosts[name]
        if (path in host.storage_cut) == lost:
            return
        host.storage_cut = host.storage_cut | {path} if lost else host.storage_cut - {path}
        self.log(f"host/{name}", f"storage path {path} {'lost' if lost else 'back'}")

    def set_run_state(self, vm_name: str, run_state: str) -> None:
        vm = self.vms[vm_name]
        vm.spec = vm.spec.model_copy(update={"run_state": run_state})
