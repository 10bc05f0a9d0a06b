"""`kvmctl dashboard` against a real etcd, run as users run it (its own process): the snapshot,
the Server-Sent Events that follow etcd's watch (objects, the leader, heartbeat ages), read-only
HTTP, and the rules for serving beyond loopback (HTTPS and the monitor role, with etcd's RBAC
on)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from controller.rbac import apply_rbac, cluster_roles
from controller.runtime import layout_keys
from controller.runtime.events import EventRecorder
from controller.runtime.leader import LeaderElector
from controller.runtime.leader_record import CONTROLLER_ELECTION
from controller.runtime.store import Store
from controller.runtime.tasks import cancel_and_wait
from crds import ClusterNode, VirtualMachine
from crds.meta import now
from crds.virtualmachine import Placement
from e2e.harness.dashboard import dashboard_process, fetch, snapshot_stream
from e2e.harness.etcd import EtcdCluster
from tests.support.cli import Run
from tests.support.ha import ELECTION, TIMINGS, Leases, node_object, vm_object
from tests.support.rbac import PREFIX, etcd_with_rbac, make_pki, store_as, tls

DEADLINE = 30.0


@pytest.fixture
async def dashboard(etcd_endpoints: list[str], key_prefix: str, store: Store) -> AsyncIterator[str]:
    """Nodes a (with vm1 running) and b, both Online; the dashboard's URL."""
    for name in ("a", "b"):
        node = await store.create(node_object(name))
        node.status.health = "Online"
        await store.update_status(node)
    await place(store, "vm1", "a", create=True)
    env = {"KVMCTL_ETCD": ",".join(etcd_endpoints), "KVMCTL_PREFIX": key_prefix}
    async with dashboard_process(["--port", "0"], {**env, "KVMCTL_CONFIG": ""}) as url:
        yield url


async def place(store: Store, name: str, node: str, create: bool = False) -> None:
    """VM `name` placed and running on `node`, as the controller and agent would report it."""
    vm = await store.create(vm_object(name)) if create else await store.get("VirtualMachine", name)
    assert isinstance(vm, VirtualMachine)
    vm.status.placement = Placement(node=node, token=1, since=now())
    vm.status.node, vm.status.state = node, "Running"
    await store.update_status(vm)


