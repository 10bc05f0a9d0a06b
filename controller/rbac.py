"""etcd users and roles for kvmctl's components, as narrow as etcd's key-range permissions allow.

etcd (run with `--client-cert-auth`) takes a client's user name from its certificate's CN
(deploy/etcd/make-certs.sh): `admin`, `controller`, `monitor`, `agent-<node>`,
`fence-<cluster>`. The users have no password: only the certificate authenticates them. Keys
are relative to the cluster prefix.

- admin (and etcd's `root`): role `root`, everything, including users and roles.
- controller: reads everything (it resolves fence passwords); writes every key of the kinds
  (specs of what it creates, its status parts, the deletion of finished objects), the leader
  key, operator requests, results (answers to guest clusters) and locks.
- agent-<node>: reads every kind except Secret, heartbeats, the leader key, locks and LVM
  activation claims; writes only its own node's keys (controller/runtime/layout.py and
  layout_keys.py, which build every key and range granted here): its status
  parts (`kinds/{Kind}/status/node.<node>/`) of the kinds it reports on, its Events
  (`kinds/Event/node.<node>/`), its heartbeat, session trace and report; plus the VolumeGroup
  metadata locks and LVM activation claims, which every agent shares by nature (each takes them
  over from a fenced node). No spec key, no controller part, no other node's key: it creates
  and deletes no object.
  Nodes named as secret readers (storage nodes serving CHAP targets) also read Secrets.
- fence-<cluster>: `fence_kvmctl` in guest cluster <cluster>: writes only its own fence
  requests, reads only the controller's answers and power states for it (no object at all).
- monitor: reads every kind except Secret, heartbeats, the leader key, operator requests and
  agent reports; writes nothing.

`apply_rbac` makes etcd match exactly (extra permissions and roles of the managed users are
revoked), then enables authentication. Running it again changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from controller.runtime import layout, layout_keys
from controller.runtime.etcd_auth import EtcdAuth
from controller.runtime.store import Store
from crds import KINDS
from crds.meta import _check_name

Access = Literal["read", "write", "readwrite"]
_PERMISSION_TYPES: dict[Access, int] = {"read": 0, "write": 1, "readwrite": 2}

ROOT_ROLE = "root"
ADMIN_USERS = ("root", "admin")
CONTROLLER = "controller"
MONITOR = "monitor"
AGENT_PREFIX = "agent-"
GUEST_FENCE_PREFIX = "fence-"

REPORTED_KINDS = (
    "ClusterNode",
    "Bond",
    "IscsiTarget",
    "VolumeGroup",
    "VirtualMachine",
    "VirtualMachineMigration",
)
"""The kinds an agent writes its own node's status part of."""


@dataclass(frozen=True)
class Grant:
    """`access` to `key` (relative to the cluster prefix), or to every key under it."""

    access: Access
    key: str
    prefix: bool = True

    def __str__(self) -> str:
        return f"{self.access} {self.key}{'*' if self.prefix else ''}"


@dataclass(frozen=True)
class Role:
    """An etcd role and the one user (of the same name) that holds it."""

    name: str
    grants: tuple[Grant, ...]


def _readable_objects(secrets: bool) -> list[Grant]:
    """Read grants per kind: one range per kind, so the Secret range can be left out."""
    return [Grant("read", layout.kind_range(k)) for k in KINDS if secrets or k != "Secret"]


_PROBE = Grant("read", layout_keys.REVISION_PROBE)
"""Every client reads this empty range to learn the store's revision (Store.revision)."""
_LAYOUT = Grant("read", layout.LAYOUT_KEY, prefix=False)
"""Every client checks the store's key layout version when it connects."""


def controller_role() -> Role:
    return Role(
        CONTROLLER,
        (
            Grant("read", layout_keys.EVERYTHING),
            Grant("readwrite", layout.KINDS_RANGE),
            Grant("readwrite", layout_keys.LEADERS),
            Grant("readwrite", layout_keys.REQUESTS),
            Grant("readwrite", layout_keys.RESULTS),
            Grant("readwrite", layout_keys.LOCKS),
        ),
    )


def agent_role(node: str, read_secrets: bool = False) -> Role:
    """The role of `node`'s agent; `read_secrets` for a storage node serving CHAP targets."""
    writer = layout.node_writer(node)
    return Role(
        f"{AGENT_PREFIX}{node}",
        (
            _PROBE,
            _LAYOUT,
            *_readable_objects(read_secrets),
            *(Grant("readwrite", layout.parts_range(kind, writer)) for kind in REPORTED_KINDS),
            Grant("readwrite", layout.spec_range("Event", writer)),
            Grant("read", layout_keys.HEARTBEATS),
            Grant("readwrite", layout_keys.heartbeat(node), prefix=False),
            Grant("readwrite", layout_keys.session(node), prefix=False),
            Grant("readwrite", layout_keys.report(node), prefix=False),
            Grant("read", layout_keys.LEADERS),
            Grant("readwrite", layout_keys.VG_METADATA_LOCKS),
            Grant("readwrite", layout_keys.LV_ACTIVATION_CLAIMS),
        ),
    )


