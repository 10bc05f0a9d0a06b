"""Admission control on a real etcd: `kvmctl apply` refuses a breaking batch whole (enforce) or
applies it with one warning line (warn); the HA controller holds a breaking start Pending with a
condition and one Warning; `kvmctl status` shows the headroom."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controller.runtime.manager import Manager
from controller.runtime.store import Store
from crds import ClusterPolicy, ObjectMeta
from crds.clusternode import Capacity
from crds.clusterpolicy import ClusterPolicySpec
from e2e.harness.polling import eventually
from tests.support.cli import Run, write
from tests.support.gitrepo import MakeSyncer, Repository, vm_memory
from tests.support.ha import (
    Leases,
    events_of,
    get_vm,
    node_object,
    placed_on,
    report_running,
    vm_object,
)

HEADER = "apiVersion: kvmctl.io/v1alpha1\n"


def policy(rule: str, mode: str = "enforce") -> str:
    return (
        f"{HEADER}kind: ClusterPolicy\nmetadata: {{name: default}}\n"
        f"spec: {{admission: {{{rule}, mode: {mode}}}}}\n---\n"
    )


def node(name: str, cordoned: bool = False) -> str:
    return (
        f"{HEADER}kind: ClusterNode\nmetadata: {{name: {name}}}\n"
        f"spec: {{addresses: {{cluster: 10.0.0.1}}, cordoned: {str(cordoned).lower()}}}\n---\n"
    )


def vms(*names: str, memory: int = 2048) -> str:
    return "".join(
        f"{HEADER}kind: VirtualMachine\nmetadata: {{name: {name}}}\n"
        f"spec: {{memoryMiB: {memory}}}\n---\n"
        for name in names
    )


def online(etcd_endpoints: list[str], key_prefix: str, names: list[str]) -> None:
    """What each node's agent and the controller record: Online, 4 vcpus, 4 GiB."""

    def mutate(current: Any) -> bool:
        current.status.health = "Online"
        current.status.capacity = Capacity(cpus=4, memory_mib=4096)
        return True

    async def patch() -> None:
        async with Store(etcd_endpoints, key_prefix) as store:
            for name in names:
                await store.patch_status("ClusterNode", name, mutate)

    asyncio.run(patch())


@pytest.fixture
def cluster(kvmctl: Run, tmp_path: Path, etcd_endpoints: list[str], key_prefix: str) -> Run:
    """Three Online hosts of 4 GiB, four 2 GiB VMs, a policy tolerating one host failure.

    Any host failing leaves 8 GiB for the four VMs: met. A fifth VM, or a cordon, breaks it."""
    code, _, err = kvmctl("apply", "-f", write(tmp_path, node("a") + node("b") + node("c"), "n"))
    assert code == 0, err
    online(etcd_endpoints, key_prefix, ["a", "b", "c"])
    manifests = policy("hostFailuresTolerated: 1") + vms("v1", "v2", "v3", "v4")
    code, _, err = kvmctl("apply", "-f", write(tmp_path, manifests, "base.yaml"))
    assert (code, err) == (0, "")
    return kvmctl


@pytest.mark.parametrize("dry_run", ["none", "server"])
def test_a_start_that_breaks_the_policy_is_refused_and_nothing_is_written(
    cluster: Run, tmp_path: Path, dry_run: str
) -> None:
    batch = write(tmp_path, vms("v5") + vms("v6", memory=64))
    code, out, err = cluster("apply", "-f", batch, f"--dry-run={dry_run}")
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(
        "error: starting virtualmachine/v5, starting virtualmachine/v6 would break admission "
        "control (tolerate 1 host failure (enforce)): if "
    )
    assert "has no host" in err and err.endswith("; nothing was applied\n")
    assert cluster("get", "vm", "v6")[0] == 1


def test_growing_a_vm_or_cordoning_a_host_that_breaks_it_is_refused(
    cluster: Run, tmp_path: Path
) -> None:
    code, _, err = cluster("apply", "-f", write(tmp_path, vms("v4", memory=4096)))
    assert code == 1 and "growing virtualmachine/v4 would break" in err
    code, _, err = cluster("apply", "-f", write(tmp_path, node("c", cordoned=True)))
    assert code == 1 and "error: cordoning clusternode/c would break admission control" in err
    _, out, _ = cluster("get", "node", "c", "-o", "yaml")
    assert "cordoned: false" in out
    code, out, err = cluster("apply", "-f", write(tmp_path, vms("v1", "v2", "v3", "v4")))
    assert (code, err) == (0, "") and out.count("unchanged") == 4


def test_in_warn_mode_the_change_is_applied_with_one_warning(cluster: Run, tmp_path: Path) -> None:
    batch = write(tmp_path, policy("hostFailuresTolerated: 1", "warn") + vms("v5"))
    code, out, err = cluster("apply", "-f", batch)
    assert code == 0 and "virtualmachine/v5 created" in out
    assert err.startswith("warning: starting virtualmachine/v5 breaks admission control")
    assert len(err.splitlines()) == 1


