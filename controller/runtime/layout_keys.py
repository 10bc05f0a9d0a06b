"""The store's whole key layout: every key kvmctl writes, who writes it and who reads it.

Keys are relative to the cluster prefix (`absolute` adds it). The objects' keys and their
merge rule are `layout.py`; this module names every other key. Code that builds a key, a watched
range or an RBAC grant (`controller/rbac.py`) calls these functions, so a key and the grant
that allows its writer cannot drift apart. A new key family goes here, with its writer and
readers in `FAMILIES` and in docs/architecture.md's table.
"""

from __future__ import annotations

from dataclasses import dataclass

from crds.meta import _check_name

from . import layout

EVERYTHING = ""
"""The range of every key under the prefix (the controller reads it all)."""
REVISION_PROBE = "revision-probe"
"""Never written: every client reads this empty range to learn the store's revision."""
HEARTBEATS = "heartbeats/"
SESSIONS = "sessions/"
REPORTS = "reports/"
LEADERS = "leader/"
TAKEOVER_SUFFIX = ".takeover"
REQUESTS = "requests/"
"""Operator and guest-cluster requests to the controller (the families below)."""
FENCE_ACKS = REQUESTS + "fence-ack/"
DRAINS = REQUESTS + "drain/"
GUEST_FENCE_REQUESTS = REQUESTS + "guest-fence/"
RESULTS = "results/"
"""The controller's answers (the family below)."""
GUEST_FENCE_RESULTS = RESULTS + "guest-fence/"
GUEST_POWER_STATES = "status"
"""Under a guest cluster's results: `status/<vm>`, the power state the controller publishes."""
LOCKS = "locks/"
"""etcd locks (controller/runtime/etcd_lock.py), the family below."""
VG_METADATA_LOCKS = LOCKS + "lvm/"
LV_ACTIVATION_CLAIMS = "lvm/activation/"


def absolute(prefix: str, relative: str) -> str:
    """`relative` under the cluster prefix `prefix` (as `Store.raw_key`, but a str)."""
    return f"{prefix.rstrip('/')}/{relative}"


def _segment(value: str, what: str) -> str:
    """`value` as one key segment: non-empty and without '/' (it cannot leave its range)."""
    if not value or "/" in value:
        raise ValueError(f"{what} must be non-empty and without '/', got {value!r}")
    return value


def heartbeat(node: str) -> str:
    """`heartbeats/<node>`: the node's agent, bound to its lease (docs/ha.md)."""
    return HEARTBEATS + _segment(node, "node name")


def session(node: str) -> str:
    """`sessions/<node>`: rewritten with every new heartbeat lease of the node's agent."""
    return SESSIONS + _segment(node, "node name")


def report(node: str) -> str:
    """`reports/<node>`: what the node's agent last reported (controller/ha/requests.py)."""
    return REPORTS + _check_name(node)


def leader(election: str) -> str:
    """`leader/<election>`: the elected candidate's record, bound to its lease."""
    return LEADERS + _segment(election, "leader election name")


def leader_takeover(election: str) -> str:
    """`leader/<election>.takeover`: the claim of a standby that took over (leader.py)."""
    return leader(election) + TAKEOVER_SUFFIX


def fence_ack(node: str) -> str:
    """`requests/fence-ack/<node>`: the operator's word that the node is off."""
    return FENCE_ACKS + _check_name(node)


def drain(node: str) -> str:
    """`requests/drain/<node>`: the node's drain request (it counts as cordoned meanwhile)."""
    return DRAINS + _check_name(node)


def guest_fence_requests(cluster: str) -> str:
    """The range of guest cluster `cluster`'s fence requests (its `fence_kvmctl` writes)."""
    return f"{GUEST_FENCE_REQUESTS}{_check_name(cluster)}/"


def guest_fence_request(cluster: str, vm: str) -> str:
    return guest_fence_requests(cluster) + _check_name(vm)


