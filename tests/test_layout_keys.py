"""The store's key layout, pinned byte for byte: a key that moves strands what a running cluster
stored under the old one, and an RBAC grant that drifts from its key locks its writer out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from controller.rbac import cluster_roles, describe_roles
from controller.runtime import layout, layout_keys
from crds import KINDS

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_every_key_is_where_it_always_was() -> None:
    keys = layout_keys
    assert [
        keys.REVISION_PROBE,
        keys.heartbeat("host1"),
        keys.session("host1"),
        keys.report("host1"),
        keys.leader("controller"),
        keys.leader_takeover("controller"),
        keys.fence_ack("host1"),
        keys.drain("host1"),
        keys.guest_fence_requests("web"),
        keys.guest_fence_request("web", "vm1"),
        keys.guest_fence_results("web"),
        keys.guest_fence_result("web", "vm1"),
        keys.guest_power_states("web"),
        keys.guest_power_state("web", "vm1"),
        keys.vg_metadata_lock("vg0"),
        keys.lv_activation_claim("vg0", "lv_vm1"),
        layout.LAYOUT_KEY,
        layout.kind_range("VirtualMachine"),
        layout.spec_key("VirtualMachine", "vm1"),
        layout.part_key("VirtualMachine", "vm1", layout.node_writer("host1")),
        layout.spec_key("Event", "e1", layout.node_writer("host1")),
    ] == [
        "revision-probe",
        "heartbeats/host1",
        "sessions/host1",
        "reports/host1",
        "leader/controller",
        "leader/controller.takeover",
        "requests/fence-ack/host1",
        "requests/drain/host1",
        "requests/guest-fence/web/",
        "requests/guest-fence/web/vm1",
        "results/guest-fence/web/",
        "results/guest-fence/web/vm1",
        "results/guest-fence/web/status/",
        "results/guest-fence/web/status/vm1",
        "locks/lvm/vg0",
        "lvm/activation/vg0/lv_vm1",
        "layout",
        "kinds/VirtualMachine/",
        "kinds/VirtualMachine/spec/vm1",
        "kinds/VirtualMachine/status/node.host1/vm1",
        "kinds/Event/node.host1/e1",
    ]
    ranges = [keys.HEARTBEATS, keys.SESSIONS, keys.REPORTS, keys.LEADERS, keys.REQUESTS]
    ranges += [keys.FENCE_ACKS, keys.DRAINS, keys.GUEST_FENCE_REQUESTS, keys.RESULTS]
    ranges += [keys.GUEST_FENCE_RESULTS, keys.LOCKS, keys.VG_METADATA_LOCKS]
    ranges += [keys.LV_ACTIVATION_CLAIMS, layout.KINDS_RANGE, keys.EVERYTHING]
    assert ranges == [
        "heartbeats/",
        "sessions/",
        "reports/",
        "leader/",
        "requests/",
        "requests/fence-ack/",
        "requests/drain/",
        "requests/guest-fence/",
        "results/",
        "results/guest-fence/",
        "locks/",
        "locks/lvm/",
        "lvm/activation/",
        "kinds/",
        "",
    ]


@pytest.mark.parametrize("prefix", ["/kvmctl", "/kvmctl/"])
def test_absolute_keys_have_one_slash_after_the_prefix(prefix: str) -> None:
    key = layout_keys.absolute(prefix, layout_keys.heartbeat("host1"))
    assert key == "/kvmctl/heartbeats/host1"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: layout_keys.heartbeat("a/b"), "node name must be non-empty and without '/'"),
        (lambda: layout_keys.session(""), "node name must be non-empty and without '/'"),
        (lambda: layout_keys.leader("a/b"), "leader election name must be non-empty"),
        (lambda: layout_keys.drain("Host_1"), "Host_1"),
        (lambda: layout_keys.guest_fence_request("web", "../x"), r"\.\./x"),
        (lambda: layout_keys.lv_activation_claim("vg0", "a/b"), "LV name must be non-empty"),
        (lambda: layout_keys.vg_metadata_lock(""), "volume group name must be non-empty"),
    ],
)
def test_a_name_cannot_leave_its_range(build: Callable[[], str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def _defined(nodes: list[str], clusters: list[str]) -> set[str]:
    """Every key and range the layout defines, for these nodes and guest clusters."""
    keys = layout_keys
    defined = {keys.EVERYTHING, keys.REVISION_PROBE, layout.LAYOUT_KEY, layout.KINDS_RANGE}
    defined |= {keys.HEARTBEATS, keys.LEADERS, keys.REPORTS, keys.REQUESTS, keys.RESULTS}
    defined |= {keys.LOCKS, keys.VG_METADATA_LOCKS, keys.LV_ACTIVATION_CLAIMS}
    defined |= {layout.kind_range(kind) for kind in KINDS}
    for node in nodes:
        writer = layout.node_writer(node)
        defined |= {keys.heartbeat(node), keys.session(node), keys.report(node)}
        defined |= {layout.parts_range(kind, writer) for kind in KINDS}
        defined |= {layout.spec_range(kind, writer) for kind in KINDS}
    for cluster in clusters:
        defined |= {keys.guest_fence_requests(cluster), keys.guest_fence_results(cluster)}
    return defined


def test_every_rbac_grant_is_a_key_or_range_of_the_layout() -> None:
    nodes, clusters = ["host1", "host2"], ["web"]
    defined = _defined(nodes, clusters)
    roles = cluster_roles(nodes, secret_readers=["host2"], guest_clusters=clusters)
    for role in roles:
        for grant in role.grants:
            assert grant.key in defined, f"{role.name}: {grant} is not in the layout"
            ranged = grant.key.endswith("/") or grant.key in ("", layout_keys.REVISION_PROBE)
            assert grant.prefix == ranged, f"{role.name}: {grant}: range and single key mixed up"


def test_the_grants_outside_the_objects_are_what_they_always_were() -> None:
    lines = describe_roles(cluster_roles(["host1"], guest_clusters=["web"]))
    assert [line for line in lines if "kinds/" not in line] == [
        "root: root (everything, users and roles)",
        "admin: root (everything, users and roles)",
        "controller: read *",
        "controller: readwrite leader/*",
        "controller: readwrite requests/*",
        "controller: readwrite results/*",
        "controller: readwrite locks/*",
        "monitor: read revision-probe*",
        "monitor: read layout",
        "monitor: read heartbeats/*",
        "monitor: read leader/*",
        "monitor: read requests/*",
        "monitor: read reports/*",
        "monitor: read lvm/activation/*",
        "agent-host1: read revision-probe*",
        "agent-host1: read layout",
        "agent-host1: read heartbeats/*",
        "agent-host1: readwrite heartbeats/host1",
        "agent-host1: readwrite sessions/host1",
        "agent-host1: readwrite reports/host1",
        "agent-host1: read leader/*",
        "agent-host1: readwrite locks/lvm/*",
        "agent-host1: readwrite lvm/activation/*",
        "fence-web: read revision-probe*",
        "fence-web: readwrite requests/guest-fence/web/*",
        "fence-web: read results/guest-fence/web/*",
    ]


def test_the_architecture_doc_lists_every_key_family_with_its_writers_and_readers() -> None:
    rows = {
        cells[0]: cells[1:3]
        for line in ARCHITECTURE.read_text().splitlines()
        if line.startswith("| `")
        for cells in [[cell.strip().replace("`", "") for cell in line.strip("|").split(" | ")]]
    }
    for family in layout_keys.FAMILIES:
        assert rows.get(family.key) == [family.writers, family.readers], family.key