def host(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(n for n in snapshot["nodes"] if n["name"] == name)
    return found


async def until(
    snapshots: AsyncIterator[dict[str, Any]], condition: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        async for snapshot in snapshots:
            if condition(snapshot):
                return snapshot
    raise AssertionError("the stream ended")


async def test_snapshot_shows_hosts_and_where_each_vm_runs(dashboard: str) -> None:
    status, headers, body = await fetch(dashboard + "api/snapshot")
    assert status == 200 and headers["content-type"] == "application/json"
    snapshot = json.loads(body)
    assert [(n["name"], n["health"], n["vms"]) for n in snapshot["nodes"]] == [
        ("a", "Online", ["vm1"]),
        ("b", "Online", []),
    ]
    (vm,) = snapshot["vms"]
    assert (vm["name"], vm["node"], vm["state"]) == ("vm1", "a", "Running")
    assert snapshot["leader"] is None
    assert [n["heartbeatAgeSeconds"] for n in snapshot["nodes"]] == [None, None]


async def test_stream_shows_the_leader_and_heartbeat_ages_live(
    dashboard: str, store: Store, leases: Leases
) -> None:
    """A leader elected and gone, a heartbeat held and dropped: each seen without asking."""
    terms: list[int] = []

    async def lead(token: int) -> None:
        terms.append(token)
        await asyncio.Event().wait()

    elector = LeaderElector(
        store.client, store.prefix, CONTROLLER_ELECTION, "ctl-1", ELECTION, node="b"
    )
    async with snapshot_stream(dashboard) as snapshots:
        await until(snapshots, lambda s: s["leader"] is None)
        await leases.hold("a")
        campaign = asyncio.create_task(elector.run(lead))
        try:
            seen = await until(
                snapshots,
                lambda s: (
                    s["leader"] is not None and host(s, "a")["heartbeatAgeSeconds"] is not None
                ),
            )
            leader = seen["leader"]
            assert (leader["identity"], leader["node"], leader["term"]) == ("ctl-1", "b", terms[0])
            assert 0 <= host(seen, "a")["heartbeatAgeSeconds"] <= TIMINGS.lease_ttl
            assert host(seen, "b")["heartbeatAgeSeconds"] is None
            await leases.drop("a")
            await until(snapshots, lambda s: host(s, "a")["heartbeatAgeSeconds"] is None)
        finally:
            await cancel_and_wait([campaign])  # resigns: the leader key goes
        await until(snapshots, lambda s: s["leader"] is None)


async def test_stream_follows_a_failover_as_etcd_sees_it(dashboard: str, store: Store) -> None:
    async with snapshot_stream(dashboard) as snapshots:
        first = await until(snapshots, lambda s: True)
        assert host(first, "a")["health"] == "Online"
        node = await store.get("ClusterNode", "a")
        assert isinstance(node, ClusterNode)
        recorder = EventRecorder(store, "kvmctl-controller")
        await recorder.record(node, "Warning", "NodeLost", "heartbeat lease expired")
        node.status.health = "Fenced"
        await store.update_status(node)
        await recorder.record(node, "Normal", "NodeFenced", "power off confirmed")
        await place(store, "vm1", "b")
        after = await until(
            snapshots,
            lambda s: host(s, "b")["vms"] == ["vm1"] and len(s["timeline"]) == 2,
        )
    assert host(after, "a")["health"] == "Fenced" and host(after, "a")["vms"] == []
    assert [e["reason"] for e in after["timeline"]] == ["NodeLost", "NodeFenced"]
    assert {e["reason"] for e in after["events"]} == {"NodeLost", "NodeFenced"}
    assert after["revision"] > first["revision"]


async def test_read_only_and_self_contained(dashboard: str) -> None:
    status, headers, page = await fetch(dashboard)
    assert status == 200 and "default-src 'self'" in headers["content-security-policy"]
    for name in ("dashboard.js", "dashboard.css"):
        code, _, text = await fetch(dashboard + name)
        assert code == 200
        page += text
    assert b"http://" not in page and b"https://" not in page, "nothing from elsewhere"
    assert (await fetch(dashboard + "api/snapshot", "POST"))[0] == 405
    assert (await fetch(dashboard + "api/snapshot", "DELETE"))[0] == 405
    assert (await fetch(dashboard + "nothing-here"))[0] == 404
    head = await fetch(dashboard, "HEAD")
    assert head[0] == 200 and head[2] == b""
    assert (await fetch(dashboard + "healthz"))[2] == b"ok\n"


async def test_an_oversized_request_is_refused(dashboard: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(dashboard).port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nX-Padding: " + b"x" * 20000)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), DEADLINE)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    ("flags", "wanted"),
    [
        (["--address", "0.0.0.0"], "needs HTTPS (--tls-cert and --tls-key)"),
        (["--address", "192.0.2.1", "--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
        (
            ["--address", "::", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
            "credentials of the read-only monitor role",
        ),
    ],
)
def test_refuses_beyond_loopback_without_https_and_monitor(
    kvmctl: Run, flags: list[str], wanted: str
) -> None:
    code, out, err = kvmctl("dashboard", *flags)
    assert code == 2 and out == ""
    assert wanted in err and err.count("\n") == 1


# Beyond loopback: HTTPS, and etcd's monitor role with authentication on ----------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), hosts="host1")


async def _setup(etcd: EtcdCluster, pki: Path) -> None:
    """host1 Online with a heartbeat (a lease that outlives the module), a leader record."""
    async with store_as(etcd, pki, "admin") as admin:
        node = await admin.create(node_object("host1"))
        node.status.health = "Online"
        await admin.update_status(node)
        lease = await admin.client.lease(600)
        heartbeat = layout_keys.absolute(PREFIX, layout_keys.heartbeat("host1"))
        await admin.keys.put(heartbeat, b"{}", lease=lease.id)
        record = {"identity": "ctl-1", "acquiredAt": now().isoformat()}
        leader = layout_keys.absolute(PREFIX, layout_keys.leader(CONTROLLER_ELECTION))
        await admin.keys.put(leader, json.dumps(record).encode())
        await apply_rbac(admin, cluster_roles(["host1"]))


@pytest.fixture(scope="module")
def rbac_etcd(pki: Path) -> Iterator[EtcdCluster]:
    with etcd_with_rbac(pki, _setup) as cluster:
        yield cluster


def _remote_flags(pki: Path, user: str) -> list[str]:
    client = tls(pki, user)
    return [
        "--address", "0.0.0.0", "--port", "0",
        "--tls-cert", str(pki / "etcd1.crt"), "--tls-key", str(pki / "etcd1.key"),
        "--cacert", str(client.ca), "--cert", str(client.cert), "--key", str(client.key),
    ]  # fmt: skip


async def test_remote_dashboard_serves_https_as_monitor(rbac_etcd: EtcdCluster, pki: Path) -> None:
    env = {"KVMCTL_ETCD": ",".join(rbac_etcd.endpoints), "KVMCTL_PREFIX": PREFIX}
    async with dashboard_process(_remote_flags(pki, "monitor"), env) as url:
        assert url.startswith("https://0.0.0.0:")
        local = url.replace("0.0.0.0", "127.0.0.1")
        trusted = ssl.create_default_context(cafile=pki / "ca.crt")
        status, _, body = await fetch(local + "api/snapshot", tls=trusted)
        assert status == 200
        snapshot = json.loads(body)  # the monitor role reads the leader and the lease's age too
        assert snapshot["leader"]["identity"] == "ctl-1"
        assert host(snapshot, "host1")["heartbeatAgeSeconds"] is not None
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ValueError)):
            await fetch(local.replace("https", "http") + "api/snapshot")
    with pytest.raises(RuntimeError, match="not user 'admin'"):
        async with dashboard_process(_remote_flags(pki, "admin"), env):
            pass