def guest_fence_results(cluster: str) -> str:
    """The range of the controller's answers to guest cluster `cluster`."""
    return f"{GUEST_FENCE_RESULTS}{_check_name(cluster)}/"


def guest_fence_result(cluster: str, vm: str) -> str:
    return guest_fence_results(cluster) + _check_name(vm)


def guest_power_states(cluster: str) -> str:
    """The range of the power states published to guest cluster `cluster`."""
    return f"{guest_fence_results(cluster)}{GUEST_POWER_STATES}/"


def guest_power_state(cluster: str, vm: str) -> str:
    return guest_power_states(cluster) + _check_name(vm)


def vg_metadata_lock(vg: str) -> str:
    """`locks/lvm/<vg>`: one host at a time changes the VG's metadata."""
    return VG_METADATA_LOCKS + _segment(vg, "volume group name")


def lv_activation_claim(vg: str, lv: str) -> str:
    """`lvm/activation/<vg>/<lv>`: the node that may have the LV active."""
    return f"{LV_ACTIVATION_CLAIMS}{_segment(vg, 'volume group name')}/{_segment(lv, 'LV name')}"


@dataclass(frozen=True)
class Family:
    """One family of keys: its range (or single key), its writers and its readers."""

    key: str
    """The keys' shape, `<...>` standing for a name."""
    writers: str
    readers: str


FAMILIES = (
    Family(
        "kinds/<Kind>/spec/<name>",
        "CLI/sync; the controller for what it creates",
        "everyone (Secrets: the controller and secret-reader nodes)",
    ),
    Family("kinds/<Kind>/status/controller/<name>", "the controller", "everyone"),
    Family("kinds/<Kind>/status/node.<node>/<name>", "the node's agent", "everyone"),
    Family("kinds/Event/spec/<name>", "the controller and CLI", "everyone"),
    Family("kinds/Event/node.<node>/<name>", "the node's agent", "everyone"),
    Family(layout.LAYOUT_KEY, "kvmctl admin migrate-store", "every client, when it connects"),
    Family(
        HEARTBEATS + "<node>",
        "the node's agent, bound to its lease",
        "the controllers, agents, monitor, kvmctl status",
    ),
    Family(
        SESSIONS + "<node>",
        "the node's agent, rewritten with every new heartbeat lease (no lease)",
        "the controller (takeover record)",
    ),
    Family(
        LEADERS + "<election>",
        "the elected controller, bound to its lease",
        "controllers, agents (the term's token), monitor, kvmctl status",
    ),
    Family(
        LEADERS + "<election>" + TAKEOVER_SUFFIX,
        "a standby that took over a dead leader's term",
        "controllers",
    ),
    Family(REPORTS + "<node>", "the node's agent", "the controller, the agent itself, monitor"),
    Family(
        FENCE_ACKS + "<node>",
        "kvmctl fence ack; deleted by the controller",
        "the controller, monitor",
    ),
    Family(
        DRAINS + "<node>",
        "kvmctl node drain; deleted by uncordon",
        "the controller, the CLI, monitor",
    ),
    Family(
        GUEST_FENCE_REQUESTS + "<cluster>/<vm>",
        "fence_kvmctl of guest cluster <cluster>; deleted by the controller",
        "the controller",
    ),
    Family(GUEST_FENCE_RESULTS + "<cluster>/<vm>", "the controller", "fence_kvmctl of <cluster>"),
    Family(
        GUEST_FENCE_RESULTS + f"<cluster>/{GUEST_POWER_STATES}/<vm>",
        "the controller",
        "fence_kvmctl of <cluster>",
    ),
    Family(VG_METADATA_LOCKS + "<vg>", "agents", "agents"),
    Family(LV_ACTIVATION_CLAIMS + "<vg>/<lv>", "agents", "agents, monitor"),
    Family(REVISION_PROBE, "nobody", "every client"),
)
"""The whole layout: docs/architecture.md's table has one row per family, with these writers
and readers (tests/test_layout_keys.py compares them)."""
