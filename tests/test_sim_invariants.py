"""The simulator's incremental invariant checks catch exactly what checking everything catches:
random process starts, stops, migrations and power cuts on a few hosts, VMs sharing disks
(some readonly), and after every change the incremental state equals the full check and each
new violation was reported once."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.ha.sim_invariants import Invariants, QemuTable
from controller.ha.sim_model import Qemu, QemuPhase
from crds.virtualmachine import VirtualMachineSpec

HOSTS = ("h1", "h2", "h3")
VMS = ("v1", "v2", "v3", "v4", "v5")
DISKS = (
    {"volume": "vg/lv1"},
    {"volume": "vg/lv2"},
    {"file": "/images/boot.iso", "readonly": True},
    {"file": "/images/boot.iso"},
)


@dataclass
class World:
    specs: dict[str, VirtualMachineSpec]
    powered: dict[str, bool]
    table: QemuTable
    reported: list[str]

    def executing(self, vm: str) -> list[str]:
        hosts = self.table.hosts_of(vm).items()
        return sorted(h for h, q in hosts if q.phase != "incoming" and self.powered[h])


Change = tuple[str, str, str, QemuPhase]

changes = st.tuples(
    st.sampled_from(["set", "remove", "power"]),
    st.sampled_from(HOSTS),
    st.sampled_from(VMS),
    st.sampled_from(["starting", "running", "incoming"]),
)


def apply(world: World, change: Change) -> None:
    verb, host, vm, phase = change
    if verb == "set":
        world.table.set(host, vm, Qemu(phase))
    elif verb == "remove" and world.table.get(host, vm) is not None:
        world.table.remove(host, vm)
    elif verb == "power":
        world.powered[host] = not world.powered[host]
        world.table.changed.update(world.table.on(host))  # what runs there changed


@settings(max_examples=300, deadline=None)
@given(
    disks=st.lists(
        st.lists(st.sampled_from(range(len(DISKS))), max_size=2, unique_by=lambda i: min(i, 2)),
        min_size=len(VMS),
        max_size=len(VMS),
    ),
    steps=st.lists(changes, max_size=40),
)
def test_incremental_checks_equal_the_full_check(
    disks: list[list[int]], steps: list[Change]
) -> None:
    specs = {
        name: VirtualMachineSpec.model_validate(
            {"memoryMiB": 64, "disks": [DISKS[i] for i in chosen]}
        )
        for name, chosen in zip(VMS, disks, strict=True)
    }
    world = World(specs, dict.fromkeys(HOSTS, True), QemuTable(lambda _h, _v: None), [])
    invariants = Invariants(
        specs.__getitem__,
        {name: index for index, name in enumerate(VMS)},
        world.executing,
        world.reported.append,
    )
    for change in steps:
        before = (set(invariants.doubled), set(invariants.sharing))
        apply(world, change)
        invariants.check(world.table.changed)
        world.table.changed = set()
        doubled, sharing = invariants.full()
        assert (invariants.doubled, invariants.sharing) == (doubled, sharing)
        new = [f"{vm} runs on {', '.join(world.executing(vm))} at once" for vm in VMS]
        expected = [line for vm, line in zip(VMS, new, strict=True) if vm in doubled - before[0]]
        expected += [
            f"{a} and {b} both run on" for a, b in sorted(sharing - before[1], key=lambda p: p[1])
        ]
        produced, world.reported[:] = list(world.reported), []
        assert len(produced) == len(expected)
        for line, wanted in zip(produced, expected, strict=True):
            assert line.startswith(wanted)


def test_a_second_copy_and_a_shared_writer_are_reported_once_each() -> None:
    specs = {
        name: VirtualMachineSpec.model_validate({"memoryMiB": 64, "disks": [{"volume": "vg/a"}]})
        for name in ("v1", "v2")
    }
    world = World(specs, dict.fromkeys(HOSTS, True), QemuTable(lambda _h, _v: None), [])
    invariants = Invariants(
        specs.__getitem__, {"v1": 0, "v2": 1}, world.executing, world.reported.append
    )
    for host, vm in (("h1", "v1"), ("h2", "v1"), ("h3", "v2")):
        world.table.set(host, vm, Qemu("running"))
        invariants.check(world.table.changed)
        world.table.changed = set()
    world.table.set("h3", "v2", Qemu("running"))  # nothing new: reported already
    invariants.check(world.table.changed)
    assert world.reported == [
        "v1 runs on h1, h2 at once",
        "v1 and v2 both run on disk volume vg/a",
    ]
