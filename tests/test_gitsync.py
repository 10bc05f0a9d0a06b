"""GitOps sync against a real etcd and real Git repositories the tests commit to."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from controller.gitsync import (
    default_name,
    normalize_path,
    parse_interval,
)
from controller.runtime.store import Store
from crds import Event, GitSync, ObjectMeta, VirtualMachine
from crds.virtualmachine import VirtualMachineSpec
from e2e.harness.polling import eventually
from tests.support.cli import Kvmctl
from tests.support.gitrepo import MakeSyncer, Repository, vm_memory

DEADLINE = 60.0
ROOT = Path(__file__).parent.parent


def vm_manifest(name: str, memory: int = 256, labels: str = "{}") -> str:
    return f"""apiVersion: kvmctl.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}, labels: {labels}}}
spec: {{memoryMiB: {memory}, vcpus: 1}}
"""


BOND = """apiVersion: kvmctl.io/v1alpha1
kind: Bond
metadata: {name: host1-bond0}
spec: {node: host1, interface: bond0, mode: active-backup, miimon: 100, slaves: [eth0, eth2]}
"""


async def gitsync(store: Store, name: str = "lab") -> GitSync:
    obj = await store.get("GitSync", name)
    assert isinstance(obj, GitSync)
    return obj


async def reasons(store: Store, kind: str, name: str) -> dict[str, Event]:
    objects, _ = await store.list_objects("Event")
    return {
        e.spec.reason: e
        for e in objects
        if isinstance(e, Event)
        and (e.spec.involved_object.kind, e.spec.involved_object.name) == (kind, name)
    }


def inventory(state: GitSync) -> set[tuple[str, str]]:
    return {(e.kind, e.name) for e in state.status.inventory}


async def test_add_change_and_remove_with_prune(
    store: Store, repo: Repository, make_syncer: MakeSyncer
) -> None:
    repo.write("clusters/lab/vms.yaml", vm_manifest("web") + "---\n" + vm_manifest("db"))
    repo.write("clusters/lab/net/bonds.yml", BOND)
    repo.write("clusters/other/vm.yaml", vm_manifest("elsewhere"))
    first = await repo.commit("add web, db and a bond")
    syncer = make_syncer()

    result = await syncer.sync()
    assert result.ok, result.message
    assert [a.object.kind for a in result.applied] == ["Bond", "VirtualMachine", "VirtualMachine"]
    assert result.count("created") == 3
    assert await vm_memory(store, "web") == 256
    assert await store.try_get("VirtualMachine", "elsewhere") is None
    state = await gitsync(store)
    assert state.spec.repo == str(repo.directory) and state.spec.path == "clusters/lab"
    assert state.status.last_synced_commit == state.status.last_attempted_commit == first
    assert (state.status.applied, state.status.pruned, state.status.failed) == (3, 0, 0)
    assert inventory(state) == {
        ("Bond", "host1-bond0"),
        ("VirtualMachine", "web"),
        ("VirtualMachine", "db"),
    }
    ready = state.status.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("True", "Synced")

    repo.write("clusters/lab/vms.yaml", vm_manifest("web", memory=512))
    second = await repo.commit("web gets 512 MiB, db goes")
    result = await syncer.sync()
    assert result.ok, result.message
    assert (result.count("configured"), [e.name for e in result.pruned]) == (1, ["db"])
    assert await vm_memory(store, "web") == 512
    assert await store.try_get("VirtualMachine", "db") is None
    state = await gitsync(store)
    assert state.status.last_synced_commit == second
    assert (state.status.applied, state.status.pruned) == (2, 1)
    assert inventory(state) == {("Bond", "host1-bond0"), ("VirtualMachine", "web")}
    events = await reasons(store, "GitSync", "lab")
    assert events["SyncSucceeded"].spec.count == 2
    assert "virtualmachine/db" in events["Pruned"].spec.message
    pruned_event = (await reasons(store, "VirtualMachine", "db"))["Pruned"]
    assert "gitsync lab" in pruned_event.spec.message and second[:12] in pruned_event.spec.message


async def test_hand_edits_are_reverted_on_the_next_sync(
    store: Store, repo: Repository, make_syncer: MakeSyncer
) -> None:
    repo.write("clusters/lab/vms.yaml", vm_manifest("web", labels="{tier: front}"))
    commit = await repo.commit("web")
    syncer = make_syncer()
    assert (await syncer.sync()).ok

    edited = await store.get("VirtualMachine", "web")
    edited.spec.memory_mib = 4096
    edited.metadata.labels = {"tier": "hacked", "extra": "yes"}
    await store.update(edited)

    result = await syncer.sync()
    assert result.ok and result.commit == commit
    assert result.drifted == ["virtualmachine/web"]
    restored = await store.get("VirtualMachine", "web")
    assert restored.spec.memory_mib == 256
    assert restored.metadata.labels == {"tier": "front"}
    drift = (await reasons(store, "GitSync", "lab"))["DriftCorrected"]
    assert "virtualmachine/web" in drift.spec.message and commit[:12] in drift.spec.message

    result = await syncer.sync()
    assert result.ok and not result.drifted and not result.changed


async def test_a_bad_commit_applies_nothing_and_names_file_and_field(
    store: Store, repo: Repository, make_syncer: MakeSyncer
) -> None:
    repo.write("clusters/lab/vms.yaml", vm_manifest("web") + "---\n" + vm_manifest("db"))
    good = await repo.commit("good")
    syncer = make_syncer()
    assert (await syncer.sync()).ok

    repo.write("clusters/lab/vms.yaml", vm_manifest("web", memory=1024))  # valid, drops db
    repo.write("clusters/lab/broken.yaml", vm_manifest("cache", memory=1))  # below the minimum
    bad = await repo.commit("bad")
    result = await syncer.sync()
    assert not result.ok and result.reason == "InvalidManifest"
    assert "clusters/lab/broken.yaml, document 0" in result.message
    assert "spec.memoryMiB" in result.message
    assert await vm_memory(store, "web") == 256
    assert await vm_memory(store, "db") == 256
    assert await store.try_get("VirtualMachine", "cache") is None
    state = await gitsync(store)
    assert (state.status.last_synced_commit, state.status.last_attempted_commit) == (good, bad)
    assert state.status.failed == 1
    assert inventory(state) == {("VirtualMachine", "web"), ("VirtualMachine", "db")}
    ready = state.status.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", "InvalidManifest")
    assert "spec.memoryMiB" in ready.message
    failed = (await reasons(store, "GitSync", "lab"))["SyncFailed"]
    assert failed.spec.type == "Warning" and "broken.yaml" in failed.spec.message

    repo.write("clusters/lab/broken.yaml", "apiVersion: [unclosed\n")
    repo.write("clusters/lab/dup.yaml", vm_manifest("web"))
    await repo.commit("still bad: YAML error and a duplicate")
    result = await syncer.sync()
    assert result.reason == "InvalidManifest" and result.failed == 2
    assert "clusters/lab/broken.yaml: line 2: invalid YAML" in result.message
    assert "VirtualMachine 'web' is also defined in clusters/lab/dup.yaml" in result.message

    repo.remove("clusters/lab/broken.yaml")
    repo.remove("clusters/lab/dup.yaml")
    fixed = await repo.commit("fixed")
    result = await syncer.sync()
    assert result.ok, result.message
    assert await vm_memory(store, "web") == 1024
    assert await store.try_get("VirtualMachine", "db") is None
    state = await gitsync(store)
    assert state.status.last_synced_commit == fixed and state.status.failed == 0


async def test_an_empty_path_is_refused_unless_allowed(
    store: Store, repo: Repository, make_syncer: MakeSyncer
) -> None:
    repo.write("clusters/lab/vms.yaml", vm_manifest("web"))
    good = await repo.commit("web")
    assert (await make_syncer().sync()).ok

    repo.remove("clusters/lab/vms.yaml")
    repo.write("clusters/lab/notes.txt", "nothing to run here\n")
    await repo.commit("emptied")
    result = await make_syncer().sync()
    assert not result.ok and result.reason == "EmptySource"
    assert "holds no manifests" in result.message and "--allow-empty" in result.message
    assert await vm_memory(store, "web") == 256
    state = await gitsync(store)
    assert state.status.last_synced_commit == good
    assert inventory(state) == {("VirtualMachine", "web")}
    assert (await reasons(store, "GitSync", "lab"))["SyncFailed"].spec.type == "Warning"

    result = await make_syncer(path="clusters/typo").sync()
    assert result.reason == "EmptySource" and "does not exist" in result.message

    result = await make_syncer(allow_empty=True).sync()
    assert result.ok, result.message
    assert [e.name for e in result.pruned] == ["web"]
    assert await store.try_get("VirtualMachine", "web") is None
    assert inventory(await gitsync(store)) == set()


async def test_objects_the_sync_did_not_create_are_never_pruned(
    store: Store, repo: Repository, make_syncer: MakeSyncer
) -> None:
    spec = VirtualMachineSpec(memory_mib=128)
    await store.create(VirtualMachine(metadata=ObjectMeta(name="legacy"), spec=spec))
    await store.create(VirtualMachine(metadata=ObjectMeta(name="handmade"), spec=spec))
    repo.write("clusters/lab/vms.yaml", vm_manifest("legacy") + "---\n" + vm_manifest("web"))
    await repo.commit("adopt legacy, add web")
    syncer = make_syncer()
    result = await syncer.sync()
    assert result.ok
    assert {a.object.metadata.name: a.outcome for a in result.applied} == {
        "legacy": "configured",
        "web": "created",
    }
    assert inventory(await gitsync(store)) == {("VirtualMachine", "web")}

    repo.remove("clusters/lab/vms.yaml")
    repo.write("clusters/lab/other.yaml", vm_manifest("db"))
    await repo.commit("legacy and web leave Git")
    result = await syncer.sync()
    assert result.ok, result.message
    assert [e.name for e in result.pruned] == ["web"]
    assert await vm_memory(store, "legacy") == 256  # applied from Git once, never deleted
    assert await vm_memory(store, "handmade") == 128
    assert await store.try_get("VirtualMachine", "web") is None


async def test_without_prune_objects_that_leave_git_are_released(
    store: Store, repo: Repository, make_syncer: MakeSyncer
) -> None:
    repo.write("clusters/lab/vms.yaml", vm_manifest("web") + "---\n" + vm_manifest("db"))
    await repo.commit("web and db")
    assert (await make_syncer(prune=False).sync()).ok
    repo.write("clusters/lab/vms.yaml", vm_manifest("web"))
    await repo.commit("db leaves")

    result = await make_syncer(prune=False).sync()
    assert result.ok and [e.name for e in result.released] == ["db"] and not result.pruned
    assert await vm_memory(store, "db") == 256
    assert inventory(await gitsync(store)) == {("VirtualMachine", "web")}
    assert "virtualmachine/db" in (await reasons(store, "GitSync", "lab"))["Released"].spec.message

    result = await make_syncer(prune=True).sync()
    assert result.ok and not result.pruned
    assert await vm_memory(store, "db") == 256


async def test_a_missing_branch_or_repository_fails_the_sync(
    store: Store, repo: Repository, make_syncer: MakeSyncer, tmp_path: Path
) -> None:
    repo.write("clusters/lab/vms.yaml", vm_manifest("web"))
    await repo.commit("web")
    result = await make_syncer(ref="no-such-branch").sync()
    assert not result.ok and result.reason == "FetchFailed"
    assert "couldn't find remote ref no-such-branch" in result.message
    state = await gitsync(store)
    assert state.status.failed == 1 and state.status.last_synced_commit is None

    result = await make_syncer(repo=str(tmp_path / "nowhere")).sync()
    assert result.reason == "FetchFailed" and "nowhere" in result.message
    # all of git's message, on one line: its first line names the cause, its last the advice
    assert "does not appear to be a git repository" in result.message
    assert result.message.endswith("and the repository exists.") and "\n" not in result.message


async def test_cli_sync_once_from_a_file_url(
    kvmctl_thread: Kvmctl, repo: Repository, tmp_path: Path
) -> None:
    repo.write("deploy/vms.yaml", vm_manifest("web"))
    commit = await repo.commit("web")
    url = f"file://{repo.directory}"
    sync = ["sync", "--repo", url, "--path", "./deploy/", "--once", "--prune"]
    sync += ["--cache-dir", str(tmp_path / "cache")]
    code, out, err = await kvmctl_thread(*sync)
    name = default_name(url, "deploy")
    assert code == 0, err
    assert out.strip() == f"gitsync/{name} commit {commit[:12]}: 1 created, 0 configured, " + (
        "0 unchanged, 0 pruned"
    )
    code, out, _ = await kvmctl_thread("get", "gitsync")
    assert code == 0 and name in out and commit[:12] in out

    repo.write("deploy/vms.yaml", vm_manifest("web").replace("vcpus: 1", "vcpus: many"))
    await repo.commit("bad vcpus")
    code, out, err = await kvmctl_thread(*sync)
    assert code == 1 and out == ""
    assert "InvalidManifest" in err and "deploy/vms.yaml, document 0: spec.vcpus" in err

    code, _, err = await kvmctl_thread(*sync[:-2], "--interval", "0s")
    assert code == 2 and "interval '0s'" in err


async def test_the_loop_corrects_drift_and_stops_on_sigterm(
    store: Store, repo: Repository, etcd_endpoints: list[str], key_prefix: str, tmp_path: Path
) -> None:
    repo.write("vms.yaml", vm_manifest("web"))
    commit = await repo.commit("web")
    env = {
        **os.environ,
        "KVMCTL_ETCD": ",".join(etcd_endpoints),
        "KVMCTL_PREFIX": key_prefix,
        "KVMCTL_CONFIG": "",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli",
        "sync",
        "--repo",
        str(repo.directory),
        "--name",
        "loop",
        "--interval",
        "1s",
        "--cache-dir",
        str(tmp_path / "cache"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def synced() -> bool:
            state = await store.try_get("GitSync", "loop")
            return state is not None and state.status.last_synced_commit == commit

        await eventually(synced, "the first sync")
        web = await store.get("VirtualMachine", "web")
        web.spec.memory_mib = 2048
        await store.update(web)

        async def restored() -> bool:
            return await vm_memory(store, "web") == 256

        await eventually(restored, "drift correction")
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), DEADLINE)
        assert process.returncode == 0, err.decode()
        assert f"gitsync/loop commit {commit[:12]}: 1 created" in out.decode()
        assert "1 configured" in out.decode()  # the drift correction was reported
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_intervals_names_and_paths() -> None:
    assert [parse_interval(t) for t in ("30s", "5m", "1h", "45", " 2m ")] == [
        30,
        300,
        3600,
        45,
        120,
    ]
    for bad in ("0", "-1s", "1.5m", "1d", "soon", ""):
        with pytest.raises(ValueError, match="interval"):
            parse_interval(bad)
    assert normalize_path("./clusters/lab/") == "clusters/lab"
    assert normalize_path("/") == normalize_path("") == normalize_path(".") == "."
    with pytest.raises(ValueError, match="inside the repository"):
        normalize_path("clusters/../../etc")
    name = default_name("https://git.example.com/Ops/Cluster_Config.git", "clusters/lab")
    assert name.startswith("cluster-config-clusters-lab-") and len(name) <= 63
    assert default_name("/srv/x", ".") != default_name("/srv/y", ".")
    long = default_name("/srv/" + "a" * 100, "b" * 100)
    assert len(long) == 63 and long[-9] == "-"
