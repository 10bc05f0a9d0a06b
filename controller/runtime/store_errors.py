"""The store's errors (StoreError and Unavailable come from the etcd transport)."""

from __future__ import annotations

from controller.runtime.etcd_transport import StoreError


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class Conflict(StoreError):
    """The object changed since it was read (stale resourceVersion) or a guard failed."""


class PermissionDenied(StoreError):
    """etcd's RBAC refused the request: this client's user lacks the permission."""


class UndecodableObject(StoreError):
    """A stored value that is not a valid object (written by something other than kvmctl)."""


class Compacted(StoreError):
    """A watch asked for a revision etcd has compacted away: relist."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision {revision} was compacted")
        self.revision = revision
