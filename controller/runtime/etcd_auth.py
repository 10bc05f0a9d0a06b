"""etcd's Auth service (users, roles, permissions) on the store's connected channel.

Thin and typed: `controller/rbac.py` decides which users and roles kvmctl needs; this module
only speaks the wire protocol, and turns a refusal into a one-line `StoreError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd.rpc
import grpc

from .store import Store, StoreError

T = TypeVar("T")

KeyRange = tuple[bytes, bytes]
"""etcd's [key, range_end); range_end empty for a single key."""


class EtcdAuth:
    """etcd's Auth service, called with the store's timeout."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.stub = store.client.stub(aetcd.rpc.AuthStub)

    async def _call(self, what: str, method: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await method(request, timeout=self.store.timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                who = f"user {self.store.user}" if self.store.user else "this client"
                raise StoreError(
                    f"etcd refused to {what}: {who} lacks the root role (use the admin certificate)"
                ) from None
            raise StoreError(f"etcd could not {what}: {error.details()}") from None

    async def users(self) -> set[str]:
        reply = await self._call("list users", self.stub.UserList, aetcd.rpc.AuthUserListRequest())
        return set(reply.users)

    async def roles(self) -> set[str]:
        reply = await self._call("list roles", self.stub.RoleList, aetcd.rpc.AuthRoleListRequest())
        return set(reply.roles)

    async def add_user(self, name: str) -> None:
        """A user that authenticates by certificate only (no password)."""
        options = aetcd.rpc.UserAddOptions(no_password=True)
        request = aetcd.rpc.AuthUserAddRequest(name=name, options=options)
        await self._call(f"add user {name}", self.stub.UserAdd, request)

    async def user_roles(self, name: str) -> set[str]:
        request = aetcd.rpc.AuthUserGetRequest(name=name)
        reply = await self._call(f"read user {name}", self.stub.UserGet, request)
        return set(reply.roles)

    async def grant_role(self, user: str, role: str) -> None:
        request = aetcd.rpc.AuthUserGrantRoleRequest(user=user, role=role)
        await self._call(f"grant role {role} to {user}", self.stub.UserGrantRole, request)

    async def revoke_role(self, user: str, role: str) -> None:
        request = aetcd.rpc.AuthUserRevokeRoleRequest(name=user, role=role)
        await self._call(f"revoke role {role} from {user}", self.stub.UserRevokeRole, request)

    async def add_role(self, name: str) -> None:
        request = aetcd.rpc.AuthRoleAddRequest(name=name)
        await self._call(f"add role {name}", self.stub.RoleAdd, request)

    async def permissions(self, role: str) -> dict[KeyRange, int]:
        """The role's permissions: key range -> etcd's permission type (0 read, 1 write, 2 both)."""
        request = aetcd.rpc.AuthRoleGetRequest(role=role)
        reply = await self._call(f"read role {role}", self.stub.RoleGet, request)
        return {(p.key, p.range_end): int(p.permType) for p in reply.perm}

    async def revoke_permission(self, role: str, key_range: KeyRange) -> None:
        key, range_end = key_range
        request = aetcd.rpc.AuthRoleRevokePermissionRequest(role=role, key=key, range_end=range_end)
        await self._call(f"revoke a permission of {role}", self.stub.RoleRevokePermission, request)

    async def grant_permission(
        self, role: str, key_range: KeyRange, permission_type: int, shown: str
    ) -> None:
        key, range_end = key_range
        permission = aetcd.rpc.Permission(permType=permission_type, key=key, range_end=range_end)
        request = aetcd.rpc.AuthRoleGrantPermissionRequest(name=role, perm=permission)
        await self._call(f"grant {shown} to {role}", self.stub.RoleGrantPermission, request)

    async def enable(self) -> None:
        request = aetcd.rpc.AuthEnableRequest()
        await self._call("enable authentication", self.stub.AuthEnable, request)
