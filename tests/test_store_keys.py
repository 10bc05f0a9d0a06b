"""The store's typed raw-key API (`store.keys`, controller/runtime/store_keys.py) on a real etcd."""

from __future__ import annotations

import pytest

from controller.runtime.leader_record import guard_compare
from controller.runtime.store import Conflict, Delete, Get, KeyCompare, KeyValue, Put, Store
from tests.support.ha import node_object


def key(store: Store, name: str) -> str:
    return f"{store.prefix}/raw/{name}"


async def test_get_put_delete(store: Store) -> None:
    assert await store.keys.get(key(store, "a")) is None
    await store.keys.put(key(store, "a"), b"one")
    first = await store.keys.get(key(store, "a"))
    assert isinstance(first, KeyValue)
    assert (first.key, first.value, first.version, first.lease) == (
        key(store, "a").encode(),
        b"one",
        1,
        0,
    )
    assert first.create_revision == first.mod_revision
    await store.keys.put(key(store, "a").encode(), b"two")
    second = await store.keys.get(key(store, "a"), serializable=True)
    assert second is not None and second.value == b"two"
    assert second.create_revision == first.create_revision < second.mod_revision
    assert await store.keys.delete(key(store, "a")) is True
    assert await store.keys.delete(key(store, "a")) is False
    assert await store.keys.get(key(store, "a")) is None


async def test_prefix_and_lease(store: Store) -> None:
    lease = await store.call(store.client.lease(30))
    try:
        await store.keys.put(key(store, "p/2"), b"b", lease=lease.id)
        await store.keys.put(key(store, "p/1"), b"a")
        await store.keys.put(key(store, "q"), b"other")
        listed = await store.keys.get_prefix(key(store, "p/"))
        assert [(kv.key.decode().rsplit("/", 1)[1], kv.value) for kv in listed] == [
            ("1", b"a"),
            ("2", b"b"),
        ]
        assert [kv.lease for kv in listed] == [0, lease.id]
    finally:
        await store.call(lease.revoke())
    assert [kv.value for kv in await store.keys.get_prefix(key(store, "p/"))] == [b"a"]


async def test_transaction_compares_and_results(store: Store) -> None:
    k = key(store, "t")
    ok, results = await store.keys.transaction(
        [KeyCompare.created(k, 0), KeyCompare.version(k, 0)], [Put(k, b"v1"), Get(k)]
    )
    assert ok
    assert results[0] is None
    created = results[1]
    assert isinstance(created, KeyValue) and created.value == b"v1"
    # A stale compare runs the failure branch instead.
    ok, results = await store.keys.transaction(
        [KeyCompare.created(k, 0)], [Put(k, b"never")], [Get(k), Get(key(store, "none"))]
    )
    assert not ok
    assert results == [created, None]
    ok, _ = await store.keys.transaction(
        [KeyCompare.modified(k, created.mod_revision), KeyCompare.value(k, b"v1")], [Put(k, b"v2")]
    )
    assert ok
    ok, results = await store.keys.transaction([KeyCompare.value(k, b"v1")], [Delete(k)])
    assert (ok, results) == (False, [])
    ok, results = await store.keys.transaction(
        [KeyCompare.value(k, b"v2")], [Delete(k), Delete(key(store, "none"))]
    )
    assert (ok, results) == (True, [True, False])


async def test_leader_guard_in_raw_and_object_transactions(store: Store) -> None:
    """The fencing guard (an aetcd compare built by the runtime) mixes with typed compares, and
    typed compares guard object writes."""
    term = key(store, "term")
    await store.keys.put(term, b"leader")
    record = await store.keys.get(term)
    assert record is not None
    guard = guard_compare(store.client, term, record.create_revision)
    k = key(store, "guarded")
    ok, _ = await store.keys.transaction([guard, KeyCompare.created(k, 0)], [Put(k, b"x")])
    assert ok
    stale = guard_compare(store.client, term, record.create_revision + 1000)
    ok, _ = await store.keys.transaction([stale], [Delete(k)])
    assert not ok
    assert await store.keys.get(k) is not None
    with pytest.raises(Conflict):
        await store.create(node_object("n1"), guard=[KeyCompare.value(k, b"not-x")])
    created = await store.create(node_object("n1"), guard=[KeyCompare.value(k, b"x")])
    assert created.metadata.name == "n1"
