"""GitSync: the state of a continuous sync of manifests from a Git repository (GitOps)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .meta import Line, Resource, Status, Strict, Text, Time


class InventoryEntry(Strict):
    kind: Line
    name: Line


class GitSyncSpec(Strict):
    repo: Annotated[str, StringConstraints(pattern=r"^[^\s\x00]{1,4096}$")]
    ref: Annotated[str, StringConstraints(pattern=r"^[^\s\x00~^:?*\[\\]{1,255}$")] = "main"
    path: Annotated[str, StringConstraints(pattern=r"^[^\x00\n]{0,4096}$")] = "."
    interval_seconds: int = Field(default=30, ge=1, le=86400, alias="intervalSeconds")
    """Seconds between polls of the repository: at most a day."""
    prune: bool = False


class GitSyncStatus(Status):
    last_synced_commit: Line | None = Field(default=None, alias="lastSyncedCommit")
    last_attempted_commit: Line | None = Field(default=None, alias="lastAttemptedCommit")
    last_sync_time: Time | None = Field(default=None, alias="lastSyncTime")
    applied: int = 0
    pruned: int = 0
    failed: int = 0
    inventory: list[InventoryEntry] = Field(default_factory=list)
    """Objects this sync created: the only ones it may prune."""
    message: Text = ""


class GitSync(Resource[GitSyncSpec, GitSyncStatus]):
    kind: Literal["GitSync"] = "GitSync"
    status: GitSyncStatus = Field(default_factory=GitSyncStatus)
