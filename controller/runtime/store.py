"""The object store on etcd: keys by writer, compare-and-swap on every write.

The class is assembled from store_client (connection, keys, decoding), store_reads,
store_writes and store_watch; this module is the import path for all of it.

Each object is a spec key plus one status part per writer (controller/runtime/layout.py has the keys
and the merge rule); reads merge them, in one consistent read, into the one object callers see.
`resourceVersion` is the highest mod_revision of the keys merged; every write compares each of them,
so a stale writer gets `Conflict`. `update` owns metadata and spec (and bumps `generation` when the
spec changes); `update_status` writes the store's writer's part only. Deleting an object with
finalizers only sets `deletionTimestamp`; its keys go (all in one transaction) when the last
finalizer is removed, by the controller's garbage collection when that last finalizer was a node's.
`patch_status_many` (store_batch) writes many objects' status in few transactions.
`keys` (store_keys) reads and transacts on raw keys that are not objects, without aetcd.
"""

from __future__ import annotations

from controller.runtime.etcd_transport import StoreError as StoreError
from controller.runtime.etcd_transport import TlsFiles as TlsFiles
from controller.runtime.etcd_transport import Unavailable as Unavailable
from controller.runtime.etcd_transport import certificate_user as certificate_user
from controller.runtime.store_batch import BatchResult as BatchResult
from controller.runtime.store_batch import StoreBatch
from controller.runtime.store_client import DEFAULT_PREFIX as DEFAULT_PREFIX
from controller.runtime.store_client import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from controller.runtime.store_client import Compare as Compare
from controller.runtime.store_client import to_json as to_json
from controller.runtime.store_errors import AlreadyExists as AlreadyExists
from controller.runtime.store_errors import Compacted as Compacted
from controller.runtime.store_errors import Conflict as Conflict
from controller.runtime.store_errors import NotFound as NotFound
from controller.runtime.store_errors import PermissionDenied as PermissionDenied
from controller.runtime.store_errors import UndecodableObject as UndecodableObject
from controller.runtime.store_keys import Delete as Delete
from controller.runtime.store_keys import Get as Get
from controller.runtime.store_keys import KeyCompare as KeyCompare
from controller.runtime.store_keys import KeyValue as KeyValue
from controller.runtime.store_keys import Operation as Operation
from controller.runtime.store_keys import OpResult as OpResult
from controller.runtime.store_keys import Put as Put
from controller.runtime.store_keys import StoreKeys
from controller.runtime.store_watch import StoreWatch
from controller.runtime.store_watch import WatchEvent as WatchEvent


class Store(StoreBatch, StoreWatch):
    """Typed CRUD and watch of kvmctl objects in etcd, as `writer` (controller/runtime/layout.py).

    `writer` is whose status part `update_status`/`patch_status` write and whose part holds
    the finalizers `add_finalizer` adds: "controller" (also what the admin and the CLI use), or
    "node.NODE" for NODE's agent.
    """

    @property
    def keys(self) -> StoreKeys:
        """Raw keys that are not objects (controller/runtime/store_keys.py)."""
        return StoreKeys(self)
