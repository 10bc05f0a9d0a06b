"""etcd with mutual TLS and authentication: each component reaches only its own keys.

One real etcd per module, its users and roles set by `apply_rbac` (the code behind
`kvmctl admin rbac apply`), then authentication enabled. Every client below is a real
certificate from deploy/etcd/make-certs.sh; etcd takes the user name from its CN.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.cli import main
from controller.rbac import apply_rbac, cluster_roles, key_range
from controller.runtime import layout_keys
from controller.runtime.etcd_transport import TlsFiles, certificate_user
from controller.runtime.heartbeat import Heartbeat, HeartbeatTiming
from controller.runtime.store import PermissionDenied, Store, StoreError
from crds import AnyResource, ClusterNode, parse_object
from e2e.harness.etcd import EtcdCluster
from reconcilers.lvm_lock import LvmSettings, metadata_lock
from tests.support.rbac import PREFIX, etcd_with_rbac, make_pki, store_as

NODES = ["host1", "host2"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


SECRET = {
    "apiVersion": "kvmctl.io/v1alpha1",
    "kind": "Secret",
    "metadata": {"name": "bmc"},
    "spec": {"data": {"password": "not-for-agents"}},
}
VM = {
    "apiVersion": "kvmctl.io/v1alpha1",
    "kind": "VirtualMachine",
    "metadata": {"name": "vm1"},
    "spec": {"memoryMiB": 64},
}


async def _setup(etcd: EtcdCluster, pki: Path) -> None:
    async with store_as(etcd, pki, "admin") as admin:
        await admin.create(parse_object(SECRET))
        await admin.create(parse_object(VM))
        await apply_rbac(admin, cluster_roles(NODES))


@pytest.fixture(scope="module")
def etcd(pki: Path) -> Iterator[EtcdCluster]:
    with etcd_with_rbac(pki, _setup) as cluster:
        yield cluster


@pytest.fixture
async def agent(etcd: EtcdCluster, pki: Path) -> AsyncIterator[Store]:
    async with store_as(etcd, pki, "agent-host1") as store:
        yield store.as_writer("node.host1")


@pytest.fixture
async def monitor(etcd: EtcdCluster, pki: Path) -> AsyncIterator[Store]:
    async with store_as(etcd, pki, "monitor") as store:
        yield store


def test_user_name_is_the_certificate_cn(pki: Path) -> None:
    assert certificate_user((pki / "agent-host1.crt").read_bytes()) == "agent-host1"
    assert certificate_user((pki / "ca.crt").read_bytes()) == "kvmctl-etcd-ca"
    assert certificate_user(b"not a certificate") is None


def test_prefix_grants_cover_exactly_their_range() -> None:
    assert key_range("/kvmctl/", cluster_roles(["host1"])[0].grants[0]) == (
        b"/kvmctl/",
        b"/kvmctl0",
    )
    agent = cluster_roles(["host1"])[2]
    single = [g for g in agent.grants if not g.prefix]
    assert [key_range(PREFIX, g) for g in single] == [
        (b"/kvmctl/layout", b""),
        (b"/kvmctl/heartbeats/host1", b""),
        (b"/kvmctl/sessions/host1", b""),
        (b"/kvmctl/reports/host1", b""),
    ]
    kind_writes = [g.key for g in agent.grants if g.access != "read" and g.key.startswith("kinds/")]
    assert kind_writes and all("/node.host1/" in key for key in kind_writes)


def test_secret_readers_must_be_nodes() -> None:
    with pytest.raises(ValueError, match="secret reader 'host3' is not one of the nodes"):
        cluster_roles(["host1"], ["host3"])


async def test_apply_again_changes_nothing(etcd: EtcdCluster, pki: Path) -> None:
    async with store_as(etcd, pki, "admin") as admin:
        assert await apply_rbac(admin, cluster_roles(NODES)) == []


async def test_agent_writes_its_heartbeat_not_another_nodes(agent: Store) -> None:
    for own in (
        layout_keys.absolute(PREFIX, layout_keys.heartbeat("host1")).encode(),
        f"{PREFIX}/reports/host1".encode(),
    ):
        await agent.call(agent.client.put(own, b"{}"), own, "write")
    other = layout_keys.absolute(PREFIX, layout_keys.heartbeat("host2")).encode()
    with pytest.raises(PermissionDenied) as refused:
        await agent.call(agent.client.put(other, b"{}"), other, "write")
    assert str(refused.value) == (
        "etcd refused the write of heartbeats/host2: user agent-host1 lacks permission"
    )


async def _never_called() -> None:
    raise AssertionError("self-fencing is off")


async def test_agent_heartbeat_runs_under_its_role(agent: Store) -> None:
    heartbeat = Heartbeat(
        agent.client,
        PREFIX,
        "host1",
        "test",
        HeartbeatTiming(ttl=3, renew_interval=0.5, self_fence_margin=1.0),
        self_fence_enabled=lambda: False,
        on_self_fence=_never_called,
    )
    task = asyncio.create_task(heartbeat.run())
    try:
        await asyncio.wait_for(heartbeat.established.wait(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_agent_reports_status_and_holds_the_vg_lock(agent: Store) -> None:
    vm = await agent.get("VirtualMachine", "vm1")
    await agent.patch_status("VirtualMachine", "vm1", lambda status: None)
    assert vm.metadata.name == "vm1"
    async with metadata_lock(agent, "vg0", LvmSettings(lock_ttl=5, lock_timeout=20)):
        pass


async def test_agent_cannot_read_secrets(agent: Store) -> None:
    refused = r"^etcd refused the read of kinds/Secret/spec/bmc: "
    with pytest.raises(PermissionDenied, match=refused):
        await agent.get("Secret", "bmc")
    with pytest.raises(PermissionDenied, match="read of kinds/Secret/: user agent-host1"):
        await agent.list_objects("Secret")


async def test_an_agent_without_secret_read_still_runs_storage(agent: Store) -> None:
    from reconcilers.storage import may_read_secrets

    assert await may_read_secrets(agent, "host1") is False


async def test_agent_cannot_write_leader_requests_or_other_reports(agent: Store) -> None:
    for key in (
        layout_keys.absolute(PREFIX, layout_keys.leader("controller")),
        f"{PREFIX}/requests/fence-ack/host2",
        f"{PREFIX}/reports/host2",
    ):
        with pytest.raises(PermissionDenied, match="user agent-host1 lacks permission"):
            await agent.call(agent.client.put(key.encode(), b"x"), key.encode(), "write")


def _node(name: str) -> AnyResource:
    return parse_object(
        {
            "apiVersion": "kvmctl.io/v1alpha1",
            "kind": "ClusterNode",
            "metadata": {"name": name},
            "spec": {"addresses": {"cluster": "10.0.0.1"}},
        }
    )


async def test_agent_reports_its_own_cluster_node_only(
    etcd: EtcdCluster, pki: Path, agent: Store
) -> None:
    with pytest.raises(PermissionDenied, match="write of kinds/ClusterNode/spec/host1"):
        await agent.create(_node("host1"))
    async with store_as(etcd, pki, "admin") as admin:
        for name in ("host1", "host2"):
            await admin.create(_node(name))

    def report(node: ClusterNode) -> None:
        node.status.agent_version = "from host1"

    assert (await agent.patch_status("ClusterNode", "host1", report)).status.agent_version
    # host1's part of host2 is its own key, but only host2's part counts for host2.
    assert not (await agent.patch_status("ClusterNode", "host2", report)).status.agent_version
    assert [n.metadata.name for n in (await agent.list_objects("ClusterNode"))[0]] == [
        "host1",
        "host2",
    ]


async def test_agent_cannot_write_secrets(agent: Store) -> None:
    forged = parse_object({**SECRET, "metadata": {"name": "forged"}})
    with pytest.raises(PermissionDenied, match="write of kinds/Secret/spec/forged"):
        await agent.create(forged)


async def test_monitor_lists_but_cannot_write_or_read_secrets(monitor: Store) -> None:
    vms, _ = await monitor.list_objects("VirtualMachine")
    assert [vm.metadata.name for vm in vms] == ["vm1"]
    refused = "write of kinds/VirtualMachine/spec/vm2: user monitor"
    with pytest.raises(PermissionDenied, match=refused):
        await monitor.create(parse_object({**VM, "metadata": {"name": "vm2"}}))
    with pytest.raises(PermissionDenied, match="read of kinds/Secret/spec/bmc: user monitor"):
        await monitor.get("Secret", "bmc")


async def test_monitor_cannot_watch_secrets(monitor: Store) -> None:
    revision = await monitor.revision()
    with pytest.raises(PermissionDenied, match="watch of kinds/Secret/: user monitor"):
        async with asyncio.timeout(20):
            async for _ in monitor.watch("Secret", revision):
                pass


async def test_controller_reads_secrets_and_writes_leader(etcd: EtcdCluster, pki: Path) -> None:
    async with store_as(etcd, pki, "controller") as controller:
        assert (await controller.get("Secret", "bmc")).metadata.name == "bmc"
        key = layout_keys.absolute(PREFIX, layout_keys.leader("controller")).encode()
        await controller.call(controller.client.put(key, b"x"), key, "write")
        await controller.call(controller.client.delete(key), key, "delete")


async def test_certificate_without_etcd_user_is_refused(etcd: EtcdCluster, pki: Path) -> None:
    with pytest.raises(PermissionDenied, match="user agent-host9 lacks permission"):
        async with store_as(etcd, pki, "agent-host9"):
            pass


async def test_missing_or_foreign_certificate_is_refused(
    etcd: EtcdCluster, pki: Path, tmp_path: Path
) -> None:
    with pytest.raises(StoreError, match=r"unreachable|failed"):
        async with Store(etcd.endpoints, PREFIX, timeout=3, tls=TlsFiles(ca=pki / "ca.crt")):
            pass
    other = make_pki(tmp_path / "other")
    foreign = TlsFiles(ca=pki / "ca.crt", cert=other / "admin.crt", key=other / "admin.key")
    with pytest.raises(StoreError, match=r"unreachable|failed"):
        async with Store(etcd.endpoints, PREFIX, timeout=3, tls=foreign):
            pass


def _cli(etcd: EtcdCluster, pki: Path, user: str) -> list[str]:
    return [
        "--etcd",
        etcd.endpoints[0],
        "--prefix",
        PREFIX,
        "--cacert",
        str(pki / "ca.crt"),
        "--cert",
        str(pki / f"{user}.crt"),
        "--key",
        str(pki / f"{user}.key"),
        "admin",
        "rbac",
        "apply",
        "--nodes",
        ",".join(NODES),
    ]


def test_cli_apply_as_admin_and_as_monitor(
    etcd: EtcdCluster, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_cli(etcd, pki, "admin")) == 0
    assert capsys.readouterr().out.splitlines() == [
        "users and roles unchanged",
        "authentication enabled",
    ]
    assert main(_cli(etcd, pki, "monitor")) == 1
    error = capsys.readouterr().err
    assert error == (
        "error: etcd refused to list roles: user monitor lacks the root role "
        "(use the admin certificate)\n"
    )
