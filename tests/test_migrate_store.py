"""Upgrading a store of the previous layout (`objects/{Kind}/{name}`) on a real etcd."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from controller.cli import main
from controller.runtime.store import Store, StoreError
from crds import AnyResource, parse_object

NOW = "2026-01-01T00:00:00Z"


def old_object(kind: str, name: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    metadata = {
        "name": name,
        "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
        "generation": 3,
        "creationTimestamp": NOW,
        "labels": {"app": "db"},
        "finalizers": extra.pop("finalizers", []),
    }
    return {
        "apiVersion": "kvmctl.io/v1alpha1",
        "kind": kind,
        "metadata": metadata,
        "spec": spec,
        **extra,
    }


OLD = [
    old_object(
        "VirtualMachine",
        "vm1",
        {"memoryMiB": 64, "vcpus": 2},
        finalizers=["kvmctl.io/domain", "example.com/backup"],
        status={
            "placement": {"node": "host1", "token": 7, "since": NOW},
            "state": "Running",
            "node": "host1",
            "relocations": 1,
        },
    ),
    old_object(
        "ClusterNode",
        "host1",
        {"addresses": {"cluster": "10.0.0.1"}},
        status={"health": "Online", "agentVersion": "0.1"},
    ),
    old_object("Secret", "bmc", {"data": {"password": "pw"}}),
]


class OldStore:
    """A prefix of the shared etcd holding `OLD` in the previous layout."""

    def __init__(self, endpoints: list[str], prefix: str) -> None:
        self.endpoints, self.prefix = endpoints, prefix

    def store(self) -> Store:
        return Store(self.endpoints, prefix=self.prefix)

    async def put(self, relative: str, value: bytes) -> None:
        store = self.store()
        await store.connect(check_layout=False)
        try:
            await store.client.put(store.raw_key(relative), value)
        finally:
            await store.close()

    async def keys(self) -> dict[bytes, bytes]:
        async with self.store() as store:
            return {kv.key: kv.value for kv in await store.client.get_prefix(store.raw_key(""))}

    async def keys_unchecked(self) -> dict[bytes, bytes]:
        """Every key, also while the store is still in the old layout."""
        store = self.store()
        await store.connect(check_layout=False)
        try:
            return {kv.key: kv.value for kv in await store.client.get_prefix(store.raw_key(""))}
        finally:
            await store.close()

    def cli(self, *args: str) -> int:
        return main(["--etcd", self.endpoints[0], "--prefix", self.prefix, *args])


@pytest.fixture
def old_store(etcd_endpoints: list[str], key_prefix: str) -> OldStore:
    old = OldStore(etcd_endpoints, key_prefix)
    for document in OLD:
        key = f"objects/{document['kind']}/{document['metadata']['name']}"
        asyncio.run(old.put(key, json.dumps(document).encode()))
    return old


def comparable(obj: AnyResource) -> dict[str, Any]:
    document = obj.to_dict()
    document["metadata"].pop("resourceVersion", None)
    document["metadata"]["finalizers"] = sorted(document["metadata"]["finalizers"])
    return document


async def _refused(old: OldStore) -> None:
    with pytest.raises(StoreError, match=r"old key layout .*run `kvmctl admin migrate-store`"):
        await old.store().connect()


async def _check_migrated(old: OldStore) -> None:
    async with old.store() as store:
        for document in OLD:
            expected = parse_object(json.loads(json.dumps(document)))
            got = await store.get(expected.kind, expected.metadata.name)
            assert comparable(got) == comparable(expected)
            assert got.metadata.generation == 3
        assert len(await store.client.get_prefix(store.raw_key("objects/"))) == 0
        assert (await store.client.get(store.raw_key("layout"))).value == b"2"
        # The agent's finalizer went to its node's part: that agent can remove it.
        host1 = store.as_writer("node.host1")
        await host1.remove_finalizer("VirtualMachine", "vm1", "kvmctl.io/domain")
        vm1 = await store.get("VirtualMachine", "vm1")
        assert vm1.metadata.finalizers == ["example.com/backup"]


def test_an_old_store_is_refused_until_migrated(
    old_store: OldStore, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_refused(old_store))
    assert old_store.cli("get", "vms") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "kvmctl admin migrate-store" in error

    assert old_store.cli("admin", "migrate-store") == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:-1]) == [
        "clusternode/host1: migrated",
        "secret/bmc: migrated",
        "virtualmachine/vm1: migrated",
    ]
    assert out[-1] == f"store at {old_store.prefix}: key layout version 2"
    asyncio.run(_check_migrated(old_store))

    before = asyncio.run(old_store.keys())
    assert old_store.cli("admin", "migrate-store") == 0, "idempotent"
    assert capsys.readouterr().out.splitlines() == [
        f"store at {old_store.prefix}: key layout version 2"
    ]
    assert asyncio.run(old_store.keys()) == before


def test_an_object_that_cannot_be_read_stays_and_is_named(
    old_store: OldStore, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(old_store.put("objects/VirtualMachine/bad", b"{not json"))
    assert old_store.cli("admin", "migrate-store") == 1
    captured = capsys.readouterr()
    assert "objects/VirtualMachine/bad: not migrated:" in captured.out
    assert captured.err == "error: 1 object(s) not migrated; the store stays in the old layout\n"
    keys = asyncio.run(OldStore.keys_unchecked(old_store))
    assert f"{old_store.prefix}/layout".encode() not in keys
    assert f"{old_store.prefix}/objects/VirtualMachine/bad".encode() in keys
    assert f"{old_store.prefix}/kinds/VirtualMachine/spec/vm1".encode() in keys