def monitor_role() -> Role:
    return Role(
        MONITOR,
        (
            _PROBE,
            _LAYOUT,
            *_readable_objects(secrets=False),
            Grant("read", layout_keys.HEARTBEATS),
            Grant("read", layout_keys.LEADERS),
            Grant("read", layout_keys.REQUESTS),
            Grant("read", layout_keys.REPORTS),
            Grant("read", layout_keys.LV_ACTIVATION_CLAIMS),
        ),
    )


def guest_fence_role(cluster: str) -> Role:
    """The role of `fence_kvmctl` in guest cluster `cluster` (controller/ha/guest_requests.py)."""
    return Role(
        f"{GUEST_FENCE_PREFIX}{_check_name(cluster)}",
        (
            _PROBE,
            Grant("readwrite", layout_keys.guest_fence_requests(cluster)),
            Grant("read", layout_keys.guest_fence_results(cluster)),
        ),
    )


def cluster_roles(
    nodes: Sequence[str], secret_readers: Sequence[str] = (), guest_clusters: Sequence[str] = ()
) -> list[Role]:
    """The controller, monitor, one agent role per node and one per guest cluster."""
    unknown = sorted(set(secret_readers) - set(nodes))
    if unknown:
        raise ValueError(f"secret reader {unknown[0]!r} is not one of the nodes given")
    agents = [agent_role(node, node in secret_readers) for node in sorted(set(nodes))]
    guests = [guest_fence_role(cluster) for cluster in sorted(set(guest_clusters))]
    return [controller_role(), monitor_role(), *agents, *guests]


def key_range(prefix: str, grant: Grant) -> tuple[bytes, bytes]:
    """etcd's [key, range_end) for a grant; range_end is empty for a single key."""
    key = f"{prefix.rstrip('/')}/{grant.key}".encode()
    if not grant.prefix:
        return key, b""
    return key, key[:-1] + bytes([key[-1] + 1])


async def _ensure_user(auth: EtcdAuth, name: str, roles: set[str], existing: set[str]) -> list[str]:
    changes = []
    if name not in existing:
        await auth.add_user(name)
        changes.append(f"user {name}: created (certificate only, no password)")
    held = await auth.user_roles(name)
    for role in sorted(roles - held):
        await auth.grant_role(name, role)
        changes.append(f"user {name}: granted role {role}")
    for role in sorted(held - roles):
        await auth.revoke_role(name, role)
        changes.append(f"user {name}: revoked role {role}")
    return changes


async def _ensure_role(auth: EtcdAuth, role: Role, prefix: str, existing: set[str]) -> list[str]:
    changes = []
    if role.name not in existing:
        await auth.add_role(role.name)
        changes.append(f"role {role.name}: created")
    held = await auth.permissions(role.name)
    wanted = {key_range(prefix, grant): grant for grant in role.grants}
    for (key, range_end), _ in sorted(held.items()):
        if (key, range_end) not in wanted:
            await auth.revoke_permission(role.name, (key, range_end))
            shown = key.decode(errors="replace") + ("*" if range_end else "")
            changes.append(f"role {role.name}: revoked {shown}")
    for key_range_, grant in wanted.items():
        permission_type = _PERMISSION_TYPES[grant.access]
        if held.get(key_range_) == permission_type:
            continue
        await auth.grant_permission(role.name, key_range_, permission_type, str(grant))
        changes.append(f"role {role.name}: granted {grant}")
    return changes


async def apply_rbac(store: Store, roles: Sequence[Role], enable: bool = True) -> list[str]:
    """Make etcd's users and roles match `roles` plus the admin users; enable authentication.

    Returns one line per change (empty when everything was already so). Before
    authentication is enabled any client may do this; afterwards only a root-role user.
    """
    await store.connect()
    auth = EtcdAuth(store)
    changes: list[str] = []
    existing_roles = await auth.roles()
    if ROOT_ROLE not in existing_roles:
        await auth.add_role(ROOT_ROLE)
        changes.append("role root: created")
    existing_users = await auth.users()
    for user in ADMIN_USERS:
        changes += await _ensure_user(auth, user, {ROOT_ROLE}, existing_users)
    for role in roles:
        changes += await _ensure_role(auth, role, store.prefix, existing_roles)
        changes += await _ensure_user(auth, role.name, {role.name}, existing_users)
    if enable:
        await auth.enable()
    return changes


def describe_roles(roles: Sequence[Role]) -> list[str]:
    """One line per grant, for `kvmctl admin rbac show`."""
    lines = [f"{user}: root (everything, users and roles)" for user in ADMIN_USERS]
    for role in roles:
        lines += [f"{role.name}: {grant}" for grant in role.grants]
    return lines
