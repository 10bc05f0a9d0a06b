"""Operator requests and agent reports for the HA controller, kept beside the objects.

They live in keys of their own, so `kvmctl apply` of a ClusterNode manifest (which owns the
whole spec and the annotations) never wipes them:

- `{prefix}/requests/fence-ack/{node}`: `kvmctl fence ack NODE`, `{"at", "by"}`; one-shot, the
  engine deletes it when it consumes or discards it;
- `{prefix}/requests/drain/{node}`: `kvmctl node drain NODE [--force]`, `{"mode", "at"}`; the
  node counts as cordoned for the HA engine while it exists, whatever `spec.cordoned` says;
  `kvmctl node uncordon NODE` deletes it;
- `{prefix}/reports/{node}`: written by the node's agent, `{"domains", "cleanedFence", "at"}`:
  the kvmctl domains that have a qemu process there, and the fence (its `confirmedAt`) after
  which the agent destroyed every domain it found.

The keys are `controller/runtime/layout_keys.py`'s; `controller/runtime/prefix_cache.py` keeps
one such key family in memory from a watch.
"""

from __future__ import annotations

import getpass
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controller.runtime import layout_keys
from controller.runtime.store import Store

from .environment import DrainMode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FenceAck:
    at: datetime
    by: str


@dataclass(frozen=True)
class DrainRequest:
    mode: DrainMode
    at: datetime


@dataclass(frozen=True)
class NodeReport:
    """What a node's agent last reported."""

    domains: frozenset[str]
    cleaned_fence: datetime | None
    """`status.fence.confirmedAt` of the fence after which the agent destroyed every domain."""
    at: datetime


class RequestFormatError(ValueError):
    """A request or report key holds something kvmctl did not write."""


def parse_document(key: str, value: bytes) -> dict[str, Any]:
    """The JSON object stored at `key`; RequestFormatError for anything else."""
    try:
        document = json.loads(value)
    except ValueError as error:
        raise RequestFormatError(f"{key}: not JSON: {error}") from None
    if not isinstance(document, dict):
        raise RequestFormatError(f"{key}: expected a JSON object")
    return document


def _time(key: str, value: object) -> datetime:
    if not isinstance(value, str):
        raise RequestFormatError(f"{key}: expected an ISO 8601 time, got {value!r}")
    try:
        return datetime.fromisoformat(value)
    except ValueError as error:
        raise RequestFormatError(f"{key}: {error}") from None


def parse_fence_ack(key: str, value: bytes) -> FenceAck:
    document = parse_document(key, value)
    return FenceAck(_time(key, document.get("at")), str(document.get("by", "")))


def parse_drain(key: str, value: bytes) -> DrainRequest:
    document = parse_document(key, value)
    mode = document.get("mode")
    if mode not in ("migrate", "force"):
        raise RequestFormatError(f"{key}: mode must be migrate or force, got {mode!r}")
    return DrainRequest(mode, _time(key, document.get("at")))


def parse_report(key: str, value: bytes) -> NodeReport:
    document = parse_document(key, value)
    domains = document.get("domains", [])
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise RequestFormatError(f"{key}: domains must be a list of names")
    cleaned = document.get("cleanedFence")
    return NodeReport(
        domains=frozenset(domains),
        cleaned_fence=None if cleaned is None else _time(key, cleaned),
        at=_time(key, document.get("at")),
    )


def encode_document(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


async def request_fence_ack(store: Store, node: str) -> None:
    """Record the operator's word that `node` is off (`kvmctl fence ack NODE`)."""
    document = {"at": datetime.now(UTC).isoformat(), "by": getpass.getuser()}
    await store.keys.put(store.raw_key(layout_keys.fence_ack(node)), encode_document(document))


async def request_drain(store: Store, node: str, force: bool) -> None:
    document = {"mode": "force" if force else "migrate", "at": datetime.now(UTC).isoformat()}
    await store.keys.put(store.raw_key(layout_keys.drain(node)), encode_document(document))


async def cancel_drain(store: Store, node: str) -> bool:
    """Delete the drain request of `node`; True if there was one."""
    return await store.keys.delete(store.raw_key(layout_keys.drain(node)))


async def read_drain(store: Store, node: str) -> DrainRequest | None:
    key = layout_keys.absolute(store.prefix, layout_keys.drain(node))
    kv = await store.keys.get(key)
    return None if kv is None else parse_drain(key, kv.value)


async def write_report(store: Store, node: str, report: NodeReport) -> None:
    document = {
        "domains": sorted(report.domains),
        "cleanedFence": None if report.cleaned_fence is None else report.cleaned_fence.isoformat(),
        "at": report.at.isoformat(),
    }
    await store.keys.put(store.raw_key(layout_keys.report(node)), encode_document(document))


async def read_report(store: Store, node: str) -> NodeReport | None:
    key = layout_keys.absolute(store.prefix, layout_keys.report(node))
    kv = await store.keys.get(key)
    return None if kv is None else parse_report(key, kv.value)