def test_a_policy_the_cluster_does_not_meet_is_applied_with_a_warning(
    cluster: Run, tmp_path: Path
) -> None:
    code, out, err = cluster("apply", "-f", write(tmp_path, policy("hostFailuresTolerated: 2")))
    assert code == 0 and "clusterpolicy/default configured" in out
    assert err.startswith("warning: admission control (tolerate 2 host failures (enforce)) is not")
    code, _, err = cluster("apply", "-f", write(tmp_path, policy("reservePercent: 40")))
    assert code == 0 and "would use 8192 of 12288 MiB" in err


def test_a_second_cluster_policy_name_is_refused(kvmctl: Run, tmp_path: Path) -> None:
    other = policy("reservePercent: 10").replace("name: default", "name: other")
    code, _, err = kvmctl("apply", "-f", write(tmp_path, other))
    assert code == 1 and "a ClusterPolicy is named 'default', not 'other'" in err


# The HA controller ----------------------------------------------------------------------------


async def test_controller_holds_a_breaking_start_pending_with_a_condition_and_one_warning(
    store: Store, leases: Leases, controller: Manager
) -> None:
    """Hosts of one vcpu: vm1 alone survives either host failing, vm1 and vm2 do not."""
    for name in ("a", "b"):
        node = node_object(name)
        node.spec.capacity = Capacity(cpus=1, memory_mib=1024)
        await store.create(node)
        await leases.hold(name)
    spec = ClusterPolicySpec.model_validate({"admission": {"hostFailuresTolerated": 1}})
    await store.create(ClusterPolicy(metadata=ObjectMeta(name="default"), spec=spec))
    await store.create(vm_object("vm1"))
    await eventually(lambda: placed_on(store, "vm1", "a"), "vm1 placed on a")
    await report_running(store, "vm1", "a")
    await store.create(vm_object("vm2"))

    async def warned() -> list[str]:
        events = await events_of(store, "VirtualMachine", "vm2")
        return [e.spec.message for e in events if e.spec.reason == "AdmissionHeld"]

    (message,) = await eventually(warned, "an AdmissionHeld warning about vm2")
    assert message.startswith("starting it on b would break admission control (tolerate 1 host")
    held = await get_vm(store, "vm2")
    assert held.status.placement is None
    condition = held.status.condition("AdmissionHeld")
    assert condition is not None and (condition.status, condition.message) == ("True", message)

    assert await store.delete("ClusterPolicy", "default") is None
    await eventually(lambda: placed_on(store, "vm2", "b"), "vm2 placed once the policy is gone")

    async def cleared() -> bool:
        return (await get_vm(store, "vm2")).status.condition("AdmissionHeld") is None

    await eventually(cleared, "vm2's AdmissionHeld condition cleared")
    assert len(await warned()) == 1


def admission_line(status_output: str) -> str:
    """The headroom line of `kvmctl status` (problem lines follow it)."""
    return next(line for line in status_output.splitlines() if line.startswith("admission:"))


def test_status_shows_the_policy_whether_it_is_met_and_the_free_capacity(
    cluster: Run, tmp_path: Path
) -> None:
    code, out, err = cluster("status")
    assert code == 4, err  # no controller runs here: status exits 4, "no leader"
    assert admission_line(out) == (
        "admission: tolerate 1 host failure (enforce): met (tolerates 1 host failure); free "
        "12 vcpus, 12288 MiB on "
        "3 schedulable hosts (exact)"
    )
    assert (
        cluster("apply", "-f", write(tmp_path, policy("hostFailuresTolerated: 2", "warn")))[0] == 0
    )
    last = admission_line(cluster("status")[1])
    assert last.startswith(
        "admission: tolerate 2 host failures (warn): NOT MET: if hosts a, b fail"
    )
    code, out, _ = cluster("get", "policy")
    assert code == 0 and out.split()[:6] == ["NAME", "ADMISSION", "AGE", "default", "tolerate", "2"]
    assert cluster("delete", "clusterpolicy", "default")[0] == 0
    assert admission_line(cluster("status")[1]).startswith("admission: off")


# GitOps -----------------------------------------------------------------------------------------


async def test_gitsync_refuses_a_commit_that_breaks_the_policy(
    store: Store, repo: Repository, make_syncer: MakeSyncer
) -> None:
    """One 4 GiB host beside two: v1 survives either failing, v1 and v2 do not."""

    def online(current: Any) -> bool:
        current.status.health = "Online"
        current.status.capacity = Capacity(cpus=4, memory_mib=4096)
        return True

    for name in ("a", "b"):
        await store.create(node_object(name))
        await store.patch_status("ClusterNode", name, online)
    repo.write("clusters/lab/all.yaml", policy("hostFailuresTolerated: 1") + vms("v1", memory=4096))
    await repo.commit("v1")
    syncer = make_syncer()
    result = await syncer.sync()
    assert result.ok, result.message
    repo.write("clusters/lab/more.yaml", vms("v2", memory=4096))
    await repo.commit("v2")
    result = await syncer.sync()
    assert (result.ok, result.reason) == (False, "AdmissionRefused")
    assert "starting virtualmachine/v2 would break admission control" in result.message
    assert await vm_memory(store, "v2") is None
